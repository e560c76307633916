import { join } from 'node:path'
import { GarageError } from '../core/errors.ts'
import type { Logger } from '../core/logger.ts'
import { defaultDataDir } from '../core/paths.ts'
import type { KeyLimiter } from './rate-limit.ts'

/**
 * The federation's shared state (API keys, the ledger, rate-limit state) behind one interface, with
 * two backends: SQLite in the data dir (the embedded default, `store-sqlite.ts`) and PostgreSQL for
 * several gateways behind a load balancer (`store-postgres.ts`). What is not storage (key names and
 * lookups, the auth cache, ledger sums and batching, rate-limit decisions and headers) lives once,
 * in keys.ts, ledger.ts and rate-limit.ts, over this interface.
 */

/** The federation's one SQLite file, inside its data dir. */
export const federationDbFileName = 'federation.db'

/** The environment variable that points the gateway, `garage keys` and `garage ledger` at PostgreSQL. */
export const databaseUrlVar = 'GARAGE_DATABASE_URL'

/** The federation gateway's state (keys, ledger): --data-dir, else `<Garage data dir>/federation`. */
export function federationDataDir(env: NodeJS.ProcessEnv = process.env, override?: string): string {
  return override ?? join(defaultDataDir(env), 'federation')
}

/** The path of the database file in a federation data dir. */
export function federationDbPath(dataDir: string): string {
  return join(dataDir, federationDbFileName)
}

export class FederationStoreError extends GarageError {}
export class FederationStoreMissingError extends GarageError {}
export class FederationStoreVersionError extends GarageError {}
export class FederationStoreUrlError extends GarageError {}
/** The database cannot be reached now (PostgreSQL down, restarting, a network cut): retry later. */
export class FederationStoreUnavailableError extends GarageError {}
/** migrate-store refuses a target that already holds other data. */
export class FederationStoreNotEmptyError extends GarageError {}

export type StoreKind = 'sqlite' | 'postgres'

/** A key as stored, without its hash. Times in ms since 1970. */
export interface StoredKey {
  id: string
  name: string
  prefix: string
  rpm: number | null
  tpm: number | null
  concurrency: number | null
  createdAt: number
  revokedAt: number | null
}

/** A key with its hash: only for moving a store (migrate-store). */
export interface StoredKeyWithHash extends StoredKey {
  hash: string
}

/** Usage per key, model and UTC day, as summed in memory and added to the store's row. */
export interface UsageSum {
  day: string
  keyId: string
  model: string
  requests: number
  promptTokens: number
  completionTokens: number
}

/** Credits per node, model, region and UTC day. */
export interface CreditSum {
  day: string
  node: string
  model: string
  region: string
  requests: number
  promptTokens: number
  completionTokens: number
}

/**
 * Sums written in one transaction. `id` makes the write idempotent where a commit can be lost in
 * transit (PostgreSQL: the connection drops after COMMIT was sent): retried with the same id, a
 * batch the store already has is not added twice.
 */
export interface LedgerBatch {
  id: string
  usage: UsageSum[]
  credits: CreditSum[]
}

/** Days are "YYYY-MM-DD" (UTC), both ends included. */
export interface LedgerFilter {
  since?: string
  until?: string
  keyId?: string
  node?: string
}

export interface KeyUsage {
  keyId: string
  /** null when the key is not in this database. */
  keyName: string | null
  model: string
  requests: number
  promptTokens: number
  completionTokens: number
}

export interface NodeCredit {
  node: string
  region: string
  model: string
  requests: number
  /** Prompt tokens the node processed (embeddings: all its work), as its usage said, bounded by the gateway. */
  promptTokens: number
  /** Completion tokens the node served, as verified by its head and the gateway. */
  completionTokens: number
}

/** A quarantine a head reported (docs/integrity.md): the node's credits not yet verified are held. */
export interface CreditHold {
  node: string
  region: string
  /** When the head quarantined the node (ms since the epoch). */
  since: number
  reason: string
  /** Completion tokens credited since the node's last passed check, held back. */
  tokens: number
}

export interface LedgerTotals {
  requests: number
  promptTokens: number
  completionTokens: number
  /** Requests and tokens credited to nodes (requests no node served are not credited). */
  creditedRequests: number
  creditedTokens: number
}

/** Everything a store holds that outlives a process, for migrate-store. */
export interface StoreContents {
  keys: StoredKeyWithHash[]
  usage: UsageSum[]
  credits: CreditSum[]
}

export interface LimiterOptions {
  /** Test clock for the in-memory limiter (PostgreSQL uses the server's clock, one for every gateway). */
  now?: () => number
  /** PostgreSQL: how long a gateway's unrenewed count of requests in flight counts (default slotTtlMs, 30 s). */
  slotTtlMs?: number
}

/** The storage the federation's logic runs on. Every method may throw FederationStoreUnavailableError. */
export interface FederationStore {
  readonly kind: StoreKind
  /** Where it is, for messages: a file path, or the URL without its password. */
  readonly location: string
  /** false while the database cannot be reached (the gateway then refuses new requests with 503). */
  readonly available: boolean

  /** false: an active key already has that name. */
  insertKey(key: StoredKeyWithHash): Promise<boolean>
  keyById(id: string): Promise<StoredKey | null>
  /** Keys whose visible prefix is `prefix` or whose name is `name`, oldest first. */
  keysByPrefixOrName(prefix: string, name: string): Promise<StoredKey[]>
  activeKeyByName(name: string): Promise<StoredKey | null>
  activeKeyByHash(hash: string): Promise<StoredKey | null>
  /** Every key, oldest first. */
  listKeys(): Promise<StoredKey[]>
  revokeKey(id: string, at: number): Promise<void>

  /** Adds the batch's sums to the stored rows in one transaction (a batch already written is skipped). */
  writeLedger(batch: LedgerBatch): Promise<void>
  usageByKey(filter: LedgerFilter): Promise<KeyUsage[]>
  creditsByNode(filter: LedgerFilter): Promise<NodeCredit[]>
  totals(filter: LedgerFilter): Promise<LedgerTotals>
  /** Records the holds a region's head reports (each kept once per node, region and since; updated). */
  recordHolds(region: string, holds: readonly CreditHold[], at: number): Promise<void>
  /** Every hold recorded, newest first (for one node when given). */
  holds(filter: { node?: string }): Promise<CreditHold[]>

  /** The per-key limiter that matches the store: in memory beside SQLite, shared through PostgreSQL. */
  createLimiter(options?: LimiterOptions): KeyLimiter

  /** Everything, for migrate-store. */
  contents(): Promise<StoreContents>
  /** Whether the store holds any key or ledger row. */
  isEmpty(): Promise<boolean>
  /** Writes `contents` into this store in one transaction. */
  load(contents: StoreContents): Promise<void>

  close(): Promise<void>
}

export interface OpenStoreOptions {
  /** The SQLite store's folder (also the gateway's identity and admin token). */
  dataDir: string
  /** postgres://... : PostgreSQL instead of SQLite. */
  database?: string | undefined
  /** false: refuse a SQLite data dir that has no database yet (read-only commands; catches a mistyped --data-dir). */
  create?: boolean
  logger?: Logger
}

/** --database, else $GARAGE_DATABASE_URL, else undefined (SQLite in the data dir). */
export function databaseOption(value: string | undefined, env: NodeJS.ProcessEnv): string | undefined {
  const url = value ?? env[databaseUrlVar]
  if (url == null || url === '') return undefined
  checkDatabaseUrl(url)
  return url
}

/** Only PostgreSQL URLs are taken: anything else is a FederationStoreUrlError naming what is expected. */
export function checkDatabaseUrl(url: string): void {
  let parsed: URL | null = null
  try {
    parsed = new URL(url)
  } catch {
    // reported below
  }
  if (parsed == null || !['postgres:', 'postgresql:'].includes(parsed.protocol) || parsed.host === '')
    throw new FederationStoreUrlError(
      `the database must be a PostgreSQL URL like postgres://USER:PASSWORD@HOST:5432/DB, not ${JSON.stringify(redactUrl(url))}`,
      'FEDERATION_DB_URL',
    )
}

/** The URL with its password replaced by ***, for messages and logs. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url)
    if (u.password !== '') u.password = '***'
    return u.toString()
  } catch {
    return url.replace(/\/\/([^:/@]*):[^@]*@/, '//$1:***@')
  }
}

/** Opens the store the options name: PostgreSQL when a database URL is given, else SQLite in the data dir. */
export async function openStore(options: OpenStoreOptions): Promise<FederationStore> {
  if (options.database != null) {
    checkDatabaseUrl(options.database)
    const { openPostgresStore } = await import('./store-postgres.ts')
    return openPostgresStore(options.database, options.logger != null ? { logger: options.logger } : {})
  }
  const { openFederationStore } = await import('./store-sqlite.ts')
  return openFederationStore(options.dataDir, { create: options.create ?? true })
}

export interface CopyOutcome {
  keys: number
  usageRows: number
  creditRows: number
  /** The target already held exactly this data: nothing was written. */
  alreadyThere: boolean
}

/**
 * Copies every key (with its hash: they keep working) and every ledger row from one store into
 * another, in one transaction. The target must be empty; a target that already holds exactly the
 * same data (the copy was made before) is left as it is, so running it twice is harmless. Rate-limit
 * state is not copied: it is a minute long.
 */
export async function copyStore(
  from: FederationStore,
  to: FederationStore,
  progress: (message: string) => void = () => {},
): Promise<CopyOutcome> {
  progress(`reading ${from.location}`)
  const contents = await from.contents()
  const counts = {
    keys: contents.keys.length,
    usageRows: contents.usage.length,
    creditRows: contents.credits.length,
  }
  const describe = `${counts.keys} keys, ${counts.usageRows} usage rows, ${counts.creditRows} credit rows`
  if (!(await to.isEmpty())) {
    const there = await to.contents()
    if (JSON.stringify(there) === JSON.stringify(contents)) return { ...counts, alreadyThere: true }
    throw new FederationStoreNotEmptyError(
      `${to.location} already holds other data (${there.keys.length} keys, ${there.usage.length} usage rows, ${there.credits.length} credit rows); migrate-store copies into an empty database only`,
      'FEDERATION_DB_NOT_EMPTY',
    )
  }
  progress(`writing ${describe} to ${to.location}`)
  await to.load(contents)
  return { ...counts, alreadyThere: false }
}
