import { chmodSync, closeSync, constants, mkdirSync, openSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { DatabaseSync } from 'node:sqlite'
import { GarageError } from '../core/errors.ts'
import { defaultDataDir } from '../core/paths.ts'

/** The federation's one SQLite file, inside its data dir. */
export const federationDbFileName = 'federation.db'

/** How long a writer waits for another process's lock (the CLI and a gateway share the file). */
export const busyTimeoutMs = 5_000

/** The federation gateway's state (keys, ledger): --data-dir, else `<Garage data dir>/federation`. */
export function federationDataDir(env: NodeJS.ProcessEnv = process.env, override?: string): string {
  return override ?? join(defaultDataDir(env), 'federation')
}

export class FederationStoreError extends GarageError {}
export class FederationStoreMissingError extends GarageError {}
export class FederationStoreVersionError extends GarageError {}

/**
 * Schema migrations, append-only: entry i takes `PRAGMA user_version` from i to i + 1. Never edit a
 * released entry (databases in the field already ran it); add a new one.
 */
export const migrations: readonly string[] = [
  `
  CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    rpm          INTEGER,
    tpm          INTEGER,
    concurrency  INTEGER,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
  ) STRICT;
  CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;

  CREATE TABLE usage_daily (
    day                TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    model              TEXT NOT NULL,
    requests           INTEGER NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    PRIMARY KEY (day, key_id, model)
  ) STRICT, WITHOUT ROWID;
  CREATE INDEX usage_daily_key ON usage_daily (key_id, day);

  CREATE TABLE node_credits_daily (
    day                TEXT NOT NULL,
    node               TEXT NOT NULL,
    model              TEXT NOT NULL,
    region             TEXT NOT NULL,
    requests           INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    PRIMARY KEY (day, node, model, region)
  ) STRICT, WITHOUT ROWID;
  CREATE INDEX node_credits_daily_node ON node_credits_daily (node, day);
  `,
  // Nodes are credited for the prompt tokens they processed too (an embedding node serves nothing else).
  `
  ALTER TABLE node_credits_daily ADD COLUMN prompt_tokens INTEGER NOT NULL DEFAULT 0;
  `,
  // A head quarantined a node (docs/integrity.md): the credits it had not yet had verified are held.
  `
  CREATE TABLE node_credit_holds (
    node        TEXT NOT NULL,
    region      TEXT NOT NULL,
    since       INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    tokens      INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL,
    PRIMARY KEY (node, region, since)
  ) STRICT, WITHOUT ROWID;
  `,
]

export interface OpenFederationStoreOptions {
  /** false: refuse a data dir that has no database yet (read-only commands; catches a mistyped --data-dir). */
  create?: boolean
}

/** The path of the database file in a federation data dir. */
export function federationDbPath(dataDir: string): string {
  return join(dataDir, federationDbFileName)
}

/**
 * Opens `<dataDir>/federation.db` (mode 0600, WAL, busy timeout) and brings its schema up to date.
 * Several processes may open it at once: a gateway and `garage keys` run side by side.
 */
export function openFederationStore(dataDir: string, options: OpenFederationStoreOptions = {}): DatabaseSync {
  const path = federationDbPath(dataDir)
  prepareFile(dataDir, path, options.create ?? true)
  let db: DatabaseSync
  try {
    db = new DatabaseSync(path)
  } catch (err) {
    throw new FederationStoreError(`cannot open ${path}: ${(err as Error).message}`, 'FEDERATION_DB_OPEN', {
      cause: err,
    })
  }
  try {
    db.exec(`PRAGMA busy_timeout = ${busyTimeoutMs}`)
    db.exec('PRAGMA journal_mode = WAL')
    // WAL with synchronous=NORMAL stays consistent after a crash; only the last commits may be lost.
    db.exec('PRAGMA synchronous = NORMAL')
    migrate(db, path)
  } catch (err) {
    db.close()
    if (err instanceof GarageError) throw err
    throw new FederationStoreError(
      `${path} is not a usable federation database: ${(err as Error).message}`,
      'FEDERATION_DB_INVALID',
      { cause: err },
    )
  }
  return db
}

/** Makes the file 0600 before SQLite opens it: SQLite would create it with the umask's mode, and its -wal and -shm copy the file's. */
function prepareFile(dataDir: string, path: string, create: boolean): void {
  try {
    const info = statSync(path)
    if (process.platform !== 'win32' && (info.mode & 0o077) !== 0) chmodSync(path, 0o600)
    return
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT')
      throw new FederationStoreError(`cannot read ${path}: ${(err as Error).message}`, 'FEDERATION_DB_OPEN', {
        cause: err,
      })
  }
  if (!create)
    throw new FederationStoreMissingError(
      `no federation database in ${dataDir}; check --data-dir, or create a key first with: garage keys create --name NAME`,
      'FEDERATION_DB_MISSING',
    )
  try {
    mkdirSync(dataDir, { recursive: true, mode: 0o700 })
    closeSync(openSync(path, constants.O_WRONLY | constants.O_CREAT, 0o600))
    chmodSync(path, 0o600)
  } catch (err) {
    throw new FederationStoreError(`cannot create ${path}: ${(err as Error).message}`, 'FEDERATION_DB_OPEN', {
      cause: err,
    })
  }
}

function userVersion(db: DatabaseSync): number {
  return Number(db.prepare('PRAGMA user_version').get()?.user_version ?? 0)
}

function migrate(db: DatabaseSync, path: string): void {
  if (userVersion(db) === migrations.length) return
  // IMMEDIATE takes the write lock first, so two processes opening a new file migrate it once.
  db.exec('BEGIN IMMEDIATE')
  try {
    const from = userVersion(db)
    if (from > migrations.length)
      throw new FederationStoreVersionError(
        `${path} has schema version ${from}, newer than this Garage knows (${migrations.length}); upgrade Garage`,
        'FEDERATION_DB_VERSION',
      )
    for (let v = from; v < migrations.length; v++) db.exec(migrations[v] as string)
    db.exec(`PRAGMA user_version = ${migrations.length}`)
    db.exec('COMMIT')
  } catch (err) {
    db.exec('ROLLBACK')
    throw err
  }
}

/** Runs fn in one write transaction (BEGIN IMMEDIATE: waits up to the busy timeout for other writers). */
export function inTransaction<T>(db: DatabaseSync, fn: () => T): T {
  db.exec('BEGIN IMMEDIATE')
  try {
    const result = fn()
    db.exec('COMMIT')
    return result
  } catch (err) {
    if (db.isTransaction) db.exec('ROLLBACK')
    throw err
  }
}
