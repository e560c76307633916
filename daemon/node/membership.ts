import type { PeerId, PrivateKey } from '@libp2p/interface'
import type { Logger } from '../../core/logger.ts'
import { signCapabilityReport } from '../../mesh/capability-report.ts'
import type { DiscoveredHead } from '../../mesh/discovery.ts'
import { type DirectGrant, JoinRefusedError } from '../../mesh/join-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { PeerIdCache } from '../../mesh/peer-ids.ts'
import type { Assignment, CapabilityReport } from '../../mesh/region-messages.ts'
import { TicketVerifier } from '../../mesh/ticket.ts'
import type { NodeComponents, RegionFinder } from './components.ts'
import { NodeJoinError } from './engine.ts'

const joinTimeoutMs = 15_000
const leaveTimeoutMs = 5_000

export interface NodeMembershipInit {
  authority: string
  region?: string
  logger: Logger
}

/**
 * The node's place in a region: which head it found (certified discovery), what the head assigned
 * it, and the join and leave exchanges. A head that is lost or replaced is reported through
 * `onHeadChanged`; the daemon decides what to do (join again).
 */
export class NodeMembership {
  readonly #init: NodeMembershipInit
  readonly #c: Pick<NodeComponents, 'createDiscovery' | 'requestJoin' | 'requestLeave'>
  readonly #node: MeshNode
  #discovery: RegionFinder | null = null
  #head: DiscoveredHead | null = null
  #assignment: Assignment | null = null
  /** Checks the direct path's tickets under this join's key; null before a join, or from a head without one. */
  #tickets: TicketVerifier | null = null
  readonly #headIds = new PeerIdCache(64)

  constructor(
    init: NodeMembershipInit,
    node: MeshNode,
    components: Pick<NodeComponents, 'createDiscovery' | 'requestJoin' | 'requestLeave'>,
  ) {
    this.#init = init
    this.#node = node
    this.#c = components
  }

  get head(): DiscoveredHead | null {
    return this.#head
  }

  get assignment(): Assignment | null {
    return this.#assignment
  }

  /** The ticket check of the current join (requests that do not come through the head). */
  get tickets(): TicketVerifier | null {
    return this.#tickets
  }

  /** Starts discovery; ensureHead() picks the head to join (the configured region or the lowest RTT). */
  async start(onHeadChanged: (reason: string) => void): Promise<void> {
    const discovery = this.#c.createDiscovery(this.#node, {
      authority: this.#init.authority,
      ...(this.#init.region != null ? { region: this.#init.region } : {}),
    })
    this.#discovery = discovery
    let lost = false
    discovery.addEventListener('region:lost', (evt) => {
      lost = true
      this.#init.logger.warn({ head: evt.detail.peerId }, 'lost the regional head; finding a region again')
    })
    discovery.addEventListener('region:chosen', (evt) => {
      // A head after a loss: join it at once, the same head too (back from a restart, it has
      // forgotten this node; waiting for telemetry to say so cost seconds). The first choice is
      // joined by the daemon's start.
      if (this.#head == null) return
      const changed = this.#head.peerId !== evt.detail.peerId
      if (!changed && !lost) return
      lost = false
      this.#head = evt.detail
      onHeadChanged(changed ? 'head changed' : 'head back')
    })
    discovery.start()
  }

  /** Finds a head when the node has none (the first, or again after forgetHead()). */
  async ensureHead(): Promise<void> {
    if (this.#head == null && this.#discovery != null) this.#head = await this.#discovery.choose()
  }

  /** The chosen head could not be joined: the next ensureHead() looks again. */
  forgetHead(): void {
    this.#head = null
  }

  /**
   * Sends the capability report to the chosen head and takes its assignment. `report` builds it for
   * the head's region. NodeJoinError says why a head refused or could not be asked.
   */
  async join(key: PrivateKey, report: (region: string) => CapabilityReport): Promise<Assignment> {
    const head = this.#head
    if (head == null) throw new NodeJoinError('no regional head has been found', 'NO_REGION')
    if (head.region == null) throw new NodeJoinError(`head ${head.peerId} has no region`, 'NO_REGION')
    const signed = await signCapabilityReport(key, report(head.region))
    let assignment: Assignment
    let grant: DirectGrant | null = null
    // The last join's key stops verifying now: a rejoin gets a new one.
    this.#tickets = null
    try {
      assignment = await this.#c.requestJoin(this.#node, this.#peerId(head.peerId), signed, {
        signal: AbortSignal.timeout(joinTimeoutMs),
        onDirect: (g) => {
          grant = g
        },
      })
    } catch (err) {
      if (err instanceof JoinRefusedError) {
        throw new NodeJoinError(`region ${head.region} refused this node: ${err.message}`, 'JOIN_REFUSED', {
          cause: err,
        })
      }
      throw new NodeJoinError(
        `cannot join region ${head.region} (head ${head.peerId}): ${(err as Error).message}`,
        'JOIN_FAILED',
        { cause: err },
      )
    }
    this.#assignment = assignment
    const direct = grant as DirectGrant | null
    if (direct != null)
      this.#tickets = new TicketVerifier({
        key: direct.key,
        self: this.#node.peerId.toString(),
        clockOffsetMs: direct.clockOffsetMs,
      })
    this.#init.logger.info(
      { region: head.region, head: head.peerId, model: assignment.model },
      'joined the region',
    )
    return assignment
  }

  /** Tells the head this node leaves (best effort). */
  async leave(): Promise<void> {
    if (this.#assignment == null) return
    await this.#c
      .requestLeave(this.#node, this.#peerId(this.#assignment.head), {
        signal: AbortSignal.timeout(leaveTimeoutMs),
      })
      .catch((err: Error) => this.#init.logger.debug({ err: err.message }, 'leave not delivered'))
  }

  /** The PeerId of the head this node joined. */
  headPeerId(): PeerId | null {
    return this.#assignment != null ? this.#peerId(this.#assignment.head) : null
  }

  stop(): void {
    this.#discovery?.stop()
  }

  #peerId(id: string): PeerId {
    return this.#headIds.get(id)
  }
}
