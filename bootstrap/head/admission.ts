import type { Logger } from '../../core/logger.ts'
import { handleJoinProtocol, JoinRefusedError } from '../../mesh/join-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { JOIN_PROTOCOL, TELEMETRY_PROTOCOL } from '../../mesh/protocols.ts'
import type { RayCredentials } from '../../mesh/region-messages.ts'
import { handleTelemetryProtocol, type IntegrityStanding } from '../../mesh/telemetry-protocol.ts'
import type { VerifiedThroughput } from '../../openai/usage.ts'
import type { RegionalRouter } from '../../routing/node-router.ts'
import { chooseAssignment } from './assign.ts'
import type { RayGroups } from './groups.ts'
import type { LeaseDesk } from './leases.ts'
import type { RegionPolicy } from './policy.ts'
import type { NodeRegistry } from './registry.ts'

/**
 * Upper bound of completion tokens in flight per node: a node's telemetry may count them before
 * the head has, so the verified-token check allows for them.
 */
export class PendingTokens {
  readonly #byPeer = new Map<string, number>()

  add(peer: string, n: number): void {
    const v = (this.#byPeer.get(peer) ?? 0) + n
    if (v <= 0) this.#byPeer.delete(peer)
    else this.#byPeer.set(peer, v)
  }

  get(peer: string): number {
    return this.#byPeer.get(peer) ?? 0
  }
}

export interface HeadAdmissionInit {
  region: string
  policy: RegionPolicy
  /** The region's Ray head, when the policy runs a trusted cluster: its credentials go into assignments. */
  ray?: { credentials(): RayCredentials } | null
  logger: Logger
}

export interface HeadAdmissionComponents {
  node: MeshNode
  registry: NodeRegistry
  router: RegionalRouter
  verified: VerifiedThroughput
  pending: PendingTokens
  /** The region's pipeline groups: a node may be given a stage instead of a model of its own. */
  groups?: RayGroups | null
  /** Result integrity: a quarantined or appealing node is told so in its telemetry answers. */
  integrity?: { standing(node: string): IntegrityStanding | null } | null
  /** The direct path: ticket keys at join, and telemetry checks that wait for its reports. */
  leases?: LeaseDesk | null
}

/**
 * The head's side of /garage/join/1.0.0 and /garage/telemetry/1.0.0: admits nodes with an
 * assignment from the region policy, keeps their telemetry in the registry and the router, and
 * compares what each claims with what the head verified.
 */
export class HeadAdmission {
  readonly #init: HeadAdmissionInit
  readonly #c: HeadAdmissionComponents

  constructor(init: HeadAdmissionInit, components: HeadAdmissionComponents) {
    this.#init = init
    this.#c = components
  }

  async start(): Promise<void> {
    const { region, policy, logger: log } = this.#init
    const { node, registry, router, verified, pending, groups, integrity, leases } = this.#c
    const self = node.peerId.toString()
    // Nodes that serve a model of their own, between onJoin and the answer: they get a ticket key.
    const serving = new Set<string>()
    await handleJoinProtocol(node, {
      region,
      directKey: (peer) => {
        const id = peer.toString()
        if (!serving.delete(id) || leases == null) return null
        return leases.keyFor(id)
      },
      onJoin: async (report, peer) => {
        const stage = groups?.assign(peer.toString(), report, self) ?? null
        if (stage != null) {
          // A member serves nothing itself: its GPU is the group's, which the router reaches instead.
          verified.remove(peer.toString())
          router.remove(peer.toString())
          registry.join(peer.toString(), report, stage)
          log.info(
            { node: peer.toString(), model: stage.model, rank: stage.group?.rank },
            'node joined as a pipeline group member',
          )
          return stage
        }
        const ray =
          policy.ray?.enabled && policy.ray.trusted ? (this.#init.ray?.credentials() ?? undefined) : undefined
        const assignment = chooseAssignment(
          policy,
          report,
          registry.replicasByModel({ except: peer.toString() }),
          self,
          ray,
        )
        if (assignment == null) {
          throw new JoinRefusedError(
            'no_assignment',
            `no model of region ${region} fits this node (VRAM cap ${report.vramCapMiB} MiB, RAM cap ${report.ramCapMiB} MiB, engines ${report.engines.join(', ') || 'none'}${(report.engineFailures ?? []).map((f) => `; ${f.engine} failed: ${f.reason}`).join('')})`,
          )
        }
        verified.remove(peer.toString())
        verified.joined(peer.toString(), assignment.engineArgs.parallel ?? 1)
        registry.join(peer.toString(), report, assignment)
        router.upsert(peer.toString(), {
          model: assignment.model,
          slots: assignment.engineArgs.parallel ?? 1,
          state: 'starting',
        })
        router.joined(peer.toString())
        serving.add(peer.toString())
        log.info({ node: peer.toString(), model: assignment.model, engine: assignment.engine }, 'node joined')
        for (const f of report.engineFailures ?? [])
          log.warn(
            { node: peer.toString(), engine: f.engine, reason: f.reason },
            'a node cannot run an engine it has',
          )
        return assignment
      },
      onLeave: async (peer) => {
        registry.leave(peer.toString())
      },
      onBadRequest(err, peer) {
        log.debug({ node: peer.toString(), err: err.message }, 'bad join request')
      },
    })
    await handleTelemetryProtocol(node, {
      onReport(report, peer) {
        const id = peer.toString()
        const outcome = registry.report(id, report)
        if (outcome === 'not_joined') return outcome
        // Reordered, or from before the node's latest join: its numbers are not this entry's.
        if (outcome === 'stale')
          return { ack: 'ok', verified: verified.verified(id), integrity: integrity?.standing(id) ?? null }
        router.updateTelemetry(id, {
          running: report.running,
          waiting: report.waiting,
          kvCacheUsage: report.kvCacheUsage,
          state: report.state,
        })
        const check = (): void => {
          const change = verified.compare(
            id,
            report.tokensTotal,
            pending.get(id) + (leases?.pending(id) ?? 0),
          )
          if (change?.flagged === true) {
            log.warn(
              { node: id, reported: report.tokensTotal, verified: verified.verified(id) },
              'node claims more tokens than the head verified for it (over 10%): flagged',
            )
          } else if (change != null) log.info({ node: id }, 'node claims are within bounds again')
        }
        // Tokens it made for the direct path count once the gateways' reports are in.
        if (leases != null) leases.whenCovered(id, check)
        else check()
        // A spare a pipeline group wants (or a member whose stage changed) joins again.
        if (groups?.telemetry(id, report, registry.get(id)?.report ?? null) === 'reassign') return 'reassign'
        // The node shows what the head verified as its credits, and a quarantine's reason.
        return { ack: 'ok', verified: verified.verified(id), integrity: integrity?.standing(id) ?? null }
      },
      onBadRequest(err, peer) {
        log.debug({ node: peer.toString(), err: err.message }, 'bad telemetry report')
      },
    })
  }

  async stop(): Promise<void> {
    await this.#c.node.unhandle([JOIN_PROTOCOL, TELEMETRY_PROTOCOL]).catch(() => {})
  }
}
