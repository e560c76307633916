import type { Logger } from '../../core/logger.ts'
import { telemetryIntervalMs } from '../../mesh/protocols.ts'
import type {
  Assignment,
  CapabilityReport,
  NodeServingState,
  RayCredentials,
  TelemetryReport,
} from '../../mesh/region-messages.ts'
import type { RegionalRouter } from '../../routing/node-router.ts'
import type { ModelPolicy, RegionPolicy } from './policy.ts'

/**
 * Pipeline groups: models larger than one GPU, served by vLLM on the region's trusted Ray cluster
 * (--distributed-executor-backend ray --pipeline-parallel-size N), one stage per opted-in node.
 *
 * A node becomes a member through its assignment (engine `ray`, with its stage): it frees its GPU of
 * any model of its own and joins the Ray cluster with it. Once every stage's node reports its Ray
 * worker ready, the head starts the group's vLLM beside the Ray head and routes the model's requests
 * to it like to any node (the same failover, accounting and metrics). vLLM on Ray is fail-stop: when
 * a member leaves (its gamer starts a game, pauses, or its node dies), the head tears the group down
 * at once and forms it again from the opted-in nodes left: it asks a spare one to join again
 * (telemetry answer `reassign`) and gives it the free stage. Meanwhile requests for the model go to
 * other replicas or get 503 no_capacity. A member's pause never waits for the group.
 */

export type GroupState = 'waiting' | 'forming' | 'serving' | 're-forming'

/** The group's vLLM: what the head needs of it (the composition layer makes a VllmEngine). */
export interface GroupEngine {
  start(options: {
    model: string
    servedModelName: string
    parallel?: number
    contextLength?: number
    signal?: AbortSignal
  }): Promise<{ baseUrl: string; apiKey: string }>
  stop(): Promise<void>
  addEventListener(type: 'crashed', listener: (evt: CustomEvent<{ error: Error }>) => void): void
}

export interface GroupEngineInit {
  model: ModelPolicy
  /** The region's Ray cluster: vLLM connects to it as its driver. */
  cluster: RayCredentials
  pipelineParallel: number
  tensorParallel: number
}

export interface RayGroupsInit {
  region: string
  policy: RegionPolicy
  /** The region's Ray head (its credentials and image go to members); null: no groups. */
  ray: { credentials(): RayCredentials } | null
  createEngine: ((init: GroupEngineInit) => GroupEngine) | null
  logger: Logger
  now?: () => number
}

export interface GroupMemberView {
  node: string
  rank: number
  /** The member's Ray worker as its last telemetry said. */
  ray: 'ready' | 'starting' | null
}

export interface GroupView {
  model: string
  target: string
  state: GroupState
  size: number
  members: GroupMemberView[]
  /** Nodes asked to join again as members (spares filling a free stage). */
  invited: string[]
  /** How long the last formation took, from its first member to serving (ms). */
  lastFormedMs: number | null
  /** How many times the group began serving. */
  formations: number
  /** Completion tokens the group served. */
  tokens: number
}

interface Member {
  rank: number
  ray: 'ready' | 'starting' | null
  state: NodeServingState
}

interface Group {
  model: ModelPolicy
  target: string
  state: GroupState
  members: Map<string, Member>
  invited: Set<string>
  engine: GroupEngine | null
  abort: AbortController | null
  endpoint: { baseUrl: string; apiKey: string } | null
  formingSince: number | null
  lastFormedMs: number | null
  formations: number
  tokens: number
}

/** The router target of a group: what requests for its model are sent to. */
export function groupTarget(model: string): string {
  return `group:${model}`
}

export function isGroupTarget(target: string): boolean {
  return target.startsWith('group:')
}

/**
 * The layers each pipeline stage holds, as vLLM partitions them (get_pp_indices): an equal share
 * each, the remainder one by one to the stages before the last, from the back.
 */
export function stageLayers(layers: number, stages: number): number[] {
  const out = Array.from({ length: stages }, () => Math.floor(layers / stages))
  const remaining = layers % stages
  for (let i = 2; i < remaining + 2; i++) out[stages - i]! += 1
  return out
}

export class RayGroups {
  readonly #init: RayGroupsInit
  readonly #router: RegionalRouter
  readonly #groups = new Map<string, Group>()
  readonly #now: () => number
  #stopped = false

  constructor(init: RayGroupsInit, router: RegionalRouter) {
    this.#init = init
    this.#router = router
    this.#now = init.now ?? Date.now
    if (init.ray == null || !init.policy.ray.enabled || !init.policy.ray.trusted) return
    for (const model of init.policy.models) {
      if (model.pipelineParallel == null) continue
      this.#groups.set(model.name, {
        model,
        target: groupTarget(model.name),
        state: 'waiting',
        members: new Map(),
        invited: new Set(),
        engine: null,
        abort: null,
        endpoint: null,
        formingSince: null,
        lastFormedMs: null,
        formations: 0,
        tokens: 0,
      })
    }
  }

  /** Whether `report`'s node can hold a stage of `model`'s group. */
  eligible(model: ModelPolicy, report: CapabilityReport): boolean {
    if (!report.rayOptIn || !report.engines.includes('ray-worker')) return false
    if (report.hostPolicy.state !== 'clear') return false
    const gpus = report.hardware.gpus.filter(
      (g) => g.vendor === 'nvidia' && Math.min(g.vramMiB, report.vramCapMiB) >= model.minVramMiB,
    )
    return gpus.length >= (model.tensorParallel ?? 1) && model.minRamMiB <= report.hardware.ramMiB
  }

  /**
   * At a join: the member assignment when this node holds a stage (it joins again) or a group has a
   * free one it can take; null otherwise (it gets a model of its own).
   */
  assign(peer: string, report: CapabilityReport, head: string): Assignment | null {
    // No running Ray head, no cluster to join.
    if (this.#credentials() == null) return null
    for (const group of this.#groups.values()) {
      const member = group.members.get(peer)
      if (member != null) {
        if (this.eligible(group.model, report)) return this.#assignment(group, member.rank, head)
        this.#lose(group, peer, 'it can no longer hold a stage')
        continue
      }
      const rank = this.#freeRank(group)
      if (rank == null || !this.eligible(group.model, report)) continue
      group.invited.delete(peer)
      group.members.set(peer, { rank, ray: null, state: 'starting' })
      if (group.state === 'waiting') {
        group.state = 'forming'
        group.formingSince = this.#now()
      }
      this.#init.logger.info(
        { model: group.model.name, node: peer, rank, size: group.model.pipelineParallel },
        'node takes a pipeline stage',
      )
      return this.#assignment(group, rank, head)
    }
    return null
  }

  /**
   * A member's or a spare's telemetry. Returns 'reassign' for a node the head wants in a group
   * (it joins again and gets the stage).
   */
  telemetry(peer: string, report: TelemetryReport, joinReport: CapabilityReport | null): 'reassign' | null {
    for (const group of this.#groups.values()) {
      const member = group.members.get(peer)
      if (member != null) {
        member.ray = report.ray ?? null
        member.state = report.state
        if (report.state !== 'serving' || report.ray !== 'ready') {
          if (group.state === 'serving' || (report.state !== 'serving' && report.state !== 'starting'))
            this.#lose(
              group,
              peer,
              `it is ${report.state}${report.ray !== 'ready' ? ' without its Ray worker' : ''}`,
            )
        }
        this.#maybeStart(group)
        return null
      }
    }
    // A spare: invite it when a group has a free stage no one is taking yet.
    if (joinReport == null || report.state !== 'serving') return null
    for (const group of this.#groups.values()) {
      if (group.invited.has(peer)) return 'reassign'
      const free = group.model.pipelineParallel! - group.members.size - group.invited.size
      if (free > 0 && this.eligible(group.model, joinReport)) {
        group.invited.add(peer)
        this.#init.logger.info(
          { model: group.model.name, node: peer },
          'asking a spare node to take a pipeline stage',
        )
        return 'reassign'
      }
    }
    return null
  }

  /** A node left the region (or was evicted). */
  left(peer: string): void {
    for (const group of this.#groups.values()) {
      group.invited.delete(peer)
      if (group.members.has(peer)) this.#lose(group, peer, 'it left the region')
    }
  }

  /** A node's serving state changed (a pause, a drain): a member that stops serving leaves its stage. */
  state(peer: string, state: NodeServingState): void {
    if (state === 'serving' || state === 'starting') return
    for (const group of this.#groups.values())
      if (group.members.has(peer)) this.#lose(group, peer, `it is ${state}`)
  }

  /** Where a group target serves (its vLLM on this machine), or null. */
  endpoint(target: string): { baseUrl: string; apiKey: string } | null {
    for (const group of this.#groups.values()) if (group.target === target) return group.endpoint
    return null
  }

  /** Who served a group's answer, with the share of its tokens each stage earns (by layers held). */
  members(target: string): Array<{ node: string; weight: number }> {
    for (const group of this.#groups.values()) {
      if (group.target !== target) continue
      const size = group.model.pipelineParallel!
      const layers = group.model.layers != null ? stageLayers(group.model.layers, size) : null
      return [...group.members]
        .sort((a, b) => a[1].rank - b[1].rank)
        .map(([node, m]) => ({ node, weight: layers?.[m.rank] ?? 1 }))
    }
    return []
  }

  /** Completion tokens a group served (for /health and metrics). */
  served(target: string, tokens: number): void {
    for (const group of this.#groups.values()) if (group.target === target) group.tokens += tokens
  }

  views(): GroupView[] {
    return [...this.#groups.values()].map((g) => ({
      model: g.model.name,
      target: g.target,
      state: g.state,
      size: g.model.pipelineParallel!,
      members: [...g.members]
        .sort((a, b) => a[1].rank - b[1].rank)
        .map(([node, m]) => ({ node, rank: m.rank, ray: m.ray })),
      invited: [...g.invited],
      lastFormedMs: g.lastFormedMs,
      formations: g.formations,
      tokens: g.tokens,
    }))
  }

  async stop(): Promise<void> {
    this.#stopped = true
    await Promise.all([...this.#groups.values()].map((g) => this.#teardown(g)))
  }

  #assignment(group: Group, rank: number, head: string): Assignment {
    const m = group.model
    return {
      v: 1,
      region: this.#init.region,
      head,
      model: m.name,
      engine: 'ray',
      source: { hf: m.source.hf! },
      engineArgs: {},
      telemetryIntervalMs,
      ray: { ...this.#credentials()! },
      group: { size: m.pipelineParallel!, rank },
    }
  }

  #credentials(): RayCredentials | null {
    try {
      return this.#init.ray?.credentials() ?? null
    } catch {
      return null
    }
  }

  #freeRank(group: Group): number | null {
    const taken = new Set([...group.members.values()].map((m) => m.rank))
    for (let r = 0; r < group.model.pipelineParallel!; r++) if (!taken.has(r)) return r
    return null
  }

  /** A member is gone: the group stops serving now and forms again without it. */
  #lose(group: Group, peer: string, why: string): void {
    if (!group.members.delete(peer)) return
    this.#init.logger.warn(
      { model: group.model.name, node: peer, why, state: group.state },
      'a pipeline group lost a member; forming it again',
    )
    const wasUp = group.state === 'serving' || group.engine != null
    group.state = group.members.size === 0 ? 'waiting' : wasUp ? 're-forming' : group.state
    group.formingSince = group.members.size === 0 ? null : this.#now()
    void this.#teardown(group)
  }

  async #teardown(group: Group): Promise<void> {
    this.#router.remove(group.target)
    group.endpoint = null
    group.abort?.abort()
    group.abort = null
    const engine = group.engine
    group.engine = null
    await engine?.stop().catch(() => {})
  }

  /** Starts the group's vLLM once every stage's node has its Ray worker in the cluster. */
  #maybeStart(group: Group): void {
    if (this.#stopped || group.engine != null || this.#init.createEngine == null) return
    const size = group.model.pipelineParallel!
    if (group.members.size < size) return
    if (![...group.members.values()].every((m) => m.ray === 'ready' && m.state === 'serving')) return
    const cluster = this.#credentials()
    if (cluster == null) return
    const m = group.model
    const engine = this.#init.createEngine({
      model: m,
      cluster,
      pipelineParallel: size,
      tensorParallel: m.tensorParallel ?? 1,
    })
    const abort = new AbortController()
    group.engine = engine
    group.abort = abort
    group.formingSince ??= this.#now()
    engine.addEventListener('crashed', (evt) => {
      if (group.engine !== engine) return
      this.#init.logger.error({ model: m.name, err: evt.detail.error.message }, "the group's vLLM failed")
      group.state = 're-forming'
      void this.#teardown(group).then(() => this.#maybeStart(group))
    })
    this.#init.logger.info(
      { model: m.name, members: this.views().find((v) => v.model === m.name)?.members },
      "starting the group's vLLM on the Ray cluster",
    )
    engine
      .start({
        model: m.source.hf!,
        servedModelName: m.name,
        ...(m.parallel != null ? { parallel: m.parallel } : {}),
        ...(m.contextLength != null ? { contextLength: m.contextLength } : {}),
        signal: abort.signal,
      })
      .then((handle) => {
        if (group.engine !== engine || abort.signal.aborted) return
        group.endpoint = { baseUrl: handle.baseUrl, apiKey: handle.apiKey }
        group.state = 'serving'
        group.formations += 1
        group.lastFormedMs = group.formingSince != null ? this.#now() - group.formingSince : null
        group.formingSince = null
        this.#router.upsert(group.target, { model: m.name, slots: m.parallel ?? 8, state: 'serving' })
        this.#init.logger.info({ model: m.name, formedMs: group.lastFormedMs }, 'pipeline group serving')
      })
      .catch((err: Error) => {
        if (group.engine !== engine || abort.signal.aborted) return
        this.#init.logger.error({ model: m.name, err: err.message }, "the group's vLLM did not start")
        void this.#teardown(group)
      })
  }
}
