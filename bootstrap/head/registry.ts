import type { PeerId } from '@libp2p/interface'
import { TypedEventEmitter } from 'main-event'
import { telemetryDeadlineMs, telemetryIntervalMs } from '../../mesh/protocols.ts'
import type {
  Assignment,
  CapabilityReport,
  NodeServingState,
  TelemetryReport,
} from '../../mesh/region-messages.ts'

/**
 * The head's list of joined nodes: what each reported, what it was assigned, its latest telemetry.
 * Plain data: the router and the throughput accounting follow it through its events.
 */

export interface RegistryEntry {
  peerId: string
  report: CapabilityReport
  assignment: Assignment
  /** Milliseconds since the epoch, from the registry's clock. */
  joinedAt: number
  /** The join or the last accepted telemetry report. */
  lastSeen: number
  telemetry: TelemetryReport | null
  /** 'starting' until the node's first telemetry says otherwise. */
  state: NodeServingState
}

export type NodeLeftReason = 'leave' | 'evicted'

export interface NodeRegistryEvents {
  /** A node joined, or joined again (its entry is replaced: a new report and assignment). */
  'node:joined': CustomEvent<RegistryEntry>
  'node:left': CustomEvent<{ peerId: string; reason: NodeLeftReason; entry: RegistryEntry }>
  'node:state': CustomEvent<{
    peerId: string
    previous: NodeServingState
    state: NodeServingState
    entry: RegistryEntry
  }>
}

export interface NodeRegistryInit {
  now?: () => number
  /** Silence after which a node is evicted. */
  deadlineMs?: number
  /** How often start()'s timer looks for silent nodes. */
  evictIntervalMs?: number
}

type PeerKey = PeerId | string

/** The highest number a node's first report after a join may carry (reports 1-4 lost on the way). */
export const firstReportMaxSeq = 5

export class NodeRegistry extends TypedEventEmitter<NodeRegistryEvents> {
  private readonly now: () => number
  private readonly deadlineMs: number
  private readonly evictIntervalMs: number
  private readonly entries = new Map<string, RegistryEntry>()
  private timer: ReturnType<typeof setInterval> | null = null
  /** Per node: a first report after its join held back as stale (its number). */
  private readonly heldFirst = new Map<string, number>()

  constructor(init: NodeRegistryInit = {}) {
    super()
    this.now = init.now ?? Date.now
    this.deadlineMs = init.deadlineMs ?? telemetryDeadlineMs
    // Checking twice per deadline keeps a silent node at most 1.5 deadlines in the registry.
    this.evictIntervalMs = init.evictIntervalMs ?? Math.min(telemetryIntervalMs, this.deadlineMs / 2)
  }

  start(): void {
    if (this.timer != null) return
    this.timer = setInterval(() => this.evictSilent(), this.evictIntervalMs)
    this.timer.unref?.()
  }

  stop(): void {
    if (this.timer == null) return
    clearInterval(this.timer)
    this.timer = null
  }

  /** Records a node that joined; a node joining again replaces its entry (new report and assignment). */
  join(peer: PeerKey, report: CapabilityReport, assignment: Assignment): RegistryEntry {
    const peerId = peer.toString()
    const at = this.now()
    const entry: RegistryEntry = {
      peerId,
      report,
      assignment,
      joinedAt: at,
      lastSeen: at,
      telemetry: null,
      state: 'starting',
    }
    this.entries.set(peerId, entry)
    this.heldFirst.delete(peerId)
    this.safeDispatchEvent('node:joined', { detail: entry })
    return entry
  }

  /** The node left on its own; false when it was not joined. */
  leave(peer: PeerKey): boolean {
    return this.remove(peer.toString(), 'leave') != null
  }

  /** Takes a telemetry report; a report older than the last one (seq not above it) is ignored. */
  /**
   * Records a node's report. 'stale': older than one already taken, or numbered before the node's
   * latest join (a node numbers its reports from 1 at each join, so a first report numbered past
   * firstReportMaxSeq was sent before it and crossed the join on the way): its counts belong to the
   * node's previous entry, and taking it stalled the entry's numbering there.
   */
  report(peer: PeerKey, telemetry: TelemetryReport): 'ok' | 'not_joined' | 'stale' {
    const peerId = peer.toString()
    const entry = this.entries.get(peerId)
    if (entry == null) return 'not_joined'
    if (entry.telemetry != null && telemetry.seq <= entry.telemetry.seq) return 'stale'
    if (entry.telemetry == null && telemetry.seq > firstReportMaxSeq) {
      const held = this.heldFirst.get(peerId)
      // The next number of the same sequence: a node that does not number from 1 at a join (an
      // older daemon) rather than a report that crossed the join. Taken from here on.
      if (held == null || telemetry.seq <= held) {
        this.heldFirst.set(peerId, telemetry.seq)
        // It is alive all the same.
        this.entries.set(peerId, { ...entry, lastSeen: this.now() })
        return 'stale'
      }
    }
    this.heldFirst.delete(peerId)
    // Entries are replaced, not mutated, so an event's detail stays what it was when sent.
    const next: RegistryEntry = { ...entry, telemetry, lastSeen: this.now(), state: telemetry.state }
    this.entries.set(peerId, next)
    if (next.state !== entry.state) {
      this.safeDispatchEvent('node:state', {
        detail: { peerId, previous: entry.state, state: next.state, entry: next },
      })
    }
    return 'ok'
  }

  /** Removes nodes silent for longer than the deadline; returns them. */
  evictSilent(): RegistryEntry[] {
    const cutoff = this.now() - this.deadlineMs
    const evicted: RegistryEntry[] = []
    for (const entry of [...this.entries.values()]) {
      if (entry.lastSeen < cutoff && this.remove(entry.peerId, 'evicted') != null) evicted.push(entry)
    }
    return evicted
  }

  get(peer: PeerKey): RegistryEntry | undefined {
    return this.entries.get(peer.toString())
  }

  nodes(): RegistryEntry[] {
    return [...this.entries.values()]
  }

  get size(): number {
    return this.entries.size
  }

  /** Joined nodes per state, every state present (0 when none). */
  countByState(): Record<NodeServingState, number> {
    const counts: Record<NodeServingState, number> = { starting: 0, serving: 0, paused: 0, draining: 0 }
    for (const entry of this.entries.values()) counts[entry.state] = (counts[entry.state] ?? 0) + 1
    return counts
  }

  /**
   * Joined nodes per assigned model, draining ones left out (they are going away). `except` leaves
   * out a node that is joining again, so its old assignment does not count against its new one.
   */
  replicasByModel(options: { except?: PeerKey } = {}): Map<string, number> {
    const except = options.except?.toString()
    const counts = new Map<string, number>()
    for (const entry of this.entries.values()) {
      if (entry.state === 'draining' || entry.peerId === except) continue
      counts.set(entry.assignment.model, (counts.get(entry.assignment.model) ?? 0) + 1)
    }
    return counts
  }

  private remove(peerId: string, reason: NodeLeftReason): RegistryEntry | undefined {
    this.heldFirst.delete(peerId)
    const entry = this.entries.get(peerId)
    if (entry == null) return undefined
    this.entries.delete(peerId)
    this.safeDispatchEvent('node:left', { detail: { peerId, reason, entry } })
    return entry
  }
}
