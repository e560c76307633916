import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { GarageError } from '../core/errors.ts'
import { type Logger, silentLogger } from '../core/logger.ts'
import type {
  CreditHold,
  CreditSum,
  FederationStore,
  KeyUsage,
  LedgerBatch,
  LedgerFilter,
  LedgerTotals,
  NodeCredit as StoredNodeCredit,
  UsageSum,
} from './store.ts'

export type { CreditHold, KeyUsage, LedgerTotals } from './store.ts'

/**
 * How long a record may wait in memory before it is written. 0: at the end of the event-loop turn
 * that recorded it, so the records of one turn share a transaction and a SIGKILL loses at most
 * those (a billing ledger must not drop a second of traffic).
 */
export const ledgerFlushIntervalMs = 0

/** After a failed write (disk full, lock held past the busy timeout, PostgreSQL away) the sums wait this long. */
export const ledgerRetryIntervalMs = 1_000

/**
 * The most sums (one per key, model and day, and one per node, model, region and day) held unwritten.
 * Past it the gateway refuses new requests (503 store_unavailable) until they are written: memory
 * stays bounded and no usage is dropped. The sums of the requests in flight when the store went
 * away still land in it (they are a few per request and the gateway admits no new ones meanwhile).
 */
export const maxPendingSums = 10_000

/** How long close() keeps retrying a write the store refuses before it gives up and says what is lost. */
export const ledgerCloseTimeoutMs = 10_000

export class LedgerClosedError extends GarageError {}
export class LedgerDateError extends GarageError {}
/** close() could not write every sum: the message holds them, for an operator to add by hand. */
export class LedgerUnwrittenError extends GarageError {}

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

/** A node's credits, with its latest hold in the region when a head quarantined it. */
export interface NodeCredit extends StoredNodeCredit {
  /** The node's latest hold in this region, when a head quarantined it: why, since when, how much. */
  held: { since: string; reason: string; tokens: number } | null
}

export interface UsageLedgerOptions {
  now?: () => number
  flushIntervalMs?: number
  retryIntervalMs?: number
  /** Unwritten sums past which backlogFull is true (default maxPendingSums). */
  maxPendingSums?: number
  /** Where a failed background flush is reported (it is retried after retryIntervalMs). */
  logger?: Logger
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

/** Sorted, so two gateways adding to the same rows lock them in the same order (no deadlock). */
function sortedSums<T extends object>(sums: Iterable<T>, key: (t: T) => string): T[] {
  return [...sums].sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0))
}

/**
 * Usage per API key and credits per node, per model and UTC day, in the federation store.
 * record() only adds to an in-memory sum; the sums of an event-loop turn are written in one
 * transaction right after it (and on flush() or close()), so the request path never waits for the
 * database and a crash loses at most the writes in progress. While a write is under way the next
 * turns' sums gather and go in the next one. A failed write keeps its batch (and its id, so a
 * commit whose answer was lost is not added twice) and retries it after retryIntervalMs. Rows are
 * added to, never replaced, so several gateway processes can share the store.
 */
export class UsageLedger {
  private readonly store: Pick<
    FederationStore,
    'writeLedger' | 'usageByKey' | 'creditsByNode' | 'totals' | 'recordHolds' | 'holds'
  >
  private readonly now: () => number
  private readonly flushIntervalMs: number
  private readonly retryIntervalMs: number
  private readonly maxPending: number
  private readonly log: Logger
  private usage = new Map<string, UsageSum>()
  private credits = new Map<string, CreditSum>()
  /** A batch taken from the sums whose write has not succeeded yet (written first, with its id). */
  private unconfirmed: LedgerBatch | null = null
  /** The writes, one after another. */
  private chain: Promise<void> = Promise.resolve()
  private writing = 0
  /** Cancels the scheduled write, when one is scheduled. */
  private cancelScheduled: (() => void) | null = null
  private closed = false
  private day = ''
  private dayStartMs = Number.NaN

  constructor(
    store: Pick<
      FederationStore,
      'writeLedger' | 'usageByKey' | 'creditsByNode' | 'totals' | 'recordHolds' | 'holds'
    >,
    options: UsageLedgerOptions = {},
  ) {
    this.store = store
    this.now = options.now ?? Date.now
    this.flushIntervalMs = options.flushIntervalMs ?? ledgerFlushIntervalMs
    this.retryIntervalMs = options.retryIntervalMs ?? ledgerRetryIntervalMs
    this.maxPending = options.maxPendingSums ?? maxPendingSums
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
    const batch = this.unconfirmed
    return (
      this.usage.size + this.credits.size + (batch == null ? 0 : batch.usage.length + batch.credits.length)
    )
  }

  /** As many sums wait as the ledger holds: the gateway takes no new request until some are written. */
  get backlogFull(): boolean {
    return this.pending >= this.maxPending
  }

  /**
   * Writes every sum recorded before the call (after the writes already under way); on failure they
   * stay pending, are retried after retryIntervalMs, and the error is thrown.
   */
  flush(): Promise<void> {
    this.cancelTimer()
    const run = this.chain.then(() => this.writePending())
    this.chain = run.catch(() => {})
    return run
  }

  private async writePending(): Promise<void> {
    if (this.unconfirmed != null) await this.write(this.unconfirmed)
    if (this.usage.size + this.credits.size === 0) return
    this.unconfirmed = {
      id: randomUUID(),
      usage: sortedSums(this.usage.values(), (u) => `${u.day}\u0000${u.keyId}\u0000${u.model}`),
      credits: sortedSums(
        this.credits.values(),
        (c) => `${c.day}\u0000${c.node}\u0000${c.model}\u0000${c.region}`,
      ),
    }
    this.usage = new Map()
    this.credits = new Map()
    await this.write(this.unconfirmed)
  }

  private async write(batch: LedgerBatch): Promise<void> {
    this.writing++
    try {
      await this.store.writeLedger(batch)
      if (this.unconfirmed === batch) this.unconfirmed = null
    } catch (err) {
      this.schedule(this.retryIntervalMs)
      throw err
    } finally {
      this.writing--
      // What was recorded meanwhile goes in the next write (a failed one has its retry scheduled).
      if (this.writing === 0 && this.usage.size + this.credits.size > 0) this.schedule()
    }
  }

  /**
   * Writes what is pending and stops; record() afterwards throws LedgerClosedError. A store that
   * refuses the write is retried for up to timeoutMs; then LedgerUnwrittenError names the sums lost.
   * The store stays open (its owner closes it).
   */
  async close(timeoutMs = 0): Promise<void> {
    if (this.closed) return
    this.closed = true
    const deadline = performance.now() + timeoutMs
    for (;;) {
      try {
        await this.flush()
        this.cancelTimer()
        return
      } catch (err) {
        if (performance.now() + this.retryIntervalMs > deadline) {
          this.cancelTimer()
          const lost = {
            unconfirmed: this.unconfirmed,
            usage: [...this.usage.values()],
            credits: [...this.credits.values()],
          }
          throw new LedgerUnwrittenError(
            `the usage ledger could not write ${this.pending} sums before stopping (${(err as Error).message}): ${JSON.stringify(lost)}`,
            'LEDGER_UNWRITTEN',
            { cause: err },
          )
        }
        await sleep(this.retryIntervalMs)
      }
    }
  }

  /** Usage per key and model over the range (pending records included), by key name then model. */
  async usageByKey(query: LedgerRange & { keyId?: string } = {}): Promise<KeyUsage[]> {
    const filter = filterOf(query)
    await this.flush()
    return this.store.usageByKey({ ...filter, ...(query.keyId != null ? { keyId: query.keyId } : {}) })
  }

  /** Records the holds a region's head reports now (again and again: each is kept once, updated). */
  async recordHolds(region: string, holds: readonly CreditHold[], now = Date.now()): Promise<void> {
    await this.store.recordHolds(region, holds, now)
  }

  /** Every hold recorded, newest first (for one node when given). */
  async holds(query: { node?: string } = {}): Promise<CreditHold[]> {
    return this.store.holds(query)
  }

  /** Credits per node, region and model over the range (pending records included), with any hold. */
  async creditsByNode(query: LedgerRange & { node?: string } = {}): Promise<NodeCredit[]> {
    const filter = filterOf(query)
    await this.flush()
    const credits = await this.store.creditsByNode({
      ...filter,
      ...(query.node != null ? { node: query.node } : {}),
    })
    const latest = new Map<string, CreditHold>()
    for (const h of await this.holds(query.node != null ? { node: query.node } : {}))
      if (!latest.has(`${h.node}\u0000${h.region}`)) latest.set(`${h.node}\u0000${h.region}`, h)
    return credits.map((c) => {
      const h = latest.get(`${c.node}\u0000${c.region}`)
      return {
        ...c,
        held:
          h == null ? null : { since: new Date(h.since).toISOString(), reason: h.reason, tokens: h.tokens },
      }
    })
  }

  /** Everything over the range: what keys used and what nodes were credited. */
  async totals(range: LedgerRange = {}): Promise<LedgerTotals> {
    const filter = filterOf(range)
    await this.flush()
    return this.store.totals(filter)
  }

  /** One timer per batch, made by the first record after a write: an idle gateway has none. */
  private schedule(delayMs = this.flushIntervalMs): void {
    if (this.cancelScheduled != null) return
    // A write under way schedules the next when it ends (its sums gather meanwhile).
    if (this.writing > 0 && delayMs === this.flushIntervalMs) return
    const run = (): void => {
      this.cancelScheduled = null
      this.flush().catch((err: unknown) => {
        // write() kept the sums and set the next try.
        this.log.warn({ err, pending: this.pending }, 'usage ledger write failed; retrying')
      })
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

/** A range's days as the store filters them. */
function filterOf(range: LedgerRange): LedgerFilter {
  return {
    ...(range.since != null ? { since: dayOf(range.since) } : {}),
    ...(range.until != null ? { until: dayOf(range.until) } : {}),
  }
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
