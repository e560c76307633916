import type { DatabaseSync, SQLInputValue, SQLOutputValue } from 'node:sqlite'
import { GarageError } from '../core/errors.ts'
import { type Logger, silentLogger } from '../core/logger.ts'
import { inTransaction } from './store.ts'

/**
 * How long a record may wait in memory before it is written. 0: at the end of the event-loop turn
 * that recorded it, so the records of one turn share a transaction and a SIGKILL loses at most
 * those (a billing ledger must not drop a second of traffic).
 */
export const ledgerFlushIntervalMs = 0

/** After a failed write (disk full, lock held past the busy timeout) the sums wait this long. */
export const ledgerRetryIntervalMs = 1_000

export class LedgerClosedError extends GarageError {}
export class LedgerDateError extends GarageError {}

/** One answered request, as the gateway saw it. */
export interface UsageRecord {
  keyId: string
  model: string
  /** The region whose head routed the request. */
  region: string
  /** PeerId of the node that served it; null or '' when none is known (nothing is credited). */
  node: string | null
  /**
   * A pipeline group's answer: every member, with the share of the tokens its stage earns (the
   * layers it holds); replaces `node`. The tokens are split in proportion, whole tokens, exactly.
   */
  nodes?: Array<{ node: string; weight: number }>
  promptTokens: number
  /** Counted by the head and gateway as they proxied the stream, not claimed by the node. */
  completionTokens: number
  /** When it was answered (default: now); it counts in this instant's UTC day. */
  at?: Date | number
  /**
   * Requests this record counts (default 1). A streamed answer is billed as it streams: its first
   * record counts the request, the ones after it (0) add the tokens relayed since.
   */
  requests?: 0 | 1
}

/** A range of UTC days, both ends included: a Date (its UTC day) or "YYYY-MM-DD". */
export interface LedgerRange {
  since?: Date | string
  until?: Date | string
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

export interface NodeCredit {
  node: string
  region: string
  model: string
  /** The node's latest hold in this region, when a head quarantined it: why, since when, how much. */
  held: { since: string; reason: string; tokens: number } | null
  requests: number
  /** Prompt tokens the node processed (embeddings: all its work), as its usage said, bounded by the gateway. */
  promptTokens: number
  /** Completion tokens the node served, as verified by its head and the gateway. */
  completionTokens: number
}

export interface LedgerTotals {
  requests: number
  promptTokens: number
  completionTokens: number
  /** Requests and tokens credited to nodes (requests no node served are not credited). */
  creditedRequests: number
  creditedTokens: number
}

export interface UsageLedgerOptions {
  now?: () => number
  flushIntervalMs?: number
  retryIntervalMs?: number
  /** Where a failed background flush is reported (it is retried after retryIntervalMs). */
  logger?: Logger
}

interface PendingUsage {
  day: string
  keyId: string
  model: string
  requests: number
  promptTokens: number
  completionTokens: number
}

interface PendingCredit {
  day: string
  node: string
  model: string
  region: string
  requests: number
  promptTokens: number
  completionTokens: number
}

/** The UTC day of an instant, "YYYY-MM-DD": the ledger's bucket. */
export function utcDay(at: Date | number): string {
  const date = at instanceof Date ? at : new Date(at)
  if (Number.isNaN(date.getTime())) throw new LedgerDateError(`${String(at)} is not a date`, 'LEDGER_DATE')
  return date.toISOString().slice(0, 10)
}

/** "YYYY-MM-DD" or an ISO date-time → its UTC day; anything else is a LedgerDateError. */
export function parseLedgerDay(text: string): string {
  if (/^\d{4}-\d{2}-\d{2}$/.test(text)) {
    const day = utcDay(new Date(`${text}T00:00:00Z`))
    if (day === text) return day
  } else if (/^\d{4}-\d{2}-\d{2}T/.test(text)) {
    const date = new Date(text)
    if (!Number.isNaN(date.getTime())) return utcDay(date)
  }
  throw new LedgerDateError(`${JSON.stringify(text)} is not a date like 2025-01-31`, 'LEDGER_DATE')
}

function dayOf(value: Date | string): string {
  return typeof value === 'string' ? parseLedgerDay(value) : utcDay(value)
}

function tokenCount(value: number, what: string): number {
  if (!Number.isSafeInteger(value) || value < 0)
    throw new RangeError(`${what} must be a whole number of at least 0, not ${value}`)
  return value
}

const n = (v: SQLOutputValue | undefined): number => Number(v ?? 0)

/**
 * Usage per API key and credits per node, per model and UTC day, in the federation database.
 * record() only adds to an in-memory sum; one transaction writes the sums of an event-loop turn
 * right after it (and on flush() or close()), so the request path never waits for SQLite and a crash
 * loses at most one turn's records. Rows are added to, never replaced, so several gateway processes
 * can share the file.
 */
export class UsageLedger {
  private readonly db: DatabaseSync
  private readonly now: () => number
  private readonly flushIntervalMs: number
  private readonly retryIntervalMs: number
  private readonly log: Logger
  private usage = new Map<string, PendingUsage>()
  private credits = new Map<string, PendingCredit>()
  /** Cancels the scheduled write, when one is scheduled. */
  private cancelScheduled: (() => void) | null = null
  private closed = false
  private day = ''
  private dayStartMs = Number.NaN

  constructor(db: DatabaseSync, options: UsageLedgerOptions = {}) {
    this.db = db
    this.now = options.now ?? Date.now
    this.flushIntervalMs = options.flushIntervalMs ?? ledgerFlushIntervalMs
    this.retryIntervalMs = options.retryIntervalMs ?? ledgerRetryIntervalMs
    this.log = options.logger ?? silentLogger
  }

  record(entry: UsageRecord): void {
    if (this.closed) throw new LedgerClosedError('the usage ledger is closed', 'LEDGER_CLOSED')
    const prompt = tokenCount(entry.promptTokens, 'promptTokens')
    const completion = tokenCount(entry.completionTokens, 'completionTokens')
    const day = entry.at != null ? utcDay(entry.at) : this.today()
    const usageKey = `${day}\u0000${entry.keyId}\u0000${entry.model}`
    const usage = this.usage.get(usageKey) ?? {
      day,
      keyId: entry.keyId,
      model: entry.model,
      requests: 0,
      promptTokens: 0,
      completionTokens: 0,
    }
    const requests = entry.requests ?? 1
    usage.requests += requests
    usage.promptTokens += prompt
    usage.completionTokens += completion
    this.usage.set(usageKey, usage)
    const shares =
      entry.nodes != null && entry.nodes.length > 0
        ? splitByWeight(prompt, completion, entry.nodes)
        : entry.node != null && entry.node !== ''
          ? [{ node: entry.node, prompt, completion }]
          : []
    for (const share of shares) {
      const creditKey = `${day}\u0000${share.node}\u0000${entry.model}\u0000${entry.region}`
      const credit = this.credits.get(creditKey) ?? {
        day,
        node: share.node,
        model: entry.model,
        region: entry.region,
        requests: 0,
        promptTokens: 0,
        completionTokens: 0,
      }
      credit.requests += requests
      credit.promptTokens += share.prompt
      credit.completionTokens += share.completion
      this.credits.set(creditKey, credit)
    }
    this.schedule()
  }

  /** The current UTC day, formatted once per day rather than once per request. */
  private today(): string {
    const now = this.now()
    if (now >= this.dayStartMs && now < this.dayStartMs + 86_400_000) return this.day
    this.day = utcDay(now)
    this.dayStartMs = Math.floor(now / 86_400_000) * 86_400_000
    return this.day
  }

  /** Sums recorded but not yet written (one per key, model and day, and per node, model, region and day). */
  get pending(): number {
    return this.usage.size + this.credits.size
  }

  /** Writes every pending sum in one transaction; on failure they stay pending, are retried after retryIntervalMs, and the error is thrown. */
  flush(): void {
    this.cancelTimer()
    if (this.pending === 0) return
    try {
      this.write()
    } catch (err) {
      this.schedule(this.retryIntervalMs)
      throw err
    }
    this.usage = new Map()
    this.credits = new Map()
  }

  private write(): void {
    inTransaction(this.db, () => {
      const addUsage = this.db.prepare(
        `INSERT INTO usage_daily (day, key_id, model, requests, prompt_tokens, completion_tokens)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (day, key_id, model) DO UPDATE SET
           requests = requests + excluded.requests,
           prompt_tokens = prompt_tokens + excluded.prompt_tokens,
           completion_tokens = completion_tokens + excluded.completion_tokens`,
      )
      for (const u of this.usage.values())
        addUsage.run(u.day, u.keyId, u.model, u.requests, u.promptTokens, u.completionTokens)
      const addCredit = this.db.prepare(
        `INSERT INTO node_credits_daily (day, node, model, region, requests, prompt_tokens, completion_tokens)
         VALUES (?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (day, node, model, region) DO UPDATE SET
           requests = requests + excluded.requests,
           prompt_tokens = prompt_tokens + excluded.prompt_tokens,
           completion_tokens = completion_tokens + excluded.completion_tokens`,
      )
      for (const c of this.credits.values())
        addCredit.run(c.day, c.node, c.model, c.region, c.requests, c.promptTokens, c.completionTokens)
    })
  }

  /** Flushes and stops; record() afterwards throws LedgerClosedError. The database stays open (its owner closes it). */
  close(): void {
    if (this.closed) return
    this.flush()
    this.closed = true
  }

  /** Usage per key and model over the range (pending records included), by key name then model. */
  usageByKey(query: LedgerRange & { keyId?: string } = {}): KeyUsage[] {
    this.flush()
    const { where, params } = rangeFilter(query, 'u.day')
    if (query.keyId != null) {
      where.push('u.key_id = ?')
      params.push(query.keyId)
    }
    return this.db
      .prepare(
        `SELECT u.key_id, k.name, u.model, SUM(u.requests) AS requests,
                SUM(u.prompt_tokens) AS prompt_tokens, SUM(u.completion_tokens) AS completion_tokens
         FROM usage_daily u LEFT JOIN api_keys k ON k.id = u.key_id
         ${where.length > 0 ? `WHERE ${where.join(' AND ')}` : ''}
         GROUP BY u.key_id, u.model
         ORDER BY k.name, u.key_id, u.model`,
      )
      .all(...params)
      .map((r) => ({
        keyId: String(r.key_id),
        keyName: r.name == null ? null : String(r.name),
        model: String(r.model),
        requests: n(r.requests),
        promptTokens: n(r.prompt_tokens),
        completionTokens: n(r.completion_tokens),
      }))
  }

  /** Records the holds a region's head reports now (again and again: each is kept once, updated). */
  recordHolds(region: string, holds: readonly CreditHold[], now = Date.now()): void {
    const upsert = this.db.prepare(
      `INSERT INTO node_credit_holds (node, region, since, reason, tokens, seen_at) VALUES (?, ?, ?, ?, ?, ?)
       ON CONFLICT (node, region, since) DO UPDATE SET reason = excluded.reason, tokens = excluded.tokens, seen_at = excluded.seen_at`,
    )
    for (const h of holds) upsert.run(h.node, region, h.since, h.reason, h.tokens, now)
  }

  /** Every hold recorded, newest first (for one node when given). */
  holds(query: { node?: string } = {}): CreditHold[] {
    return this.db
      .prepare(
        `SELECT node, region, since, reason, tokens FROM node_credit_holds
         ${query.node != null ? 'WHERE node = ?' : ''} ORDER BY since DESC`,
      )
      .all(...(query.node != null ? [query.node] : []))
      .map((r) => ({
        node: String(r.node),
        region: String(r.region),
        since: n(r.since),
        reason: String(r.reason),
        tokens: n(r.tokens),
      }))
  }

  /** Credits per node, region and model over the range (pending records included), with any hold. */
  creditsByNode(query: LedgerRange & { node?: string } = {}): NodeCredit[] {
    const latest = new Map<string, CreditHold>()
    for (const h of this.holds(query.node != null ? { node: query.node } : {}))
      if (!latest.has(`${h.node}\u0000${h.region}`)) latest.set(`${h.node}\u0000${h.region}`, h)
    return this.#credits(query).map((c) => {
      const h = latest.get(`${c.node}\u0000${c.region}`)
      return {
        ...c,
        held:
          h == null ? null : { since: new Date(h.since).toISOString(), reason: h.reason, tokens: h.tokens },
      }
    })
  }

  #credits(query: LedgerRange & { node?: string }): Omit<NodeCredit, 'held'>[] {
    this.flush()
    const { where, params } = rangeFilter(query, 'day')
    if (query.node != null) {
      where.push('node = ?')
      params.push(query.node)
    }
    return this.db
      .prepare(
        `SELECT node, region, model, SUM(requests) AS requests, SUM(prompt_tokens) AS prompt_tokens,
                SUM(completion_tokens) AS completion_tokens
         FROM node_credits_daily
         ${where.length > 0 ? `WHERE ${where.join(' AND ')}` : ''}
         GROUP BY node, region, model
         ORDER BY node, region, model`,
      )
      .all(...params)
      .map((r) => ({
        node: String(r.node),
        region: String(r.region),
        model: String(r.model),
        requests: n(r.requests),
        promptTokens: n(r.prompt_tokens),
        completionTokens: n(r.completion_tokens),
      }))
  }

  /** Everything over the range: what keys used and what nodes were credited. */
  totals(range: LedgerRange = {}): LedgerTotals {
    this.flush()
    const usage = rangeFilter(range, 'day')
    const credit = rangeFilter(range, 'day')
    const u = this.db
      .prepare(
        `SELECT SUM(requests) AS requests, SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens
         FROM usage_daily ${usage.where.length > 0 ? `WHERE ${usage.where.join(' AND ')}` : ''}`,
      )
      .get(...usage.params)
    const c = this.db
      .prepare(
        `SELECT SUM(requests) AS requests, SUM(completion_tokens) AS completion_tokens
         FROM node_credits_daily ${credit.where.length > 0 ? `WHERE ${credit.where.join(' AND ')}` : ''}`,
      )
      .get(...credit.params)
    return {
      requests: n(u?.requests),
      promptTokens: n(u?.prompt_tokens),
      completionTokens: n(u?.completion_tokens),
      creditedRequests: n(c?.requests),
      creditedTokens: n(c?.completion_tokens),
    }
  }

  /** One timer per batch, made by the first record after a flush: an idle gateway has none. */
  private schedule(delayMs = this.flushIntervalMs): void {
    if (this.cancelScheduled != null) return
    const run = (): void => {
      this.cancelScheduled = null
      try {
        this.flush()
      } catch (err) {
        // flush() kept the sums and set the next try.
        this.log.warn({ err, pending: this.pending }, 'usage ledger flush failed; retrying')
      }
    }
    // Pending sums must not keep a stopping process alive: close() writes them.
    if (delayMs <= 0) {
      const immediate = setImmediate(run).unref()
      this.cancelScheduled = () => clearImmediate(immediate)
    } else {
      const timeout = setTimeout(run, delayMs).unref()
      this.cancelScheduled = () => clearTimeout(timeout)
    }
  }

  private cancelTimer(): void {
    this.cancelScheduled?.()
    this.cancelScheduled = null
  }
}

function rangeFilter(range: LedgerRange, column: string): { where: string[]; params: SQLInputValue[] } {
  const where: string[] = []
  const params: SQLInputValue[] = []
  if (range.since != null) {
    where.push(`${column} >= ?`)
    params.push(dayOf(range.since))
  }
  if (range.until != null) {
    where.push(`${column} <= ?`)
    params.push(dayOf(range.until))
  }
  return { where, params }
}

/**
 * Tokens split among nodes in proportion to their weights, in whole tokens that add up exactly
 * (largest remainders first, ties to the earlier node).
 */
export function splitByWeight(
  prompt: number,
  completion: number,
  nodes: ReadonlyArray<{ node: string; weight: number }>,
): Array<{ node: string; prompt: number; completion: number }> {
  const weights = nodes.map((n) => (Number.isFinite(n.weight) && n.weight > 0 ? n.weight : 0))
  const total = weights.reduce((a, b) => a + b, 0)
  const split = (tokens: number): number[] => {
    if (total === 0) return nodes.map((_, i) => (i === 0 ? tokens : 0))
    const exact = weights.map((w) => (tokens * w) / total)
    const out = exact.map(Math.floor)
    let left = tokens - out.reduce((a, b) => a + b, 0)
    const order = exact
      .map((x, i) => [x - Math.floor(x), i] as const)
      .sort((a, b) => b[0] - a[0] || a[1] - b[1])
    for (const [, i] of order) {
      if (left <= 0) break
      out[i]! += 1
      left--
    }
    return out
  }
  const p = split(prompt)
  const c = split(completion)
  return nodes.map((n, i) => ({ node: n.node, prompt: p[i]!, completion: c[i]! }))
}
