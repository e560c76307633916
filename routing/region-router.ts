/**
 * The federation router: which region takes the next request for a model.
 *
 * Eligible: regions the directory reaches, that serve the model (nodes > 0), that the caller does not
 * exclude (already tried for this request), and whose circuit breaker is not open. A `prefer`red
 * region (the X-Garage-Region header) wins when it is eligible; otherwise it is ignored.
 *
 * Load = (inflight + outstanding + 1) / capacity, lowest wins. `inflight` is what the head reported at
 * the last refresh; `outstanding` is this gateway's own count of requests it has open there, because
 * the head's number lags by a refresh interval and a burst would otherwise all land on one region.
 * (Once the head reports them, our own requests count twice until they end: a slight bias away from
 * the region we just loaded, which errs on the safe side.) `capacity` is the head's summed capacity in
 * tokens/s for the model; when that is 0 or missing, the model's slots; when those are 0 too, 1.
 *
 * Loads within 10% of the best tie; ties go to the lower RTT (the client waits less), then chance.
 *
 * Each region has a circuit breaker (routing/breaker.ts), fed only by failure() and success().
 *
 * Usage: `const region = router.pick(model, { prefer, exclude })`, then at once (same tick)
 * `const ticket = router.begin(region)`; `ticket.end(ok)` when the request is over, and
 * `router.success(region)` or `router.failure(region)` when the region proved healthy or broken (not
 * when the client went away or sent a bad request).
 */
import { type BreakerState, CircuitBreaker } from './breaker.ts'
import { median } from './stats.ts'

export interface RegionModelLoad {
  /** Nodes serving the model now. */
  nodes: number
  /** Sum of the head's measured (or stand-in) capacity of those nodes, tokens/s. */
  capacityTokensPerSecond: number
  /** Requests the head has outstanding at those nodes. */
  inflight: number
  /** Sequences those nodes decode in parallel, together. */
  slots: number
}

/** What the router needs of a region (the federation's directory knows more). */
export interface RoutableRegion {
  region: string
  /** The head's PeerId, as its certificate names it. */
  head: string
  /** Median ping from this gateway to the head at the last discovery round, ms. */
  rttMs: number | null
  models: ReadonlyMap<string, RegionModelLoad>
  /** False until the head answers, and after a status request fails. */
  reachable: boolean
}

/** Loads this close (relative) to the best count as equal, so proximity decides. */
export const loadTieTolerance = 0.1

export class UnknownRegionError extends Error {
  override name = 'UnknownRegionError'
}

export type { BreakerState }

export interface FederationRouterInit {
  /** Milliseconds; tests inject a simulated clock. */
  now?: () => number
  /** Uniform in [0, 1); breaks ties RTT leaves. */
  random?: () => number
}

export interface RegionPickOptions {
  /** The region the client asked for (X-Garage-Region): honoured when it can serve the model. */
  prefer?: string
  /** Regions already tried for this request. */
  exclude?: ReadonlySet<string>
}

export interface RegionTicket {
  readonly region: string
  /** Ends the request (idempotent): frees its outstanding slot. `ok` is for the caller's records. */
  end(ok: boolean): void
}

export interface RegionRouterSnapshot {
  region: string
  head: string
  reachable: boolean
  rttMs: number | null
  /** This gateway's requests open at the region now. */
  outstanding: number
  breaker: BreakerState
  consecutiveFailures: number
  /** When an open breaker half-opens, ms on the router's clock; null when closed. */
  openUntil: number | null
  models: Array<{ model: string; load: number } & RegionModelLoad>
}

interface RegionRecord {
  region: string
  head: string
  reachable: boolean
  rttMs: number | null
  models: ReadonlyMap<string, RegionModelLoad>
  outstanding: number
  breaker: CircuitBreaker
}

export class FederationRouter {
  readonly #now: () => number
  readonly #random: () => number
  readonly #regions = new Map<string, RegionRecord>()

  constructor(init: FederationRouterInit = {}) {
    this.#now = init.now ?? (() => performance.now())
    this.#random = init.random ?? Math.random
  }

  /**
   * Adds a region or takes its latest status; a new head starts a fresh record (breaker included),
   * and a region reachable again after an outage has its breaker closed.
   */
  update(status: RoutableRegion): void {
    const record = this.#regions.get(status.region)
    if (record == null || record.head !== status.head) {
      this.#regions.set(status.region, {
        region: status.region,
        head: status.head,
        reachable: status.reachable,
        rttMs: status.rttMs,
        models: status.models,
        outstanding: 0,
        breaker: new CircuitBreaker(),
      })
      return
    }
    // Its head answers again (back from a restart): the failures of its outage say nothing now, and
    // a breaker they opened kept the region idle for its doubling backoff after it was back.
    if (!record.reachable && status.reachable) record.breaker.success()
    record.reachable = status.reachable
    record.rttMs = status.rttMs
    record.models = status.models
  }

  remove(region: string): boolean {
    return this.#regions.delete(region)
  }

  /** The region for a new request of `model`, or null when none can take it. */
  pick(model: string, options: RegionPickOptions = {}): string | null {
    const now = this.#now()
    const standIn = this.#perSlotStandIn(model)
    const candidates: Array<{ record: RegionRecord; load: number }> = []
    let best = Number.POSITIVE_INFINITY
    for (const record of this.#regions.values()) {
      const load = this.#eligibleLoad(record, model, options.exclude, now, standIn)
      if (load == null) continue
      if (record.region === options.prefer) return record.region
      candidates.push({ record, load })
      if (load < best) best = load
    }
    if (candidates.length === 0) return null
    const limit = best * (1 + loadTieTolerance)
    let tied: RegionRecord[] = []
    let bestRtt = Number.POSITIVE_INFINITY
    for (const { record, load } of candidates) {
      if (load > limit) continue
      // An unmeasured RTT sorts last: a region we could not ping is not known to be near.
      const rtt = record.rttMs ?? Number.POSITIVE_INFINITY
      if (rtt < bestRtt || tied.length === 0) {
        tied = [record]
        bestRtt = rtt
      } else if (rtt === bestRtt) tied.push(record)
    }
    const index = Math.min(tied.length - 1, Math.floor(this.#random() * tied.length))
    return tied[index]!.region
  }

  /** Counts a request as outstanding at the region until its ticket ends. */
  begin(region: string): RegionTicket {
    const record = this.#regions.get(region)
    if (record == null) throw new UnknownRegionError(`no region ${region} in the router`)
    record.outstanding++
    const token = record.breaker.begin(this.#now())
    let ended = false
    return {
      region,
      end: () => {
        if (ended) return
        ended = true
        // The region may have been removed (or got a new head) meanwhile.
        if (this.#regions.get(region) !== record) return
        record.outstanding--
        record.breaker.end(token)
      },
    }
  }

  /** The region failed a request (unreachable head, 5xx, broke mid-stream). */
  failure(region: string): void {
    this.#regions.get(region)?.breaker.failure(this.#now())
  }

  /** The region answered a request in full. */
  success(region: string): void {
    this.#regions.get(region)?.breaker.success()
  }

  breakerState(region: string): BreakerState | null {
    const record = this.#regions.get(region)
    return record == null ? null : record.breaker.state(this.#now())
  }

  outstanding(region: string): number {
    return this.#regions.get(region)?.outstanding ?? 0
  }

  /** The load pick() compares for `model` at `region`; null when the region does not serve it. */
  load(region: string, model: string): number | null {
    const record = this.#regions.get(region)
    const m = record?.models.get(model)
    if (record == null || m == null || m.nodes <= 0) return null
    return loadOf(m, record.outstanding, this.#perSlotStandIn(model))
  }

  /** Every region, for /metrics and /health. */
  snapshot(): RegionRouterSnapshot[] {
    const now = this.#now()
    const out: RegionRouterSnapshot[] = []
    for (const record of this.#regions.values()) {
      const breaker = record.breaker.state(now)
      out.push({
        region: record.region,
        head: record.head,
        reachable: record.reachable,
        rttMs: record.rttMs,
        outstanding: record.outstanding,
        breaker,
        consecutiveFailures: record.breaker.consecutiveFailures,
        openUntil: record.breaker.openUntil,
        models: [...record.models]
          .map(([model, m]) => ({
            model,
            ...m,
            load: loadOf(m, record.outstanding, this.#perSlotStandIn(model)),
          }))
          .sort((a, b) => compareStrings(a.model, b.model)),
      })
    }
    return out.sort((a, b) => compareStrings(a.region, b.region))
  }

  #eligibleLoad(
    record: RegionRecord,
    model: string,
    exclude: ReadonlySet<string> | undefined,
    now: number,
    standIn: number,
  ): number | null {
    if (!record.reachable || exclude?.has(record.region)) return null
    const m = record.models.get(model)
    if (m == null || !(m.nodes > 0)) return null
    if (!record.breaker.admits(now)) return null
    return loadOf(m, record.outstanding, standIn)
  }

  /** Median measured capacity per slot of `model` across regions; 1 when no region has measured it. */
  #perSlotStandIn(model: string): number {
    const perSlot: number[] = []
    for (const record of this.#regions.values()) {
      const m = record.models.get(model)
      if (m != null && m.capacityTokensPerSecond > 0 && m.slots > 0)
        perSlot.push(m.capacityTokensPerSecond / m.slots)
    }
    return median(perSlot) ?? 1
  }
}

/**
 * `perSlotStandIn`: the capacity per slot a region whose head has measured no node yet counts at (the
 * median of the measured regions'). Counting it at 1 tok/s made a restarted region look ~100x busier
 * than measured ones, so it was never picked, never measured, and starved.
 */
function loadOf(m: RegionModelLoad, outstanding: number, perSlotStandIn: number): number {
  const slots = m.slots > 0 ? m.slots : 1
  const capacity = m.capacityTokensPerSecond > 0 ? m.capacityTokensPerSecond : perSlotStandIn * slots
  return (m.inflight + outstanding + 1) / capacity
}

function compareStrings(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0
}
