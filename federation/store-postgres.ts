import { randomUUID } from 'node:crypto'
import { hostname } from 'node:os'
import pg from 'pg'
import { GarageError } from '../core/errors.ts'
import { type Logger, silentLogger } from '../core/logger.ts'
import {
  type Bucket,
  decide,
  type KeyLimiter,
  type RateLimitDecision,
  type RateLimitedKey,
} from './rate-limit.ts'
import {
  type CreditHold,
  type FederationStore,
  FederationStoreError,
  FederationStoreUnavailableError,
  FederationStoreVersionError,
  type KeyUsage,
  type LedgerBatch,
  type LedgerFilter,
  type LedgerTotals,
  type LimiterOptions,
  type NodeCredit,
  redactUrl,
  type StoreContents,
  type StoredKey,
  type StoredKeyWithHash,
} from './store.ts'

/**
 * The federation's state in PostgreSQL, shared by every gateway process that points at the same
 * database: keys, the ledger, and the rate-limit state (requests and tokens per key per second,
 * and each gateway's count of requests in flight per key), so a key's rpm, tpm and concurrency hold for all of them
 * together. One round trip admits a request (garage_admit, under a per-key advisory lock); ledger
 * sums, charged tokens and released slots are written once per event-loop turn. When the server
 * cannot be reached the store says so (FederationStoreUnavailableError, `available` false) and
 * probes it every second until it answers.
 */

/** Connections per gateway process. */
export const poolSize = 10
/** How long to wait for a connection (a new one, or a free one of the pool). */
export const connectTimeoutMs = 3_000
/** A query the server has not answered in this long fails (a cut network sends no reset). */
export const queryTimeoutMs = 10_000
/** While the server cannot be reached, it is asked this often whether it is back. */
export const probeIntervalMs = 1_000
/** A gateway's count of a key's requests in flight counts this long unless it renews it: a killed gateway's slots come back within it. */
export const slotTtlMs = 30_000
/** How often a gateway renews its counts of requests in flight. */
export const slotRenewIntervalMs = 10_000
/** How often a gateway drops rate-limit seconds that left the window, expired slot counts and old batch ids. */
export const sweepIntervalMs = 30_000
/** Held (transaction-scoped) while migrating: two gateways starting at once migrate once. */
const migrationLockId = 0x6761726167650001n

/**
 * Schema migrations, append-only: entry i takes garage_schema.version from i to i + 1. Never edit a
 * released entry; add a new one. The window is rate-limit.ts's windowSeconds (60) and batch ids are
 * kept a day to recognise a retried batch. Rate-limit tables are UNLOGGED: they need no crash safety (a crash
 * empties them: limits start over), and skipping the WAL keeps admission cheap.
 */
export const postgresMigrations: readonly string[] = [
  `
  CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    rpm          BIGINT,
    tpm          BIGINT,
    concurrency  BIGINT,
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
  );
  CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;
  CREATE INDEX api_keys_prefix ON api_keys (prefix);

  CREATE TABLE usage_daily (
    day                TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    model              TEXT NOT NULL,
    requests           BIGINT NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    PRIMARY KEY (day, key_id, model)
  );
  CREATE INDEX usage_daily_key ON usage_daily (key_id, day);

  CREATE TABLE node_credits_daily (
    day                TEXT NOT NULL,
    node               TEXT NOT NULL,
    model              TEXT NOT NULL,
    region             TEXT NOT NULL,
    requests           BIGINT NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    PRIMARY KEY (day, node, model, region)
  );
  CREATE INDEX node_credits_daily_node ON node_credits_daily (node, day);

  CREATE TABLE ledger_batches (
    id          UUID PRIMARY KEY,
    written_at  TIMESTAMPTZ NOT NULL DEFAULT now()
  );

  CREATE UNLOGGED TABLE rate_buckets (
    key_id    TEXT NOT NULL,
    second    BIGINT NOT NULL,
    requests  BIGINT NOT NULL DEFAULT 0,
    tokens    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, second)
  );

  -- Requests in flight per key and gateway; a row stops counting at expires_at unless its gateway renews it.
  CREATE UNLOGGED TABLE rate_slots (
    key_id      TEXT NOT NULL,
    gateway     TEXT NOT NULL,
    in_flight   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    PRIMARY KEY (key_id, gateway)
  );

  -- Admits the first of p_count requests of a key that fit, atomically across gateways: the advisory
  -- lock serialises the key's admissions, and each statement after it sees what the previous ones
  -- committed. Returns how many it admitted and the window as it was before them, for the caller's
  -- headers: every bucket when one is refused, else each window's total in one bucket at its newest second.
  CREATE FUNCTION garage_admit(
    p_key TEXT, p_rpm BIGINT, p_tpm BIGINT, p_concurrency BIGINT,
    p_gateway TEXT, p_slot_ttl_ms BIGINT, p_count BIGINT,
    OUT admitted BIGINT, OUT now_ms BIGINT, OUT bucket_seconds BIGINT[],
    OUT bucket_requests BIGINT[], OUT bucket_tokens BIGINT[], OUT in_flight BIGINT
  ) LANGUAGE plpgsql AS $$
  DECLARE
    v_second BIGINT;
    v_requests BIGINT;
    v_tokens BIGINT;
    v_newest_request BIGINT;
    v_newest_token BIGINT;
  BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_key, 0));
    now_ms := floor(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
    v_second := now_ms / 1000;
    SELECT coalesce(sum(b.requests), 0), coalesce(sum(b.tokens), 0),
           max(b.second) FILTER (WHERE b.requests > 0), max(b.second) FILTER (WHERE b.tokens > 0)
      INTO v_requests, v_tokens, v_newest_request, v_newest_token
      FROM rate_buckets b
      WHERE b.key_id = p_key AND b.second > v_second - 60 AND b.second <= v_second;
    SELECT coalesce(sum(s.in_flight), 0) INTO in_flight
      FROM rate_slots s WHERE s.key_id = p_key AND s.expires_at > now_ms;
    -- The first p_count requests that fit, in order (tokens are charged after answers, not here).
    admitted := p_count;
    IF p_rpm IS NOT NULL THEN admitted := least(admitted, greatest(p_rpm - v_requests, 0)); END IF;
    IF p_tpm IS NOT NULL AND v_tokens >= p_tpm THEN admitted := 0; END IF;
    IF p_concurrency IS NOT NULL THEN admitted := least(admitted, greatest(p_concurrency - in_flight, 0)); END IF;
    IF admitted < p_count THEN
      -- A refusal's Retry-After needs the buckets (before this call's requests): when enough of the
      -- window will have aged out.
      SELECT coalesce(array_agg(b.second ORDER BY b.second), '{}'),
             coalesce(array_agg(b.requests ORDER BY b.second), '{}'),
             coalesce(array_agg(b.tokens ORDER BY b.second), '{}')
        INTO bucket_seconds, bucket_requests, bucket_tokens
        FROM rate_buckets b
        WHERE b.key_id = p_key AND b.second > v_second - 60 AND b.second <= v_second;
    ELSE
      -- Headers need only each window's total and newest second: one bucket each says as much.
      bucket_seconds := ARRAY[coalesce(v_newest_request, v_second), coalesce(v_newest_token, v_second)];
      bucket_requests := ARRAY[v_requests, 0];
      bucket_tokens := ARRAY[0, v_tokens];
    END IF;
    IF admitted > 0 THEN
      INSERT INTO rate_buckets AS b (key_id, second, requests) VALUES (p_key, v_second, admitted)
        ON CONFLICT (key_id, second) DO UPDATE SET requests = b.requests + excluded.requests;
      IF p_concurrency IS NOT NULL THEN
        -- A row that had expired held a count nobody renewed: it starts over.
        INSERT INTO rate_slots AS s (key_id, gateway, in_flight, expires_at)
          VALUES (p_key, p_gateway, admitted, now_ms + p_slot_ttl_ms)
          ON CONFLICT (key_id, gateway) DO UPDATE SET
            in_flight = CASE WHEN s.expires_at > now_ms THEN s.in_flight ELSE 0 END + excluded.in_flight,
            expires_at = now_ms + p_slot_ttl_ms;
      END IF;
    END IF;
  END $$;

  -- After answers: their tokens charged to this second, the slots they held given back.
  CREATE FUNCTION garage_settle(
    p_gateway TEXT, p_keys TEXT[], p_tokens BIGINT[], p_released_keys TEXT[], p_released BIGINT[]
  ) RETURNS VOID LANGUAGE plpgsql AS $$
  DECLARE
    v_second BIGINT := floor(extract(epoch FROM clock_timestamp()))::BIGINT;
  BEGIN
    -- The keys' admission locks first, in one order: admission locks a key, then its rows; so must this.
    PERFORM pg_advisory_xact_lock(h) FROM (
      SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest(p_keys || p_released_keys) AS k ORDER BY 1
    ) AS locks;
    UPDATE rate_slots s SET in_flight = greatest(s.in_flight - x.n, 0)
      FROM unnest(p_released_keys, p_released) AS x (k, n)
      WHERE s.key_id = x.k AND s.gateway = p_gateway;
    INSERT INTO rate_buckets AS b (key_id, second, tokens)
      SELECT k, v_second, t FROM unnest(p_keys, p_tokens) AS x (k, t) ORDER BY k
      ON CONFLICT (key_id, second) DO UPDATE SET tokens = b.tokens + excluded.tokens;
  END $$;

  -- One ledger batch, once: a batch id already written means its commit was lost in transit. The
  -- rate-limit settlement of the same event-loop turn rides along (one round trip for both).
  CREATE FUNCTION garage_write_ledger(
    p_batch UUID,
    u_day TEXT[], u_key TEXT[], u_model TEXT[], u_requests BIGINT[], u_prompt BIGINT[], u_completion BIGINT[],
    c_day TEXT[], c_node TEXT[], c_model TEXT[], c_region TEXT[], c_requests BIGINT[], c_prompt BIGINT[],
    c_completion BIGINT[], p_gateway TEXT, p_token_keys TEXT[], p_tokens BIGINT[], p_released_keys TEXT[],
    p_released BIGINT[]
  ) RETURNS BOOLEAN LANGUAGE plpgsql AS $$
  BEGIN
    INSERT INTO ledger_batches (id) VALUES (p_batch) ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
      RETURN FALSE;
    END IF;
    INSERT INTO usage_daily AS u (day, key_id, model, requests, prompt_tokens, completion_tokens)
      SELECT * FROM unnest(u_day, u_key, u_model, u_requests, u_prompt, u_completion)
      ON CONFLICT (day, key_id, model) DO UPDATE SET
        requests = u.requests + excluded.requests,
        prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = u.completion_tokens + excluded.completion_tokens;
    INSERT INTO node_credits_daily AS c (day, node, model, region, requests, prompt_tokens, completion_tokens)
      SELECT * FROM unnest(c_day, c_node, c_model, c_region, c_requests, c_prompt, c_completion)
      ON CONFLICT (day, node, model, region) DO UPDATE SET
        requests = c.requests + excluded.requests,
        prompt_tokens = c.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = c.completion_tokens + excluded.completion_tokens;
    IF cardinality(p_token_keys) > 0 OR cardinality(p_released_keys) > 0 THEN
      PERFORM garage_settle(p_gateway, p_token_keys, p_tokens, p_released_keys, p_released);
    END IF;
    RETURN TRUE;
  END $$;

  CREATE FUNCTION garage_sweep() RETURNS VOID LANGUAGE plpgsql AS $$
  DECLARE
    v_now_ms BIGINT := floor(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT;
  BEGIN
    DELETE FROM rate_buckets WHERE second <= v_now_ms / 1000 - 60;
    DELETE FROM rate_slots WHERE expires_at <= v_now_ms;
    DELETE FROM ledger_batches WHERE written_at < now() - interval '24 hours';
  END $$;
  `,
  // A head quarantined a node (docs/integrity.md): the credits it had not yet had verified are held.
  `
  CREATE TABLE node_credit_holds (
    node        TEXT NOT NULL,
    region      TEXT NOT NULL,
    since       BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    tokens      BIGINT NOT NULL,
    seen_at     BIGINT NOT NULL,
    PRIMARY KEY (node, region, since)
  );
  `,
]

const int8ArrayOid = 1016

/** int8 as a number (every count and time here is far below 2^53), and int8[] likewise. */
const types = {
  getTypeParser(oid: number, format?: 'text' | 'binary'): (value: string) => unknown {
    if (oid === pg.types.builtins.INT8) return Number
    if (oid === int8ArrayOid) {
      const parseArray = pg.types.getTypeParser(
        int8ArrayOid as unknown as typeof pg.types.builtins.INT8,
        'text',
      ) as (value: string) => unknown[]
      return (value: string) => parseArray(value).map(Number)
    }
    return pg.types.getTypeParser(oid, format ?? 'text') as (value: string) => unknown
  },
}

/** Errors that mean "the server is not there now" rather than "this query is wrong". */
const unavailableCodes = new Set([
  '57P01', // admin_shutdown: the server is stopping
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now: starting up or shutting down
  '53300', // too_many_connections
  'ECONNREFUSED',
  'ECONNRESET',
  'ETIMEDOUT',
  'EPIPE',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
])

export function isUnavailableError(err: unknown): boolean {
  if (err instanceof FederationStoreUnavailableError) return true
  const e = err as { code?: unknown; message?: unknown }
  if (typeof e?.code === 'string' && (e.code.startsWith('08') || unavailableCodes.has(e.code))) return true
  return /Connection terminated|connection timeout|timeout exceeded when trying to connect|Query read timeout|Client was closed|Connection refused/i.test(
    String(e?.message ?? ''),
  )
}

export interface PostgresStoreOptions {
  logger?: Logger
  /** Connections of this process (default poolSize). */
  poolSize?: number
}

/** Connects, migrates (once, whoever starts first) and returns the store; a server that cannot be reached is a FederationStoreUnavailableError. */
export async function openPostgresStore(
  url: string,
  options: PostgresStoreOptions = {},
): Promise<PostgresStore> {
  const store = new PostgresStore(url, options)
  try {
    await store.migrate()
  } catch (err) {
    await store.close()
    throw err
  }
  return store
}

interface AdmitRow {
  admitted: number
  now_ms: number
  bucket_seconds: number[]
  bucket_requests: number[]
  bucket_tokens: number[]
  in_flight: number
}

const keyColumns = 'id, name, prefix, rpm, tpm, concurrency, created_at, revoked_at'

interface KeyRow {
  id: string
  name: string
  prefix: string
  rpm: number | null
  tpm: number | null
  concurrency: number | null
  created_at: number
  revoked_at: number | null
  hash?: string
}

function toKey(r: KeyRow): StoredKey {
  return {
    id: r.id,
    name: r.name,
    prefix: r.prefix,
    rpm: r.rpm,
    tpm: r.tpm,
    concurrency: r.concurrency,
    createdAt: r.created_at,
    revokedAt: r.revoked_at,
  }
}

/** WHERE over a ledger table with $n parameters; `alias` prefixes the columns. */
function where(filter: LedgerFilter, alias = ''): { sql: string; params: string[] } {
  const clauses: string[] = []
  const params: string[] = []
  const add = (column: string, op: string, value: string | undefined): void => {
    if (value == null) return
    params.push(value)
    clauses.push(`${alias}${column} ${op} $${params.length}`)
  }
  add('day', '>=', filter.since)
  add('day', '<=', filter.until)
  add('key_id', '=', filter.keyId)
  add('node', '=', filter.node)
  return { sql: clauses.length > 0 ? `WHERE ${clauses.join(' AND ')}` : '', params }
}

/** The arguments of garage_write_ledger: the batch id, one array per column, then the settlement. */
function ledgerArgs(batch: LedgerBatch, settlement: Settlement = noSettlement): unknown[] {
  const u = batch.usage
  const c = batch.credits
  return [
    batch.id,
    u.map((x) => x.day),
    u.map((x) => x.keyId),
    u.map((x) => x.model),
    u.map((x) => x.requests),
    u.map((x) => x.promptTokens),
    u.map((x) => x.completionTokens),
    c.map((x) => x.day),
    c.map((x) => x.node),
    c.map((x) => x.model),
    c.map((x) => x.region),
    c.map((x) => x.requests),
    c.map((x) => x.promptTokens),
    c.map((x) => x.completionTokens),
    settlement.gateway,
    settlement.keys,
    settlement.tokens,
    settlement.releasedKeys,
    settlement.released,
  ]
}

const writeLedgerSql = `SELECT garage_write_ledger(${Array.from({ length: 19 }, (_, i) => `$${i + 1}`).join(', ')}) AS written`

/** What the limiter has to write after answers: tokens charged per key, slots given back. */
export interface Settlement {
  gateway: string
  keys: string[]
  tokens: number[]
  /** Slots given back, per key. */
  releasedKeys: string[]
  released: number[]
}

const noSettlement: Settlement = { gateway: '', keys: [], tokens: [], releasedKeys: [], released: [] }

/** The limiter's side of a ledger write that carries its settlement along. */
interface SettlementSource {
  take(): Settlement
  /** The write failed: the settlement goes back to be written later. */
  restore(settlement: Settlement): void
}

export class PostgresStore implements FederationStore {
  readonly kind = 'postgres' as const
  readonly location: string
  private readonly pool: pg.Pool
  private readonly log: Logger
  private down: Error | null = null
  private settlement: SettlementSource | null = null
  private probe: NodeJS.Timeout | null = null
  private closed = false

  constructor(url: string, options: PostgresStoreOptions = {}) {
    this.location = redactUrl(url)
    this.log = (options.logger ?? silentLogger).child({ component: 'federation:postgres' })
    this.pool = new pg.Pool({
      connectionString: url,
      max: options.poolSize ?? poolSize,
      connectionTimeoutMillis: connectTimeoutMs,
      query_timeout: queryTimeoutMs,
      idleTimeoutMillis: 30_000,
      keepAlive: true,
      application_name: 'garage-federation',
      types,
    })
    // An idle connection the server closed (a restart): without a listener it would crash the process.
    this.pool.on('error', (err) => this.markDown(err))
  }

  get available(): boolean {
    return this.down == null
  }

  /** One query; a failure that means the server is away becomes FederationStoreUnavailableError. */
  async query<R extends pg.QueryResultRow>(
    text: string,
    values: unknown[] = [],
    name?: string,
  ): Promise<pg.QueryResult<R>> {
    if (this.closed)
      throw new FederationStoreError(`the store at ${this.location} is closed`, 'FEDERATION_DB_CLOSED')
    try {
      const result = await this.pool.query<R>(name != null ? { name, text, values } : { text, values })
      this.markUp()
      return result
    } catch (err) {
      throw this.translate(err)
    }
  }

  private translate(err: unknown): Error {
    if (!isUnavailableError(err)) return err as Error
    this.markDown(err as Error)
    return new FederationStoreUnavailableError(
      `cannot reach PostgreSQL at ${this.location}: ${(err as Error).message}`,
      'FEDERATION_DB_UNAVAILABLE',
      { cause: err },
    )
  }

  private markDown(err: Error): void {
    if (this.closed) return
    if (this.down == null) this.log.warn({ err: err.message }, 'PostgreSQL cannot be reached; probing')
    this.down = err
    if (this.probe != null) return
    this.probe = setInterval(() => {
      this.pool.query('SELECT 1').then(
        () => this.markUp(),
        () => {},
      )
    }, probeIntervalMs).unref()
  }

  private markUp(): void {
    if (this.down == null) return
    this.down = null
    if (this.probe != null) clearInterval(this.probe)
    this.probe = null
    this.log.info('PostgreSQL is reachable again')
  }

  /** Brings the schema up to date, under an advisory lock so that gateways starting together migrate once. */
  async migrate(): Promise<void> {
    await this.inTransaction(
      async (client) => {
        await client.query('SELECT pg_advisory_xact_lock($1)', [migrationLockId.toString()])
        await client.query('CREATE TABLE IF NOT EXISTS garage_schema (version INTEGER NOT NULL)')
        const { rows } = await client.query<{ version: number }>('SELECT version FROM garage_schema')
        const from = rows[0]?.version ?? 0
        if (from > postgresMigrations.length)
          throw new FederationStoreVersionError(
            `${this.location} has schema version ${from}, newer than this Garage knows (${postgresMigrations.length}); upgrade Garage`,
            'FEDERATION_DB_VERSION',
          )
        for (let v = from; v < postgresMigrations.length; v++)
          await client.query(postgresMigrations[v] as string)
        if (rows.length === 0)
          await client.query('INSERT INTO garage_schema (version) VALUES ($1)', [postgresMigrations.length])
        else await client.query('UPDATE garage_schema SET version = $1', [postgresMigrations.length])
      },
      (err) => {
        if (err instanceof GarageError) return err
        const translated = this.translate(err)
        if (translated instanceof GarageError) return translated
        return new FederationStoreError(
          `cannot set up the schema in ${this.location}: ${(err as Error).message}`,
          'FEDERATION_DB_INVALID',
          { cause: err },
        )
      },
    )
  }

  /**
   * Runs `work` in one transaction on a client of the pool: committed when it resolves, rolled back
   * when it throws (the error goes through `failed`, by default the store's translation).
   */
  private async inTransaction<T>(
    work: (client: pg.PoolClient) => Promise<T>,
    failed: (err: unknown) => Error = (err) => this.translate(err),
  ): Promise<T> {
    let client: pg.PoolClient
    try {
      client = await this.pool.connect()
    } catch (err) {
      throw this.translate(err)
    }
    try {
      await client.query('BEGIN')
      const out = await work(client)
      await client.query('COMMIT')
      return out
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {})
      throw failed(err)
    } finally {
      client.release()
    }
  }

  /** The schema version the database is at. */
  async schemaVersion(): Promise<number> {
    const { rows } = await this.query<{ version: number }>('SELECT version FROM garage_schema')
    return rows[0]?.version ?? 0
  }

  private async oneKey(text: string, values: unknown[], name?: string): Promise<StoredKey | null> {
    const { rows } = await this.query<KeyRow>(text, values, name)
    return rows[0] == null ? null : toKey(rows[0])
  }

  async insertKey(key: StoredKeyWithHash): Promise<boolean> {
    try {
      await this.query(
        'INSERT INTO api_keys (id, name, prefix, hash, rpm, tpm, concurrency, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)',
        [
          key.id,
          key.name,
          key.prefix,
          key.hash,
          key.rpm,
          key.tpm,
          key.concurrency,
          key.createdAt,
          key.revokedAt,
        ],
      )
      return true
    } catch (err) {
      if ((err as { code?: string; constraint?: string }).constraint === 'api_keys_active_name') return false
      throw err
    }
  }

  keyById(id: string): Promise<StoredKey | null> {
    return this.oneKey(`SELECT ${keyColumns} FROM api_keys WHERE id = $1`, [id])
  }

  async keysByPrefixOrName(prefix: string, name: string): Promise<StoredKey[]> {
    const { rows } = await this.query<KeyRow>(
      `SELECT ${keyColumns} FROM api_keys WHERE prefix = $1 OR name = $2 ORDER BY created_at, id`,
      [prefix, name],
    )
    return rows.map(toKey)
  }

  activeKeyByName(name: string): Promise<StoredKey | null> {
    return this.oneKey(`SELECT ${keyColumns} FROM api_keys WHERE name = $1 AND revoked_at IS NULL`, [name])
  }

  activeKeyByHash(hash: string): Promise<StoredKey | null> {
    return this.oneKey(
      `SELECT ${keyColumns} FROM api_keys WHERE hash = $1 AND revoked_at IS NULL`,
      [hash],
      'garage_key_by_hash',
    )
  }

  async listKeys(): Promise<StoredKey[]> {
    const { rows } = await this.query<KeyRow>(`SELECT ${keyColumns} FROM api_keys ORDER BY created_at, id`)
    return rows.map(toKey)
  }

  async revokeKey(id: string, at: number): Promise<void> {
    await this.query('UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL', [at, id])
  }

  /** The limiter whose settlement rides along with each ledger write. */
  attachSettlement(source: SettlementSource | null): void {
    this.settlement = source
  }

  async writeLedger(batch: LedgerBatch): Promise<void> {
    const settlement = this.settlement?.take() ?? noSettlement
    let rows: Array<{ written: boolean }>
    try {
      ;({ rows } = await this.query<{ written: boolean }>(
        writeLedgerSql,
        ledgerArgs(batch, settlement),
        'garage_write_ledger',
      ))
    } catch (err) {
      if (settlement !== noSettlement) this.settlement?.restore(settlement)
      throw err
    }
    if (rows[0]?.written === false)
      this.log.info(
        { batch: batch.id },
        'ledger batch was already written (its commit answer was lost); not added twice',
      )
  }

  async usageByKey(filter: LedgerFilter): Promise<KeyUsage[]> {
    const w = where({ ...filter, node: undefined }, 'u.')
    const { rows } = await this.query<{
      key_id: string
      name: string | null
      model: string
      requests: number
      prompt_tokens: number
      completion_tokens: number
    }>(
      `SELECT u.key_id, k.name, u.model, SUM(u.requests)::BIGINT AS requests,
              SUM(u.prompt_tokens)::BIGINT AS prompt_tokens, SUM(u.completion_tokens)::BIGINT AS completion_tokens
       FROM usage_daily u LEFT JOIN api_keys k ON k.id = u.key_id
       ${w.sql}
       GROUP BY u.key_id, k.name, u.model
       ORDER BY k.name, u.key_id, u.model`,
      w.params,
    )
    return rows.map((r) => ({
      keyId: r.key_id,
      keyName: r.name,
      model: r.model,
      requests: r.requests,
      promptTokens: r.prompt_tokens,
      completionTokens: r.completion_tokens,
    }))
  }

  async creditsByNode(filter: LedgerFilter): Promise<NodeCredit[]> {
    const w = where({ ...filter, keyId: undefined })
    const { rows } = await this.query<{
      node: string
      region: string
      model: string
      requests: number
      prompt_tokens: number
      completion_tokens: number
    }>(
      `SELECT node, region, model, SUM(requests)::BIGINT AS requests, SUM(prompt_tokens)::BIGINT AS prompt_tokens,
              SUM(completion_tokens)::BIGINT AS completion_tokens
       FROM node_credits_daily ${w.sql}
       GROUP BY node, region, model
       ORDER BY node, region, model`,
      w.params,
    )
    return rows.map((r) => ({
      node: r.node,
      region: r.region,
      model: r.model,
      requests: r.requests,
      promptTokens: r.prompt_tokens,
      completionTokens: r.completion_tokens,
    }))
  }

  async recordHolds(region: string, holds: readonly CreditHold[], at: number): Promise<void> {
    if (holds.length === 0) return
    // One statement for every hold: atomic without a transaction of its own.
    await this.query(
      `INSERT INTO node_credit_holds (node, region, since, reason, tokens, seen_at)
       SELECT h.node, $1, h.since, h.reason, h.tokens, $2
       FROM unnest($3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::BIGINT[]) AS h(node, since, reason, tokens)
       ON CONFLICT (node, region, since) DO UPDATE SET reason = excluded.reason, tokens = excluded.tokens, seen_at = excluded.seen_at`,
      [
        region,
        at,
        holds.map((h) => h.node),
        holds.map((h) => h.since),
        holds.map((h) => h.reason),
        holds.map((h) => h.tokens),
      ],
    )
  }

  async holds(filter: { node?: string }): Promise<CreditHold[]> {
    const { rows } = await this.query<{
      node: string
      region: string
      since: number
      reason: string
      tokens: number
    }>(
      `SELECT node, region, since, reason, tokens FROM node_credit_holds
       ${filter.node != null ? 'WHERE node = $1' : ''} ORDER BY since DESC, node, region`,
      filter.node != null ? [filter.node] : [],
    )
    return rows.map((r) => ({
      node: r.node,
      region: r.region,
      since: r.since,
      reason: r.reason,
      tokens: r.tokens,
    }))
  }

  async totals(filter: LedgerFilter): Promise<LedgerTotals> {
    const w = where({ since: filter.since, until: filter.until })
    const { rows } = await this.query<Record<string, number | null>>(
      `SELECT
         (SELECT SUM(requests)::BIGINT FROM usage_daily ${w.sql}) AS requests,
         (SELECT SUM(prompt_tokens)::BIGINT FROM usage_daily ${w.sql}) AS prompt_tokens,
         (SELECT SUM(completion_tokens)::BIGINT FROM usage_daily ${w.sql}) AS completion_tokens,
         (SELECT SUM(requests)::BIGINT FROM node_credits_daily ${w.sql}) AS credited_requests,
         (SELECT SUM(completion_tokens)::BIGINT FROM node_credits_daily ${w.sql}) AS credited_tokens`,
      w.params,
    )
    const r = rows[0] ?? {}
    return {
      requests: r.requests ?? 0,
      promptTokens: r.prompt_tokens ?? 0,
      completionTokens: r.completion_tokens ?? 0,
      creditedRequests: r.credited_requests ?? 0,
      creditedTokens: r.credited_tokens ?? 0,
    }
  }

  createLimiter(options: LimiterOptions = {}): KeyLimiter {
    return new PostgresLimiter(
      this,
      `${hostname()}:${process.pid}:${randomUUID().slice(0, 8)}`,
      this.log,
      options.slotTtlMs ?? slotTtlMs,
    )
  }

  async contents(): Promise<StoreContents> {
    const keys = await this.query<KeyRow>(`SELECT ${keyColumns}, hash FROM api_keys ORDER BY created_at, id`)
    type Counts = { requests: number; prompt_tokens: number; completion_tokens: number }
    const usage = await this.query<Counts & { day: string; key_id: string; model: string }>(
      'SELECT * FROM usage_daily ORDER BY day, key_id, model',
    )
    const credits = await this.query<Counts & { day: string; node: string; model: string; region: string }>(
      'SELECT * FROM node_credits_daily ORDER BY day, node, model, region',
    )
    return {
      keys: keys.rows.map((r) => ({ ...toKey(r), hash: r.hash as string })),
      usage: usage.rows.map((r) => ({
        day: r.day,
        keyId: r.key_id,
        model: r.model,
        requests: r.requests,
        promptTokens: r.prompt_tokens,
        completionTokens: r.completion_tokens,
      })),
      credits: credits.rows.map((r) => ({
        day: r.day,
        node: r.node,
        model: r.model,
        region: r.region,
        requests: r.requests,
        promptTokens: r.prompt_tokens,
        completionTokens: r.completion_tokens,
      })),
    }
  }

  async isEmpty(): Promise<boolean> {
    const { rows } = await this.query<{ n: number }>(
      `SELECT (SELECT COUNT(*) FROM api_keys) + (SELECT COUNT(*) FROM usage_daily)
            + (SELECT COUNT(*) FROM node_credits_daily) AS n`,
    )
    return Number(rows[0]?.n ?? 0) === 0
  }

  async load(contents: StoreContents): Promise<void> {
    await this.inTransaction(async (client) => {
      const k = contents.keys
      await client.query(
        `INSERT INTO api_keys (id, name, prefix, hash, rpm, tpm, concurrency, created_at, revoked_at)
           SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[],
                                $7::BIGINT[], $8::BIGINT[], $9::BIGINT[])`,
        [
          k.map((x) => x.id),
          k.map((x) => x.name),
          k.map((x) => x.prefix),
          k.map((x) => x.hash),
          k.map((x) => x.rpm),
          k.map((x) => x.tpm),
          k.map((x) => x.concurrency),
          k.map((x) => x.createdAt),
          k.map((x) => x.revokedAt),
        ],
      )
      await client.query(
        writeLedgerSql,
        ledgerArgs({ id: randomUUID(), usage: contents.usage, credits: contents.credits }),
      )
    })
  }

  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    if (this.probe != null) clearInterval(this.probe)
    this.probe = null
    await this.pool.end()
  }
}

function buckets(seconds: number[], counts: number[]): Bucket[] {
  return seconds.map((second, i) => ({ second, count: counts[i] ?? 0 }))
}

const unlimited: RateLimitDecision = { ok: true, release: () => {}, headers: {} }

interface Waiter {
  resolve(decision: RateLimitDecision): void
  reject(err: unknown): void
}

/**
 * Per-key limits shared by every gateway on the database. check() is one round trip (garage_admit);
 * tokens charged and slots released are written together once per event-loop turn (garage_settle).
 * Each gateway counts a key's requests in flight in a row of its own that it renews while they run:
 * a gateway that dies stops renewing, and its slots free themselves within
 * slotTtlMs. Time is the database's clock, one for all gateways.
 */
export class PostgresLimiter implements KeyLimiter, SettlementSource {
  private readonly store: PostgresStore
  private readonly gateway: string
  private readonly log: Logger
  /** Per key with a call in flight: the requests waiting for the next one. */
  private readonly waiting = new Map<string, Waiter[]>()
  /** This gateway's requests in flight, per key with a concurrency limit. */
  private readonly live = new Map<string, number>()
  /** Slots given back since the last settlement, per key. */
  private released = new Map<string, number>()
  private tokens = new Map<string, number>()
  private settleScheduled: NodeJS.Immediate | NodeJS.Timeout | null = null
  private settling = false
  private readonly slotTtlMs: number
  private readonly renewTimer: NodeJS.Timeout
  private readonly sweepTimer: NodeJS.Timeout

  constructor(store: PostgresStore, gateway: string, log: Logger, ttlMs: number) {
    this.store = store
    this.gateway = gateway
    this.log = log
    this.slotTtlMs = ttlMs
    this.renewTimer = setInterval(() => void this.renew(), Math.min(slotRenewIntervalMs, ttlMs / 3)).unref()
    this.sweepTimer = setInterval(() => void this.sweep(), sweepIntervalMs).unref()
  }

  /**
   * One call per key in flight at a time: requests of a key that arrive meanwhile wait and go
   * together in the next call (one round trip and one lock for all of them, under load).
   */
  check(key: RateLimitedKey): Promise<RateLimitDecision> | RateLimitDecision {
    const { rpm, tpm, concurrency } = key.limits
    if (rpm == null && tpm == null && concurrency == null) return unlimited
    return new Promise((resolve, reject) => {
      const waiting = this.waiting.get(key.id)
      if (waiting != null) waiting.push({ resolve, reject })
      else {
        this.waiting.set(key.id, [])
        void this.admitInTurn(key, [{ resolve, reject }])
      }
    })
  }

  private async admitInTurn(key: RateLimitedKey, batch: Waiter[]): Promise<void> {
    try {
      const decisions = await this.admit(key, batch.length)
      for (const [i, w] of batch.entries()) w.resolve(decisions[i] as RateLimitDecision)
    } catch (err) {
      for (const w of batch) w.reject(err)
    }
    const next = this.waiting.get(key.id) ?? []
    if (next.length === 0) {
      this.waiting.delete(key.id)
      return
    }
    this.waiting.set(key.id, [])
    void this.admitInTurn(key, next)
  }

  /** Admits the first of COUNT requests of KEY that fit; a decision for each, in order. */
  private async admit(key: RateLimitedKey, count: number): Promise<RateLimitDecision[]> {
    const { rpm, tpm, concurrency } = key.limits
    const { rows } = await this.store.query<AdmitRow>(
      'SELECT * FROM garage_admit($1, $2, $3, $4, $5, $6, $7)',
      [key.id, rpm, tpm, concurrency, this.gateway, this.slotTtlMs, count],
      'garage_admit',
    )
    const row = rows[0] as AdmitRow
    const now = row.now_ms
    const requests = buckets(row.bucket_seconds, row.bucket_requests)
    const tokens = buckets(row.bucket_seconds, row.bucket_tokens)
    const current = Math.floor(now / 1000)
    if (concurrency != null && row.admitted > 0)
      this.live.set(key.id, (this.live.get(key.id) ?? 0) + row.admitted)
    return Array.from({ length: count }, (_, i): RateLimitDecision => {
      // The window as the i-th request finds it: the ones admitted before it in this call added.
      const before = Math.min(i, row.admitted)
      const verdict = decide(
        key.limits,
        {
          requests: before > 0 ? [...requests, { second: current, count: before }] : requests,
          tokens,
          inFlight: row.in_flight + before,
        },
        now,
      )
      if (i >= row.admitted) {
        if (!verdict.ok) return verdict
        // The same comparisons on the same numbers: only a bug gets here. Refuse, as the database did.
        return {
          ok: false,
          reason: 'concurrency',
          retryAfterSeconds: 1,
          headers: { ...verdict.headers, 'retry-after': '1' },
        }
      }
      const { 'retry-after': _refusalOnly, ...headers } = verdict.headers
      return { ok: true, headers, release: concurrency != null ? this.releaser(key.id) : () => {} }
    })
  }

  /** Gives back one slot of KEY_ID, once. */
  private releaser(keyId: string): () => void {
    let released = false
    return () => {
      if (released) return
      released = true
      const left = (this.live.get(keyId) ?? 1) - 1
      if (left > 0) this.live.set(keyId, left)
      else this.live.delete(keyId)
      this.released.set(keyId, (this.released.get(keyId) ?? 0) + 1)
      this.scheduleSettle(0)
    }
  }

  record(keyId: string, tokens: number): void {
    if (!Number.isFinite(tokens) || tokens <= 0) return
    this.tokens.set(keyId, (this.tokens.get(keyId) ?? 0) + Math.round(tokens))
    this.scheduleSettle(0)
  }

  private scheduleSettle(delayMs: number): void {
    if (this.settleScheduled != null || this.settling) return
    const run = (): void => {
      this.settleScheduled = null
      void this.settle()
    }
    this.settleScheduled = delayMs <= 0 ? setImmediate(run) : setTimeout(run, delayMs).unref()
  }

  /** What is pending, taken (a ledger write carries it, or settle() writes it alone). */
  take(): Settlement {
    if (this.tokens.size === 0 && this.released.size === 0) return noSettlement
    const keys = [...this.tokens.keys()].sort()
    const releasedKeys = [...this.released.keys()].sort()
    const settlement = {
      gateway: this.gateway,
      keys,
      tokens: keys.map((k) => this.tokens.get(k) ?? 0),
      releasedKeys,
      released: releasedKeys.map((k) => this.released.get(k) ?? 0),
    }
    this.tokens = new Map()
    this.released = new Map()
    return settlement
  }

  restore(settlement: Settlement): void {
    settlement.keys.forEach((k, i) => {
      this.tokens.set(k, (this.tokens.get(k) ?? 0) + (settlement.tokens[i] ?? 0))
    })
    settlement.releasedKeys.forEach((k, i) => {
      this.released.set(k, (this.released.get(k) ?? 0) + (settlement.released[i] ?? 0))
    })
  }

  /** Writes charged tokens and released slots that no ledger write took; on failure keeps them for a retry a second later. */
  private async settle(): Promise<void> {
    const settlement = this.take()
    if (settlement === noSettlement) return
    this.settling = true
    try {
      await this.store.query(
        'SELECT garage_settle($1, $2, $3, $4, $5)',
        [
          settlement.gateway,
          settlement.keys,
          settlement.tokens,
          settlement.releasedKeys,
          settlement.released,
        ],
        'garage_settle',
      )
    } catch (err) {
      this.restore(settlement)
      this.log.warn({ err: (err as Error).message }, 'rate-limit settle failed; retrying')
      this.settling = false
      this.scheduleSettle(probeIntervalMs)
      return
    }
    this.settling = false
    if (this.tokens.size > 0 || this.released.size > 0) this.scheduleSettle(0)
  }

  private async renew(): Promise<void> {
    if (this.live.size === 0) return
    try {
      await this.store.query(
        'UPDATE rate_slots SET expires_at = floor(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT + $3 WHERE gateway = $1 AND key_id = ANY ($2)',
        [this.gateway, [...this.live.keys()], this.slotTtlMs],
      )
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'renewing concurrency slots failed')
    }
  }

  private async sweep(): Promise<void> {
    try {
      await this.store.query('SELECT garage_sweep()')
    } catch (err) {
      this.log.debug({ err: (err as Error).message }, 'rate-limit sweep failed')
    }
  }

  /** Gives back the slots still held and writes what is pending (best effort: unrenewed slots expire anyway). */
  async close(): Promise<void> {
    this.store.attachSettlement(null)
    clearInterval(this.renewTimer)
    clearInterval(this.sweepTimer)
    if (this.settleScheduled != null) {
      clearImmediate(this.settleScheduled as NodeJS.Immediate)
      clearTimeout(this.settleScheduled as NodeJS.Timeout)
      this.settleScheduled = null
    }
    for (const [k, n] of this.live) this.released.set(k, (this.released.get(k) ?? 0) + n)
    this.live.clear()
    this.settling = false
    await this.settle().catch(() => {})
    if (this.settleScheduled != null) {
      clearImmediate(this.settleScheduled as NodeJS.Immediate)
      clearTimeout(this.settleScheduled as NodeJS.Timeout)
      this.settleScheduled = null
    }
  }
}
