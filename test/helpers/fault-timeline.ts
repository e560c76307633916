/**
 * What the cluster could do, moment by moment, from what the fault suite did to it (ground truth: it
 * killed, restarted, cut and healed things itself) and what it observed (nodes' "joined" log lines,
 * heads' /health and /metrics). Pure state with explicit timestamps, so the rules can be unit-tested.
 *
 * A region *could serve* a request over [start, end] when, throughout: the federation was up, the
 * region's head was up, and at least one of its nodes was alive (process up, link not cut, joined
 * since it or its head was last lost) and counted as serving by the head. Coming back takes time the
 * product documents, so an interval counts only after it has *settled*:
 *  - node-level changes: the gateway refreshes each region's status every 3 s (2 s timeout);
 *  - a restarted head: the gateway may have dropped the region at a discovery round meanwhile and
 *    finds it again at the next one (every 30 s, a lookup of up to 10 s), then its status;
 *  - a restarted gateway is back once its /health answers 200 (it reaches a region), then the
 *    status refresh brings in the others.
 */

export type FaultKind = 'node-kill' | 'head-kill' | 'federation-kill' | 'partition' | 'slow-link'

export const faultKinds: readonly FaultKind[] = [
  'node-kill',
  'head-kill',
  'federation-kill',
  'partition',
  'slow-link',
]

export interface FaultEvent {
  id: number
  kind: FaultKind
  /** The node, region or 'federation' the fault hit. */
  target: string
  /** The region it affects (a node's region, a head's region), null for the federation. */
  region: string | null
  /** The PeerId of the node it hit (node kills, partitions, slow links). */
  nodePeerId: string | null
  injectedAt: number
  /** The part was running again (restart ready), the link healed or back to no delay. */
  restoredAt: number | null
  detail: Record<string, number | string>
}

export interface SettleTimes {
  nodeMs: number
  headMs: number
  federationMs: number
}

/** What the head said at one poll: how many nodes it counts as serving, and which are registered. */
export interface HeadObservation {
  serving: number
  registered: string[]
}

interface NodeState {
  region: string
  peerId: string
  up: boolean
  joinedAt: number
  lostAt: number
}

export interface Interval {
  from: number
  to: number
}

export class ClusterTimeline {
  readonly settle: SettleTimes
  private readonly regions: string[]
  private readonly nodes = new Map<string, NodeState>()
  private readonly headUp = new Map<string, boolean>()
  private readonly headReadyAt = new Map<string, number>()
  private readonly headLostAt = new Map<string, number>()
  private readonly observation = new Map<string, HeadObservation | null>()
  private federationUp = true
  private federationReadyAt = Number.NEGATIVE_INFINITY
  /** Open raw interval per region: when it became able, and from when it counts. */
  private readonly open = new Map<string, { from: number; effectiveFrom: number }>()
  private readonly closed = new Map<string, Interval[]>()
  /** Times the federation was not serving: [killed, healthy again). */
  private readonly federationGaps: Interval[] = []

  constructor(init: {
    regions: string[]
    nodes: Array<{ name: string; region: string; peerId: string }>
    settle: SettleTimes
    /** Everything is up and settled at this time (the suite waits for it before the load starts). */
    at: number
  }) {
    this.settle = init.settle
    this.regions = [...init.regions]
    for (const r of init.regions) {
      this.headUp.set(r, true)
      this.headReadyAt.set(r, Number.NEGATIVE_INFINITY)
      this.headLostAt.set(r, Number.NEGATIVE_INFINITY)
      this.closed.set(r, [])
    }
    for (const n of init.nodes) {
      this.nodes.set(n.name, {
        region: n.region,
        peerId: n.peerId,
        up: true,
        joinedAt: init.at,
        lostAt: Number.NEGATIVE_INFINITY,
      })
    }
    for (const r of init.regions) {
      const registered = init.nodes.filter((n) => n.region === r).map((n) => n.peerId)
      this.observation.set(r, { serving: registered.length, registered })
    }
    this.update(init.at)
    for (const r of this.regions) {
      const o = this.open.get(r)
      if (o != null) o.effectiveFrom = init.at
    }
  }

  federationDown(at: number): void {
    this.federationUp = false
    this.federationGaps.push({ from: at, to: Number.POSITIVE_INFINITY })
    this.update(at)
  }

  federationReady(at: number): void {
    this.federationUp = true
    this.federationReadyAt = at
    const gap = this.federationGaps.at(-1)
    if (gap != null && gap.to === Number.POSITIVE_INFINITY) gap.to = at
    this.update(at)
  }

  headDown(region: string, at: number): void {
    this.headUp.set(region, false)
    this.headLostAt.set(region, at)
    this.observation.set(region, null)
    this.update(at)
  }

  headReady(region: string, at: number): void {
    this.headUp.set(region, true)
    this.headReadyAt.set(region, at)
    this.update(at)
  }

  /** The node's process died or its link was cut. */
  nodeDown(name: string, at: number): void {
    const n = this.node(name)
    n.up = false
    n.lostAt = at
    this.update(at)
  }

  /** Its process runs again or its link is back; it counts once it has joined again. */
  nodeUp(name: string, at: number): void {
    this.node(name).up = true
    this.update(at)
  }

  nodeJoined(name: string, at: number): void {
    this.node(name).joinedAt = at
    this.update(at)
  }

  observe(region: string, at: number, observation: HeadObservation | null): void {
    if (this.headUp.get(region) !== true) return
    this.observation.set(region, observation)
    this.update(at)
  }

  /** Whether the node counts as alive now (for the suite's own waits). */
  alive(name: string): boolean {
    const n = this.node(name)
    const lost = Math.max(n.lostAt, this.headLostAt.get(n.region) ?? Number.NEGATIVE_INFINITY)
    return n.up && n.joinedAt > lost
  }

  /** Whether the region can serve right now (before any settling). */
  able(region: string): boolean {
    if (!this.federationUp || this.headUp.get(region) !== true) return false
    const obs = this.observation.get(region)
    if (obs == null) return false
    const members = [...this.nodes.entries()].filter(([, n]) => n.region === region)
    const alive = members.filter(([name]) => this.alive(name))
    const deadButRegistered = members.filter(
      ([name, n]) => !this.alive(name) && obs.registered.includes(n.peerId),
    ).length
    // The head's serving count may include nodes it has not noticed are gone: count those out.
    return Math.min(obs.serving - deadButRegistered, alive.length) >= 1
  }

  /** Per region, the intervals in which it could serve through the federation (settled), up to `now`. */
  servingIntervals(now = Number.POSITIVE_INFINITY): Map<string, Interval[]> {
    const out = new Map<string, Interval[]>()
    for (const r of this.regions) {
      const list = [...(this.closed.get(r) ?? [])]
      const o = this.open.get(r)
      if (o != null && o.effectiveFrom < now) list.push({ from: o.effectiveFrom, to: now })
      out.set(r, list)
    }
    return out
  }

  /** A region that could serve throughout [start, end], or null. */
  couldServe(start: number, end: number): string | null {
    for (const [region, intervals] of this.servingIntervals()) {
      if (intervals.some((i) => i.from <= start && end <= i.to)) return region
    }
    return null
  }

  /** Whether the federation was killed or not yet healthy at any moment of [start, end]. */
  federationDownDuring(start: number, end: number): boolean {
    return this.federationGaps.some((g) => g.from <= end && start <= g.to)
  }

  private node(name: string): NodeState {
    const n = this.nodes.get(name)
    if (n == null) throw new RangeError(`no node ${name}`)
    return n
  }

  private update(at: number): void {
    for (const r of this.regions) {
      const able = this.able(r)
      const o = this.open.get(r)
      if (able && o == null) {
        const effectiveFrom = Math.max(
          at + this.settle.nodeMs,
          (this.headReadyAt.get(r) ?? Number.NEGATIVE_INFINITY) + this.settle.headMs,
          this.federationReadyAt + this.settle.federationMs,
        )
        this.open.set(r, { from: at, effectiveFrom })
      } else if (!able && o != null) {
        this.open.delete(r)
        if (o.effectiveFrom < at) this.closed.get(r)!.push({ from: o.effectiveFrom, to: at })
      }
    }
  }
}
