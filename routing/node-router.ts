/**
 * The regional router: which node of a model's pool takes the next request.
 *
 * Score = (inflight + 1) / capacity, lowest wins. `inflight` is the head's own count of requests it
 * has outstanding at the node; `capacity` is the decode throughput the head MEASURED on requests it
 * proxied (tokens/s per sequence, an EWMA, times the node's parallel slots), never what the node
 * claims. (inflight + 1) / capacity is roughly the time the new request would take to finish there,
 * so the pick equalises expected latency: under saturation requests queue in proportion to capacity
 * and each node's share of completed requests follows its capacity.
 *
 * Scores within 1% tie; ties go to lower KV-cache usage, then fewer waiting (from telemetry), then
 * chance. A node is never picked when it is not 'serving', when the caller excludes it (already tried
 * for this request), or when its circuit breaker is open.
 *
 * Each node has a circuit breaker (routing/breaker.ts), fed only by failure() and success().
 *
 * Usage: `const peer = router.pick(model, { exclude })`, then at once (same tick)
 * `const ticket = router.begin(peer)`; `ticket.firstByte()` when the stream starts,
 * `ticket.end({ ok, completionTokens })` when it ends, and `router.success(peer)` or `router.failure(peer)`
 * when the node proved healthy or broken (not when the client went away or sent a bad request).
 */
import type { NodeServingState } from '../mesh/region-messages.ts'
import { type BreakerState, CircuitBreaker } from './breaker.ts'
import { ewma, median } from './stats.ts'
/** Weight of the newest decode-rate sample in the EWMA. */
export const rateEwmaAlpha = 0.2
/** Shorter requests say more about latency than about decode speed. */
export const minMeasuredTokens = 4
export const minMeasuredDecodeMs = 5
/** Scores this close (relative) count as equal, so load signals decide. */
const scoreTieTolerance = 0.01

/**
 * A measurement marks the pool's median stale; it is re-sorted at most this often (it moves slowly,
 * and re-sorting a large pool after every finished request made pick() O(n log n)).
 */
export const medianRefreshMs = 1_000

export type { BreakerState }

export class UnknownNodeError extends Error {
  override name = 'UnknownNodeError'
}

export class InvalidNodeSlotsError extends Error {
  override name = 'InvalidNodeSlotsError'
}

export interface RegionalRouterInit {
  /** Milliseconds; tests inject a simulated clock. */
  now?: () => number
  /** Uniform in [0, 1); breaks exact ties. */
  random?: () => number
}

export interface NodeRegistration {
  model: string
  /** Sequences the node's engine decodes in parallel. */
  slots: number
  state: NodeServingState
}

export interface NodeLoad {
  running: number
  waiting: number
  /** 0..1 */
  kvCacheUsage: number
  state: NodeServingState
}

export interface RequestOutcome {
  /** The node answered in full; only such requests are measured. */
  ok: boolean
  /** Completion tokens the head verified for this request. */
  completionTokens: number
}

export interface RequestTicket {
  readonly peerId: string
  /** The first streamed byte arrived: decode time is measured from here (never call it for a buffered body). */
  firstByte(): void
  /** Completion tokens seen on the stream since the last call (an increment); implies the first byte. */
  tokens(n: number): void
  /** Ends the request (idempotent): frees its inflight slot and measures the decode rate when ok. */
  end(outcome: RequestOutcome): void
}

export interface RouterNodeSnapshot {
  peerId: string
  model: string
  state: NodeServingState
  slots: number
  inflight: number
  /** Tokens per second the head uses for this node (measured, or the pool's stand-in). */
  capacity: number
  /** False while capacity is the pool median stand-in. */
  measured: boolean
  /** EWMA of per-sequence decode rate (tokens/s), null before the first measurement. */
  decodeRate: number | null
  breaker: BreakerState
  consecutiveFailures: number
  /** Completion tokens the head saw streamed from this node (ticket.tokens). */
  tokensSeen: number
  running: number
  waiting: number
  kvCacheUsage: number
}

interface NodeRecord {
  peerId: string
  model: string
  slots: number
  state: NodeServingState
  running: number
  waiting: number
  kvCacheUsage: number
  inflight: number
  /** Requests running at the node that another router sent (the federation's direct path). */
  outside: number
  decodeRate: number | null
  tokensSeen: number
  breaker: CircuitBreaker
}

interface Pool {
  nodes: Set<NodeRecord>
  /** Median measured capacity, recomputed lazily after a measurement or membership change. */
  median: number | null
  medianStale: boolean
  /** When the median was last computed (the router's clock). */
  medianAt: number
}

export class RegionalRouter {
  readonly #now: () => number
  readonly #random: () => number
  readonly #nodes = new Map<string, NodeRecord>()
  readonly #pools = new Map<string, Pool>()
  /** Nodes the integrity check quarantined: never picked, kept across a leave and a rejoin. */
  readonly #held = new Set<string>()

  constructor(init: RegionalRouterInit = {}) {
    this.#now = init.now ?? (() => performance.now())
    this.#random = init.random ?? Math.random
  }

  /** Adds a node or updates its registration; a model change forgets its measurements. */
  upsert(peerId: string, registration: NodeRegistration): void {
    const { model, slots, state } = registration
    if (!Number.isInteger(slots) || slots < 1) {
      throw new InvalidNodeSlotsError(`slots must be a positive integer, got ${slots} for ${peerId}`)
    }
    let node = this.#nodes.get(peerId)
    if (node == null) {
      node = {
        peerId,
        model,
        slots,
        state,
        running: 0,
        waiting: 0,
        kvCacheUsage: 0,
        inflight: 0,
        outside: 0,
        decodeRate: null,
        tokensSeen: 0,
        breaker: new CircuitBreaker(),
      }
      this.#nodes.set(peerId, node)
      this.#poolOf(model).nodes.add(node)
    } else if (node.model !== model) {
      this.#leavePool(node)
      node.model = model
      // A rate measured on another model says nothing about this one.
      node.decodeRate = null
      this.#poolOf(model).nodes.add(node)
    }
    node.slots = slots
    node.state = state
    this.#markStale(model)
  }

  /**
   * The node (re)joined: a new process, or one the head had forgotten. Its breaker closes: failures
   * of the incarnation that died say nothing of this one, and a breaker opened by a kill kept the
   * restarted node idle for up to its 30 s backoff.
   */
  joined(peerId: string): void {
    this.#nodes.get(peerId)?.breaker.success()
  }

  remove(peerId: string): boolean {
    const node = this.#nodes.get(peerId)
    if (node == null) return false
    this.#nodes.delete(peerId)
    this.#leavePool(node)
    return true
  }

  /** Holds a node back from every pick (quarantine), or lets it serve again. */
  hold(peerId: string, held: boolean): void {
    if (held) this.#held.add(peerId)
    else this.#held.delete(peerId)
  }

  held(peerId: string): boolean {
    return this.#held.has(peerId)
  }

  /** Load signals from the node's telemetry; false for a node the router does not know. */
  updateTelemetry(peerId: string, load: NodeLoad): boolean {
    const node = this.#nodes.get(peerId)
    if (node == null) return false
    node.running = load.running
    node.waiting = load.waiting
    node.kvCacheUsage = load.kvCacheUsage
    node.state = load.state
    return true
  }

  /** The best node for a new request of `model`, or null when none can take it. */
  pick(model: string, options: { exclude?: ReadonlySet<string> } = {}): string | null {
    const pool = this.#pools.get(model)
    if (pool == null) return null
    const now = this.#now()
    const exclude = options.exclude
    const candidates: Array<{ node: NodeRecord; score: number }> = []
    let best = Number.POSITIVE_INFINITY
    for (const node of pool.nodes) {
      if (node.state !== 'serving' || exclude?.has(node.peerId) || this.#held.has(node.peerId)) continue
      if (!node.breaker.admits(now)) continue
      const score = (node.inflight + node.outside + 1) / this.#capacity(node, pool)
      candidates.push({ node, score })
      if (score < best) best = score
    }
    if (candidates.length === 0) return null
    const limit = best * (1 + scoreTieTolerance)
    let tied: NodeRecord[] = []
    for (const c of candidates) {
      if (c.score > limit) continue
      const first = tied[0]
      if (first == null) {
        tied.push(c.node)
        continue
      }
      const order = c.node.kvCacheUsage - first.kvCacheUsage || c.node.waiting - first.waiting
      if (order < 0) tied = [c.node]
      else if (order === 0) tied.push(c.node)
    }
    const index = Math.min(tied.length - 1, Math.floor(this.#random() * tied.length))
    return tied[index]!.peerId
  }

  /** Counts a request as outstanding at the node until its ticket ends. */
  begin(peerId: string): RequestTicket {
    const node = this.#nodes.get(peerId)
    if (node == null) throw new UnknownNodeError(`no node ${peerId} in the router`)
    node.inflight++
    const token = node.breaker.begin(this.#now())
    let firstByteAt: number | null = null
    let ended = false
    return {
      peerId,
      firstByte: () => {
        if (firstByteAt == null && !ended) firstByteAt = this.#now()
      },
      tokens: (n: number) => {
        if (ended || !(n > 0)) return
        if (firstByteAt == null) firstByteAt = this.#now()
        if (this.#nodes.get(peerId) === node) node.tokensSeen += n
      },
      end: (outcome: RequestOutcome) => {
        if (ended) return
        ended = true
        // The node may have left (or left and rejoined as a new record) meanwhile.
        if (this.#nodes.get(peerId) !== node) return
        node.inflight--
        node.breaker.end(token)
        if (outcome.ok && firstByteAt != null) this.#measure(node, outcome.completionTokens, firstByteAt)
      },
    }
  }

  /** The node failed a request (unreachable, 5xx, broke mid-stream). */
  failure(peerId: string): void {
    this.#nodes.get(peerId)?.breaker.failure(this.#now())
  }

  /** The node answered a request in full. */
  success(peerId: string): void {
    this.#nodes.get(peerId)?.breaker.success()
  }

  /** Tokens per second the router assumes for the node; 0 for an unknown node. */
  capacity(peerId: string): number {
    const node = this.#nodes.get(peerId)
    if (node == null) return 0
    return this.#capacity(node, this.#pools.get(node.model)!)
  }

  /** Requests outstanding at the node: this router's and those reported from outside. */
  inflight(peerId: string): number {
    const node = this.#nodes.get(peerId)
    return node == null ? 0 : node.inflight + node.outside
  }

  /** Requests another router has running at the node now (the direct path's holders report them). */
  outside(peerId: string, requests: number): void {
    const node = this.#nodes.get(peerId)
    if (node != null) node.outside = Math.max(0, requests)
  }

  /**
   * A request another router ran at the node ended (the direct path's completion reports): it counts
   * toward the node's breaker and measured rate as this router's own do. Only requests that got an
   * answer are reported; `decodeMs` runs from the first byte to the end.
   */
  observed(peerId: string, outcome: RequestOutcome & { decodeMs: number }): void {
    const node = this.#nodes.get(peerId)
    if (node == null) return
    if (!outcome.ok) {
      node.breaker.failure(this.#now())
      return
    }
    node.breaker.success()
    node.tokensSeen += outcome.completionTokens
    this.#measure(node, outcome.completionTokens, this.#now() - outcome.decodeMs)
  }

  breakerState(peerId: string): BreakerState | null {
    const node = this.#nodes.get(peerId)
    return node == null ? null : node.breaker.state(this.#now())
  }

  /** Models with at least one serving node, and how many serve each. */
  models(): Array<{ model: string; nodes: number }> {
    const out: Array<{ model: string; nodes: number }> = []
    for (const [model, pool] of this.#pools) {
      let serving = 0
      for (const node of pool.nodes) if (node.state === 'serving' && !this.#held.has(node.peerId)) serving++
      if (serving > 0) out.push({ model, nodes: serving })
    }
    return out.sort((a, b) => (a.model < b.model ? -1 : a.model > b.model ? 1 : 0))
  }

  /** Every node, for /metrics and /health. */
  snapshot(): RouterNodeSnapshot[] {
    const now = this.#now()
    const out: RouterNodeSnapshot[] = []
    for (const node of this.#nodes.values()) {
      out.push({
        peerId: node.peerId,
        model: node.model,
        state: node.state,
        slots: node.slots,
        inflight: node.inflight + node.outside,
        capacity: this.#capacity(node, this.#pools.get(node.model)!),
        measured: node.decodeRate != null,
        decodeRate: node.decodeRate,
        breaker: node.breaker.state(now),
        consecutiveFailures: node.breaker.consecutiveFailures,
        tokensSeen: node.tokensSeen,
        running: node.running,
        waiting: node.waiting,
        kvCacheUsage: node.kvCacheUsage,
      })
    }
    return out.sort((a, b) =>
      a.model !== b.model
        ? a.model < b.model
          ? -1
          : 1
        : a.peerId < b.peerId
          ? -1
          : a.peerId > b.peerId
            ? 1
            : 0,
    )
  }

  #measure(node: NodeRecord, completionTokens: number, firstByteAt: number): void {
    const decodeMs = this.#now() - firstByteAt
    if (!(completionTokens >= minMeasuredTokens) || !(decodeMs >= minMeasuredDecodeMs)) return
    const rate = completionTokens / (decodeMs / 1000)
    node.decodeRate = ewma(node.decodeRate, rate, rateEwmaAlpha)
    this.#markStale(node.model)
  }

  #capacity(node: NodeRecord, pool: Pool): number {
    if (node.decodeRate != null) return node.decodeRate * node.slots
    if (pool.medianStale) {
      const now = this.#now()
      if (pool.median == null || now - pool.medianAt >= medianRefreshMs) {
        pool.median = medianCapacity(pool.nodes)
        pool.medianStale = false
        pool.medianAt = now
      }
    }
    // Unmeasured nodes stand in at the pool's median, so a newcomer gets work and gets measured.
    return pool.median ?? 1
  }

  #poolOf(model: string): Pool {
    let pool = this.#pools.get(model)
    if (pool == null) {
      pool = { nodes: new Set(), median: null, medianStale: true, medianAt: 0 }
      this.#pools.set(model, pool)
    }
    return pool
  }

  #leavePool(node: NodeRecord): void {
    const pool = this.#pools.get(node.model)
    if (pool == null) return
    pool.nodes.delete(node)
    if (pool.nodes.size === 0) this.#pools.delete(node.model)
    else pool.medianStale = true
  }

  #markStale(model: string): void {
    const pool = this.#pools.get(model)
    if (pool != null) pool.medianStale = true
  }
}

function medianCapacity(nodes: Iterable<NodeRecord>): number | null {
  const measured: number[] = []
  for (const node of nodes) if (node.decodeRate != null) measured.push(node.decodeRate * node.slots)
  return median(measured)
}
