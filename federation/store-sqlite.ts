import { chmodSync, closeSync, constants, mkdirSync, openSync, statSync } from 'node:fs'
import { DatabaseSync, type SQLInputValue, type SQLOutputValue, type StatementSync } from 'node:sqlite'
import { GarageError } from '../core/errors.ts'
import { type KeyLimiter, RateLimiter } from './rate-limit.ts'
import {
  type CreditHold,
  type CreditSum,
  type FederationStore,
  FederationStoreError,
  FederationStoreMissingError,
  FederationStoreVersionError,
  federationDbPath,
  type KeyUsage,
  type LedgerBatch,
  type LedgerFilter,
  type LedgerTotals,
  type LimiterOptions,
  type NodeCredit,
  type StoreContents,
  type StoredKey,
  type StoredKeyWithHash,
  type UsageSum,
} from './store.ts'

/** How long a writer waits for another process's lock (the CLI and a gateway share the file). */
export const busyTimeoutMs = 5_000

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

/**
 * Opens `<dataDir>/federation.db` (mode 0600, WAL, busy timeout) and brings its schema up to date.
 * Several processes may open it at once: a gateway and `garage keys` run side by side.
 */
export function openFederationStore(dataDir: string, options: OpenFederationStoreOptions = {}): SqliteStore {
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
  return new SqliteStore(db, path)
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
      `no federation database in ${dataDir}; check --data-dir (or --database), or create a key first with: garage keys create --name NAME`,
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

const keyColumns = 'id, name, prefix, rpm, tpm, concurrency, created_at, revoked_at'
const num = (v: SQLOutputValue | undefined): number => Number(v ?? 0)
const numOrNull = (v: SQLOutputValue | undefined): number | null => (v == null ? null : Number(v))

function toKey(row: Record<string, SQLOutputValue>): StoredKey {
  return {
    id: String(row.id),
    name: String(row.name),
    prefix: String(row.prefix),
    rpm: numOrNull(row.rpm),
    tpm: numOrNull(row.tpm),
    concurrency: numOrNull(row.concurrency),
    createdAt: Number(row.created_at),
    revokedAt: numOrNull(row.revoked_at),
  }
}

/** WHERE over a ledger table; `alias` prefixes the columns ("u." when joined). */
function where(filter: LedgerFilter, alias = ''): { sql: string; params: SQLInputValue[] } {
  const clauses: string[] = []
  const params: SQLInputValue[] = []
  const add = (clause: string, value: string | undefined): void => {
    if (value == null) return
    clauses.push(clause)
    params.push(value)
  }
  add(`${alias}day >= ?`, filter.since)
  add(`${alias}day <= ?`, filter.until)
  add(`${alias}key_id = ?`, filter.keyId)
  add(`${alias}node = ?`, filter.node)
  return { sql: clauses.length > 0 ? `WHERE ${clauses.join(' AND ')}` : '', params }
}

const addUsageSql = `INSERT INTO usage_daily (day, key_id, model, requests, prompt_tokens, completion_tokens)
  VALUES (?, ?, ?, ?, ?, ?)
  ON CONFLICT (day, key_id, model) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens`
const addCreditSql = `INSERT INTO node_credits_daily (day, node, model, region, requests, prompt_tokens, completion_tokens)
  VALUES (?, ?, ?, ?, ?, ?, ?)
  ON CONFLICT (day, node, model, region) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens`

/**
 * The federation's state in one SQLite file. Calls run synchronously inside their promise (a ledger
 * batch is committed in the event-loop turn that flushes it). Rate limits are in memory, per process.
 */
export class SqliteStore implements FederationStore {
  readonly kind = 'sqlite' as const
  readonly location: string
  readonly available = true
  /** The open database, for tests and tools that read it directly. */
  readonly db: DatabaseSync
  private readonly statements = new Map<string, StatementSync>()

  constructor(db: DatabaseSync, path: string) {
    this.db = db
    this.location = path
  }

  /** Prepared once per store: authentication runs on every request. */
  private sql(text: string): StatementSync {
    let statement = this.statements.get(text)
    if (statement == null) {
      statement = this.db.prepare(text)
      this.statements.set(text, statement)
    }
    return statement
  }

  private oneKey(text: string, ...params: SQLInputValue[]): StoredKey | null {
    const row = this.sql(text).get(...params)
    return row == null ? null : toKey(row)
  }

  async insertKey(key: StoredKeyWithHash): Promise<boolean> {
    try {
      this.sql(
        'INSERT INTO api_keys (id, name, prefix, hash, rpm, tpm, concurrency, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
      ).run(
        key.id,
        key.name,
        key.prefix,
        key.hash,
        key.rpm,
        key.tpm,
        key.concurrency,
        key.createdAt,
        key.revokedAt,
      )
      return true
    } catch (err) {
      if (/UNIQUE constraint failed: api_keys\.name/.test((err as Error).message)) return false
      throw err
    }
  }

  async keyById(id: string): Promise<StoredKey | null> {
    return this.oneKey(`SELECT ${keyColumns} FROM api_keys WHERE id = ?`, id)
  }

  async keysByPrefixOrName(prefix: string, name: string): Promise<StoredKey[]> {
    return this.sql(`SELECT ${keyColumns} FROM api_keys WHERE prefix = ? OR name = ? ORDER BY created_at, id`)
      .all(prefix, name)
      .map(toKey)
  }

  async activeKeyByName(name: string): Promise<StoredKey | null> {
    return this.oneKey(`SELECT ${keyColumns} FROM api_keys WHERE name = ? AND revoked_at IS NULL`, name)
  }

  async activeKeyByHash(hash: string): Promise<StoredKey | null> {
    return this.oneKey(`SELECT ${keyColumns} FROM api_keys WHERE hash = ? AND revoked_at IS NULL`, hash)
  }

  async listKeys(): Promise<StoredKey[]> {
    return this.sql(`SELECT ${keyColumns} FROM api_keys ORDER BY created_at, id`).all().map(toKey)
  }

  async revokeKey(id: string, at: number): Promise<void> {
    this.sql('UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL').run(at, id)
  }

  async writeLedger(batch: LedgerBatch): Promise<void> {
    // One local transaction: it commits or it does not, so the batch id has nothing to guard here.
    inTransaction(this.db, () => this.addSums(batch.usage, batch.credits))
  }

  private addSums(usage: UsageSum[], credits: CreditSum[]): void {
    const addUsage = this.sql(addUsageSql)
    for (const u of usage)
      addUsage.run(u.day, u.keyId, u.model, u.requests, u.promptTokens, u.completionTokens)
    const addCredit = this.sql(addCreditSql)
    for (const c of credits)
      addCredit.run(c.day, c.node, c.model, c.region, c.requests, c.promptTokens, c.completionTokens)
  }

  async usageByKey(filter: LedgerFilter): Promise<KeyUsage[]> {
    const w = where({ ...filter, node: undefined }, 'u.')
    return this.db
      .prepare(
        `SELECT u.key_id, k.name, u.model, SUM(u.requests) AS requests,
                SUM(u.prompt_tokens) AS prompt_tokens, SUM(u.completion_tokens) AS completion_tokens
         FROM usage_daily u LEFT JOIN api_keys k ON k.id = u.key_id
         ${w.sql}
         GROUP BY u.key_id, u.model
         ORDER BY k.name, u.key_id, u.model`,
      )
      .all(...w.params)
      .map((r) => ({
        keyId: String(r.key_id),
        keyName: r.name == null ? null : String(r.name),
        model: String(r.model),
        requests: num(r.requests),
        promptTokens: num(r.prompt_tokens),
        completionTokens: num(r.completion_tokens),
      }))
  }

  async creditsByNode(filter: LedgerFilter): Promise<NodeCredit[]> {
    const w = where({ ...filter, keyId: undefined })
    return this.db
      .prepare(
        `SELECT node, region, model, SUM(requests) AS requests, SUM(prompt_tokens) AS prompt_tokens,
                SUM(completion_tokens) AS completion_tokens
         FROM node_credits_daily ${w.sql}
         GROUP BY node, region, model
         ORDER BY node, region, model`,
      )
      .all(...w.params)
      .map((r) => ({
        node: String(r.node),
        region: String(r.region),
        model: String(r.model),
        requests: num(r.requests),
        promptTokens: num(r.prompt_tokens),
        completionTokens: num(r.completion_tokens),
      }))
  }

  async recordHolds(region: string, holds: readonly CreditHold[], at: number): Promise<void> {
    const upsert = this.db.prepare(
      `INSERT INTO node_credit_holds (node, region, since, reason, tokens, seen_at) VALUES (?, ?, ?, ?, ?, ?)
       ON CONFLICT (node, region, since) DO UPDATE SET reason = excluded.reason, tokens = excluded.tokens, seen_at = excluded.seen_at`,
    )
    inTransaction(this.db, () => {
      for (const h of holds) upsert.run(h.node, region, h.since, h.reason, h.tokens, at)
    })
  }

  async holds(filter: { node?: string }): Promise<CreditHold[]> {
    return this.db
      .prepare(
        `SELECT node, region, since, reason, tokens FROM node_credit_holds
         ${filter.node != null ? 'WHERE node = ?' : ''} ORDER BY since DESC, node, region`,
      )
      .all(...(filter.node != null ? [filter.node] : []))
      .map((r) => ({
        node: String(r.node),
        region: String(r.region),
        since: num(r.since),
        reason: String(r.reason),
        tokens: num(r.tokens),
      }))
  }

  async totals(filter: LedgerFilter): Promise<LedgerTotals> {
    const w = where({ since: filter.since, until: filter.until })
    const u = this.db
      .prepare(
        `SELECT SUM(requests) AS requests, SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens
         FROM usage_daily ${w.sql}`,
      )
      .get(...w.params)
    const c = this.db
      .prepare(
        `SELECT SUM(requests) AS requests, SUM(completion_tokens) AS completion_tokens FROM node_credits_daily ${w.sql}`,
      )
      .get(...w.params)
    return {
      requests: num(u?.requests),
      promptTokens: num(u?.prompt_tokens),
      completionTokens: num(u?.completion_tokens),
      creditedRequests: num(c?.requests),
      creditedTokens: num(c?.completion_tokens),
    }
  }

  createLimiter(options: LimiterOptions = {}): KeyLimiter {
    return new RateLimiter(options)
  }

  async contents(): Promise<StoreContents> {
    return {
      keys: this.db
        .prepare(`SELECT ${keyColumns}, hash FROM api_keys ORDER BY created_at, id`)
        .all()
        .map((r) => ({ ...toKey(r), hash: String(r.hash) })),
      usage: this.db
        .prepare('SELECT * FROM usage_daily ORDER BY day, key_id, model')
        .all()
        .map(
          (r): UsageSum => ({
            day: String(r.day),
            keyId: String(r.key_id),
            model: String(r.model),
            requests: num(r.requests),
            promptTokens: num(r.prompt_tokens),
            completionTokens: num(r.completion_tokens),
          }),
        ),
      credits: this.db
        .prepare('SELECT * FROM node_credits_daily ORDER BY day, node, model, region')
        .all()
        .map(
          (r): CreditSum => ({
            day: String(r.day),
            node: String(r.node),
            model: String(r.model),
            region: String(r.region),
            requests: num(r.requests),
            promptTokens: num(r.prompt_tokens),
            completionTokens: num(r.completion_tokens),
          }),
        ),
    }
  }

  async isEmpty(): Promise<boolean> {
    const row = this.db
      .prepare(
        `SELECT (SELECT COUNT(*) FROM api_keys) + (SELECT COUNT(*) FROM usage_daily)
              + (SELECT COUNT(*) FROM node_credits_daily) AS n`,
      )
      .get()
    return num(row?.n) === 0
  }

  async load(contents: StoreContents): Promise<void> {
    inTransaction(this.db, () => {
      const insert = this.sql(
        'INSERT INTO api_keys (id, name, prefix, hash, rpm, tpm, concurrency, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
      )
      for (const k of contents.keys)
        insert.run(k.id, k.name, k.prefix, k.hash, k.rpm, k.tpm, k.concurrency, k.createdAt, k.revokedAt)
      this.addSums(contents.usage, contents.credits)
    })
  }

  async close(): Promise<void> {
    if (this.db.isOpen) this.db.close()
  }
}
