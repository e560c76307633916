import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { chooseAssignment, gpuMemoryUtilization } from '../../bootstrap/head/assign.ts'
import { loadRegionPolicy, parseRegionPolicy, type RegionPolicy } from '../../bootstrap/head/policy.ts'
import type { CapabilityReport, GpuSummary } from '../../mesh/region-messages.ts'
import { TestMesh } from '../helpers/mesh.ts'

/** The example in docs/region.md. */
const example = {
  region: 'eu-north',
  models: [
    {
      name: 'garage-tiny',
      engine: ['llamacpp'],
      source: { gguf: 'garage-tiny' },
      replicas: 2,
      minVramMiB: 0,
      minRamMiB: 64,
      parallel: 4,
      contextLength: 1024,
    },
    {
      name: 'llama-3.1-8b-instruct',
      engine: ['vllm', 'llamacpp'],
      source: {
        hf: 'meta-llama/Llama-3.1-8B-Instruct',
        gguf: 'hf:bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf',
      },
      replicas: 10,
      minVramMiB: 18000,
      minRamMiB: 8000,
    },
  ],
  ray: { enabled: false },
}

type Json = Record<string, unknown>
const clone = (): Json => structuredClone(example) as Json
const model = (p: Json, i: number): Json => (p.models as Json[])[i]!

describe('region policy files', () => {
  const mesh = new TestMesh()
  afterAll(() => mesh.cleanup())

  it('loads the documented example with defaults filled in', async () => {
    const path = join(await mesh.tempDir(), 'eu-north.policy.json')
    await writeFile(path, JSON.stringify(example, null, 2))
    const policy = await loadRegionPolicy(path)
    expect(policy.region).toBe('eu-north')
    expect(policy.ray).toEqual({ enabled: false, trusted: false })
    expect(policy.models.map((m) => [m.name, m.engine, m.replicas])).toEqual([
      ['garage-tiny', ['llamacpp'], 2],
      ['llama-3.1-8b-instruct', ['vllm', 'llamacpp'], 10],
    ])
    expect(policy.models[0]).toMatchObject({ parallel: 4, contextLength: 1024 })
    expect(policy.models[1]).not.toHaveProperty('parallel')
  })

  it('reads ray settings and a policy without ray', () => {
    const p = clone()
    p.ray = { enabled: true, trusted: true, port: 6379 }
    expect(parseRegionPolicy(p).ray).toEqual({ enabled: true, trusted: true, port: 6379 })
    delete p.ray
    expect(parseRegionPolicy(JSON.stringify(p)).ray).toEqual({ enabled: false, trusted: false })
  })

  it('names the field that is wrong, on one line', () => {
    const cases: Array<[string, (p: Json) => void, string]> = [
      ['region', (p) => (p.region = 'EU North'), 'region must be lowercase'],
      ['unknown top-level field', (p) => (p.modles = []), 'modles is not a known field'],
      ['no models', (p) => (p.models = []), 'models must be a list of 1-256 models'],
      ['models not a list', (p) => (p.models = {}), 'models must be a list'],
      ['model not an object', (p) => (p.models = ['garage-tiny']), 'models[0] must be an object'],
      ['name', (p) => (model(p, 0).name = 'tiny model'), 'models[0].name must be letters'],
      ['name missing', (p) => delete model(p, 0).name, 'models[0].name must be a string'],
      [
        'duplicate name',
        (p) => (model(p, 1).name = 'garage-tiny'),
        'models[1].name "garage-tiny" is listed twice',
      ],
      [
        'engine a string',
        (p) => (model(p, 0).engine = 'llamacpp'),
        'models[0].engine (model garage-tiny) must be a non-empty list',
      ],
      [
        'unknown engine',
        (p) => (model(p, 1).engine = ['vllm', 'tgi']),
        'models[1].engine[1] (model llama-3.1-8b-instruct) must be one of vllm, llamacpp, got "tgi"',
      ],
      [
        'engine twice',
        (p) => (model(p, 0).engine = ['llamacpp', 'llamacpp']),
        'models[0].engine (model garage-tiny) lists',
      ],
      [
        'vllm without hf',
        (p) => (model(p, 0).engine = ['vllm']),
        'models[0].source.hf (model garage-tiny) is required for engine vllm',
      ],
      [
        'llamacpp without gguf',
        (p) => delete (model(p, 1).source as Json).gguf,
        'models[1].source.gguf (model llama-3.1-8b-instruct) is required for engine llamacpp',
      ],
      [
        'unknown source',
        (p) => ((model(p, 0).source as Json).url = 'x'),
        'models[0].source.url (model garage-tiny) is not a known',
      ],
      [
        'replicas',
        (p) => (model(p, 1).replicas = 0),
        'models[1].replicas (model llama-3.1-8b-instruct) must be a whole number from 1',
      ],
      [
        'minVramMiB as a string',
        (p) => (model(p, 1).minVramMiB = '18000'),
        'models[1].minVramMiB (model llama-3.1-8b-instruct) must be a whole number from 0 to 9007199254740991, got "18000"',
      ],
      [
        'minRamMiB missing',
        (p) => delete model(p, 0).minRamMiB,
        'models[0].minRamMiB (model garage-tiny) must be a whole number',
      ],
      [
        'parallel',
        (p) => (model(p, 0).parallel = 0.5),
        'models[0].parallel (model garage-tiny) must be a whole number',
      ],
      [
        'contextLength',
        (p) => (model(p, 0).contextLength = -1),
        'models[0].contextLength (model garage-tiny)',
      ],
      ['unknown model field', (p) => (model(p, 0).replica = 2), 'models[0].replica is not a known field'],
      ['ray.enabled', (p) => (p.ray = { enabled: 'no' }), 'ray.enabled must be true or false'],
      ['ray.trusted', (p) => (p.ray = { enabled: true, trusted: 1 }), 'ray.trusted must be true or false'],
      [
        'ray.port',
        (p) => (p.ray = { enabled: true, port: 70000 }),
        'ray.port must be a whole number from 1 to 65535',
      ],
      ['ray unknown', (p) => (p.ray = { enabled: true, token: 'x' }), 'ray.token is not a known field'],
    ]
    for (const [what, mutate, message] of cases) {
      const p = clone()
      mutate(p)
      let err: Error | null = null
      try {
        parseRegionPolicy(p)
      } catch (e) {
        err = e as Error
      }
      expect(err?.name, what).toBe('RegionPolicyError')
      expect(err?.message, what).toContain(`region policy: ${message}`)
      expect(err?.message, what).not.toContain('\n')
    }
  })

  it('names the file when it is missing or not JSON', async () => {
    const dir = await mesh.tempDir()
    const missing = join(dir, 'none.json')
    await expect(loadRegionPolicy(missing)).rejects.toMatchObject({
      name: 'RegionPolicyError',
      message: `cannot read region policy ${missing}: no such file`,
    })
    const broken = join(dir, 'broken.json')
    await writeFile(broken, '{ "region": "eu-north", ')
    await expect(loadRegionPolicy(broken)).rejects.toMatchObject({
      name: 'RegionPolicyError',
      message: expect.stringContaining(`region policy ${broken}: not JSON`),
    })
    const bad = join(dir, 'bad.json')
    await writeFile(bad, JSON.stringify({ ...example, region: 'x_y' }))
    await expect(loadRegionPolicy(bad)).rejects.toMatchObject({
      message: expect.stringContaining(`region policy ${bad}: region must be`),
    })
  })
})

const rtx4090: GpuSummary = { vendor: 'nvidia', name: 'NVIDIA GeForce RTX 4090', vramMiB: 24_564 }
const rtx3060: GpuSummary = { vendor: 'nvidia', name: 'NVIDIA GeForce RTX 3060', vramMiB: 12_288 }
const rx7900: GpuSummary = { vendor: 'amd', name: 'AMD Radeon RX 7900 XTX', vramMiB: 24_576 }

function node(over: Partial<CapabilityReport> = {}, gpus: GpuSummary[] = [rtx4090]): CapabilityReport {
  return {
    v: 1,
    peerId: '12D3KooWNode',
    region: 'eu-north',
    daemonVersion: '0.1.0',
    issuedAt: 0,
    hardware: { gpus, ramMiB: 65_536, cpuCores: 16 },
    engines: ['llamacpp', 'vllm'],
    vramCapMiB: 22_000,
    ramCapMiB: 16_000,
    hostPolicy: { state: 'clear' },
    rayOptIn: false,
    ...over,
  }
}

describe('chooseAssignment', () => {
  const policy: RegionPolicy = parseRegionPolicy(example)
  const none = new Map<string, number>()
  const choose = (report: CapabilityReport, current = none, p = policy) =>
    chooseAssignment(p, report, current, 'HEAD')

  it('gives a big NVIDIA GPU the model with the largest deficit, on vLLM, sized to the cap', () => {
    expect(choose(node())).toEqual({
      v: 1,
      region: 'eu-north',
      head: 'HEAD',
      model: 'llama-3.1-8b-instruct',
      engine: 'vllm',
      source: { hf: 'meta-llama/Llama-3.1-8B-Instruct' },
      engineArgs: { gpuMemoryUtilization: 0.89 },
      telemetryIntervalMs: 2_000,
    })
  })

  it('does not assign a model past the VRAM the user allows', () => {
    expect(choose(node({}, [rtx3060]))?.model).toBe('garage-tiny')
    expect(choose(node({ vramCapMiB: 16_000 }))?.model).toBe('garage-tiny')
  })

  it("takes the first engine of the model's preference list that the node can run", () => {
    const noVllm = choose(node({ engines: ['llamacpp'] }))
    expect(noVllm).toMatchObject({ model: 'llama-3.1-8b-instruct', engine: 'llamacpp' })
    expect(noVllm?.source).toEqual({ gguf: example.models[1]!.source.gguf })
    expect(noVllm?.engineArgs).toEqual({})
    // vLLM needs NVIDIA; the embedded engine runs on the AMD card
    expect(choose(node({}, [rx7900]))).toMatchObject({ model: 'llama-3.1-8b-instruct', engine: 'llamacpp' })
  })

  it('runs a model that needs no GPU on the CPU within the RAM cap', () => {
    const cpu = choose(node({ engines: ['llamacpp'], vramCapMiB: 0 }, []))
    expect(cpu).toMatchObject({ model: 'garage-tiny', engine: 'llamacpp', source: { gguf: 'garage-tiny' } })
    expect(cpu?.engineArgs).toEqual({ parallel: 4, contextLength: 1024 })
    expect(choose(node({ engines: ['llamacpp'], vramCapMiB: 0, ramCapMiB: 32 }, []))).toBeNull()
  })

  it('fills the largest deficit first, ties in policy order, and extra nodes go to the first model', () => {
    const big = node()
    expect(choose(big, new Map([['llama-3.1-8b-instruct', 9]]))?.model).toBe('garage-tiny')
    expect(choose(big, new Map([['llama-3.1-8b-instruct', 8]]))?.model).toBe('garage-tiny')
    expect(choose(big, new Map([['llama-3.1-8b-instruct', 7]]))?.model).toBe('llama-3.1-8b-instruct')
    const full = new Map([
      ['garage-tiny', 2],
      ['llama-3.1-8b-instruct', 12],
    ])
    expect(choose(big, full)?.model).toBe('garage-tiny')
    // a node that cannot run the first model still gets the one it can run
    const onlyBig = parseRegionPolicy({
      ...example,
      models: [{ ...example.models[0], minRamMiB: 1_000_000 }, example.models[1]],
    })
    expect(choose(big, full, onlyBig)?.model).toBe('llama-3.1-8b-instruct')
  })

  it('returns null when nothing fits', () => {
    expect(choose(node({ engines: [] }))).toBeNull()
    expect(choose(node({ engines: ['vllm'] }, [rtx3060]))).toBeNull()
  })

  it('sets gpuMemoryUtilization from the cap, between 0.1 and 0.95', () => {
    expect(gpuMemoryUtilization(20_000, rtx4090)).toBe(0.81)
    expect(gpuMemoryUtilization(30_000, rtx4090)).toBe(0.95)
    expect(gpuMemoryUtilization(1_000, rtx4090)).toBe(0.1)
    expect(choose(node({ vramCapMiB: 50_000 }))?.engineArgs.gpuMemoryUtilization).toBe(0.95)
  })

  it('hands Ray credentials only to opted-in nodes of a trusted, enabled cluster', () => {
    const ray = { address: '10.0.0.2:6379', token: 'secret-token' }
    const with_ = (r: RegionPolicy['ray']): RegionPolicy => ({ ...policy, ray: r })
    const trusted = with_({ enabled: true, trusted: true })
    expect(chooseAssignment(trusted, node({ rayOptIn: true }), none, 'HEAD', ray)?.ray).toEqual(ray)
    expect(chooseAssignment(trusted, node({ rayOptIn: false }), none, 'HEAD', ray)).not.toHaveProperty('ray')
    expect(
      chooseAssignment(with_({ enabled: true, trusted: false }), node({ rayOptIn: true }), none, 'HEAD', ray),
    ).not.toHaveProperty('ray')
    expect(
      chooseAssignment(with_({ enabled: false, trusted: true }), node({ rayOptIn: true }), none, 'HEAD', ray),
    ).not.toHaveProperty('ray')
    expect(chooseAssignment(trusted, node({ rayOptIn: true }), none, 'HEAD')).not.toHaveProperty('ray')
  })
})
