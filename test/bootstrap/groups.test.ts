import { TypedEventEmitter } from 'main-event'
import { describe, expect, it } from 'vitest'
import {
  type GroupEngine,
  type GroupEngineInit,
  RayGroups,
  stageLayers,
} from '../../bootstrap/head/groups.ts'
import { parseRegionPolicy, RegionPolicyError } from '../../bootstrap/head/policy.ts'
import { silentLogger } from '../../core/logger.ts'
import { splitByWeight } from '../../federation/ledger.ts'
import type { CapabilityReport, TelemetryReport } from '../../mesh/region-messages.ts'
import { RegionalRouter } from '../../routing/node-router.ts'

/**
 * Pipeline groups at the head (bootstrap/head/groups.ts) with a stand-in group engine: who gets a
 * stage, when the group's vLLM starts, what a lost member does, who is asked to fill the stage.
 */

const credentials = { address: '10.8.0.1:6379', token: 'cluster-token', image: 'ray:test' }

function policyWith(over: { trusted?: boolean; pipelineParallel?: number; layers?: number } = {}) {
  return parseRegionPolicy({
    region: 'eu-north',
    models: [
      {
        name: 'llama-70b',
        engine: ['vllm'],
        source: { hf: 'meta-llama/Llama-3.1-70B-Instruct' },
        replicas: 1,
        minVramMiB: 20_000,
        minRamMiB: 16_000,
        pipelineParallel: over.pipelineParallel ?? 3,
        ...(over.layers != null ? { layers: over.layers } : {}),
      },
    ],
    ray: { enabled: true, trusted: over.trusted ?? true },
  })
}

function report(peer: string, over: Partial<CapabilityReport> = {}): CapabilityReport {
  return {
    v: 1,
    peerId: peer,
    region: 'eu-north',
    daemonVersion: '0.1.0',
    issuedAt: 0,
    hardware: {
      gpus: [{ vendor: 'nvidia', name: 'RTX 4090', vramMiB: 24_564 }],
      ramMiB: 65_536,
      cpuCores: 16,
    },
    engines: ['llamacpp', 'vllm', 'ray-worker'],
    vramCapMiB: 22_000,
    ramCapMiB: 16_000,
    hostPolicy: { state: 'clear' },
    rayOptIn: true,
    ...over,
  }
}

function telemetry(over: Partial<TelemetryReport> = {}): TelemetryReport {
  return {
    v: 1,
    seq: 1,
    state: 'serving',
    model: 'llama-70b',
    tokensTotal: 0,
    promptTokensTotal: 0,
    tokensPerSecond: 0,
    running: 0,
    waiting: 0,
    kvCacheUsage: 0,
    ray: 'ready',
    ...over,
  }
}

class FakeGroupEngine
  extends TypedEventEmitter<{ crashed: CustomEvent<{ error: Error }> }>
  implements GroupEngine
{
  started = 0
  stopped = 0
  readonly init: GroupEngineInit
  #resolve: (() => void) | null = null
  constructor(init: GroupEngineInit) {
    super()
    this.init = init
  }
  async start(): Promise<{ baseUrl: string; apiKey: string }> {
    this.started++
    await new Promise<void>((resolve) => {
      this.#resolve = resolve
    })
    return { baseUrl: 'http://127.0.0.1:9999', apiKey: 'k' }
  }
  healthy(): void {
    this.#resolve?.()
  }
  async stop(): Promise<void> {
    this.stopped++
    this.#resolve?.()
  }
}

function rig(over: Parameters<typeof policyWith>[0] = {}) {
  const router = new RegionalRouter()
  const engines: FakeGroupEngine[] = []
  const groups = new RayGroups(
    {
      region: 'eu-north',
      policy: policyWith(over),
      ray: { credentials: () => credentials },
      createEngine: (init) => {
        const e = new FakeGroupEngine(init)
        engines.push(e)
        return e
      },
      logger: silentLogger,
    },
    router,
  )
  return { router, groups, engines }
}

const settle = () => new Promise((r) => setImmediate(r))

describe('pipeline groups on the Ray cluster', () => {
  it('give each of N opted-in nodes a stage, and start vLLM once every stage has joined Ray', async () => {
    const { router, groups, engines } = rig()
    const stages = ['a', 'b', 'c'].map((p) => groups.assign(p, report(p), 'HEAD'))
    expect(stages.map((s) => s?.group)).toEqual([
      { size: 3, rank: 0 },
      { size: 3, rank: 1 },
      { size: 3, rank: 2 },
    ])
    expect(stages[0]).toMatchObject({
      engine: 'ray',
      model: 'llama-70b',
      ray: credentials,
      source: { hf: 'meta-llama/Llama-3.1-70B-Instruct' },
    })
    // A fourth node gets no stage: it serves a model of its own.
    expect(groups.assign('d', report('d'), 'HEAD')).toBeNull()
    groups.telemetry('a', telemetry(), report('a'))
    groups.telemetry('b', telemetry({ ray: 'starting' }), report('b'))
    groups.telemetry('c', telemetry(), report('c'))
    expect(engines).toHaveLength(0)
    groups.telemetry('b', telemetry(), report('b'))
    expect(engines).toHaveLength(1)
    expect(engines[0]!.init).toMatchObject({ pipelineParallel: 3, tensorParallel: 1, cluster: credentials })
    expect(groups.views()[0]!.state).toBe('forming')
    engines[0]!.healthy()
    await settle()
    expect(groups.views()[0]).toMatchObject({
      state: 'serving',
      formations: 1,
      members: [{ node: 'a' }, { node: 'b' }, { node: 'c' }],
    })
    expect(router.pick('llama-70b')).toBe('group:llama-70b')
    expect(groups.endpoint('group:llama-70b')).toEqual({ baseUrl: 'http://127.0.0.1:9999', apiKey: 'k' })
  })

  it('tear the group down when a member pauses, ask a spare to take its stage, and serve again', async () => {
    const { router, groups, engines } = rig()
    for (const p of ['a', 'b', 'c']) groups.assign(p, report(p), 'HEAD')
    for (const p of ['a', 'b', 'c']) groups.telemetry(p, telemetry(), report(p))
    engines[0]!.healthy()
    await settle()
    // A spare with a model of its own is left alone while the group is whole.
    expect(groups.telemetry('d', telemetry({ ray: undefined }), report('d'))).toBeNull()

    groups.state('b', 'paused')
    await settle()
    expect(engines[0]!.stopped).toBe(1)
    expect(router.pick('llama-70b')).toBeNull()
    expect(groups.views()[0]).toMatchObject({ state: 're-forming', members: [{ node: 'a' }, { node: 'c' }] })

    expect(groups.telemetry('d', telemetry({ ray: undefined }), report('d'))).toBe('reassign')
    // Only as many as there are free stages are asked.
    expect(groups.telemetry('e', telemetry({ ray: undefined }), report('e'))).toBeNull()
    expect(groups.assign('d', report('d'), 'HEAD')?.group).toEqual({ size: 3, rank: 1 })
    groups.telemetry('d', telemetry(), report('d'))
    expect(engines).toHaveLength(2)
    engines[1]!.healthy()
    await settle()
    expect(groups.views()[0]).toMatchObject({ state: 'serving', formations: 2 })
    expect(router.pick('llama-70b')).toBe('group:llama-70b')
  })

  it('never place a node that did not opt in, cannot run a Ray worker, lacks memory, or is paused', () => {
    const { groups } = rig()
    expect(groups.assign('x', report('x', { rayOptIn: false }), 'HEAD')).toBeNull()
    expect(groups.assign('x', report('x', { engines: ['llamacpp', 'vllm'] }), 'HEAD')).toBeNull()
    expect(groups.assign('x', report('x', { vramCapMiB: 8_000 }), 'HEAD')).toBeNull()
    expect(
      groups.assign('x', report('x', { hostPolicy: { state: 'paused', reason: 'game' } }), 'HEAD'),
    ).toBeNull()
    expect(groups.assign('y', report('y'), 'HEAD')).not.toBeNull()
  })

  it('serve nothing in a region whose Ray cluster is not trusted (the policy refuses it)', () => {
    expect(() => policyWith({ trusted: false })).toThrow(RegionPolicyError)
    expect(() => policyWith({ trusted: false })).toThrow(/needs the region to run a trusted Ray cluster/)
  })

  it("credit a group's tokens to its members by the layers each stage holds", () => {
    expect(stageLayers(32, 3)).toEqual([11, 11, 10])
    expect(stageLayers(10, 4)).toEqual([2, 3, 3, 2])
    const { groups } = rig({ layers: 80 })
    for (const p of ['a', 'b', 'c']) groups.assign(p, report(p), 'HEAD')
    expect(groups.members('group:llama-70b')).toEqual([
      { node: 'a', weight: 27 },
      { node: 'b', weight: 27 },
      { node: 'c', weight: 26 },
    ])
    const split = splitByWeight(100, 1001, groups.members('group:llama-70b'))
    expect(split).toEqual([
      { node: 'a', prompt: 34, completion: 338 },
      { node: 'b', prompt: 34, completion: 338 },
      { node: 'c', prompt: 32, completion: 325 },
    ])
    expect(split.reduce((s, x) => s + x.completion, 0)).toBe(1001)
  })
})
