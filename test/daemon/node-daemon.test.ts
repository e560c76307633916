import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { TypedEventEmitter } from 'main-event'
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'
import { chooseAssignment } from '../../bootstrap/head/assign.ts'
import { parseRegionPolicy } from '../../bootstrap/head/policy.ts'
import { silentLogger } from '../../core/logger.ts'
import { LlamaCppEngine } from '../../daemon/engines/llamacpp/engine.ts'
import type {
  Engine,
  EngineEvents,
  EngineHandle,
  EngineMetrics,
  EngineStartOptions,
  EngineState,
} from '../../daemon/engines/types.ts'
import { VllmEngine } from '../../daemon/engines/vllm/engine.ts'
import type { HardwareReport } from '../../daemon/hardware/types.ts'
import type { NodeComponents, RegionFinder } from '../../daemon/node/components.ts'
import { pullDetail } from '../../daemon/node/engine.ts'
import { createNodeEngine, readHuggingFaceToken, vllmGpuRequest } from '../../daemon/node/engines.ts'
import { NodeDaemon, type NodeDaemonState } from '../../daemon/node-daemon.ts'
import { verifyCapabilityReport } from '../../mesh/capability-report.ts'
import type { DiscoveredHead, RegionDiscoveryEvents } from '../../mesh/discovery.ts'
import { loadOrCreateIdentity } from '../../mesh/identity.ts'
import { JoinRefusedError } from '../../mesh/join-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import type { Assignment, CapabilityReport, TelemetryReport } from '../../mesh/region-messages.ts'
import { cpuOnlyMachine, nvidiaMachine } from '../helpers/hardware.ts'

/**
 * The node's state machine (start, join, pause and resume from several sources, rejoin, drain and
 * stop) with stand-ins for the mesh, the head and the engine: what the slow suites reach only
 * through real libp2p nodes and llama.cpp.
 */

class FakeEngine extends TypedEventEmitter<EngineEvents> implements Engine {
  readonly kind = 'llamacpp' as const
  state: EngineState = 'stopped'
  generated = 0
  private readonly log: string[]
  private readonly failStart: () => Error | null
  constructor(log: string[], failStart: () => Error | null) {
    super()
    this.log = log
    this.failStart = failStart
  }
  /** Holds start() (a model that takes long to load) until it resolves. */
  static loading: Promise<void> = Promise.resolve()
  async start(options: EngineStartOptions): Promise<EngineHandle> {
    this.log.push(`engine start ${options.servedModelName}`)
    await FakeEngine.loading
    const err = this.failStart()
    if (err != null) throw err
    this.state = 'ready'
    return {
      kind: 'llamacpp',
      baseUrl: 'http://127.0.0.1:1',
      apiKey: 'k',
      servedModelName: options.servedModelName!,
    }
  }
  async health(): Promise<boolean> {
    return this.state === 'ready'
  }
  async metrics(): Promise<EngineMetrics> {
    return {
      'vllm:num_requests_running': 0,
      'vllm:num_requests_waiting': 0,
      'vllm:generation_tokens_total': this.generated,
      'vllm:prompt_tokens_total': 0,
      'vllm:kv_cache_usage_perc': 0,
    }
  }
  async drain(): Promise<void> {}
  async stop(): Promise<void> {
    if (this.state === 'stopped') return
    this.state = 'stopped'
    this.log.push('engine stop')
  }
}

class FakeFinder
  extends TypedEventEmitter<Pick<RegionDiscoveryEvents, 'region:lost' | 'region:chosen'>>
  implements RegionFinder
{
  private readonly heads: () => DiscoveredHead
  constructor(heads: () => DiscoveredHead) {
    super()
    this.heads = heads
  }
  start(): void {}
  stop(): void {}
  async choose(): Promise<DiscoveredHead> {
    return this.heads()
  }
}

function head(peerId: string): DiscoveredHead {
  return {
    peerId,
    region: 'eu-test',
    addrs: [],
    rttMs: 1,
    expiresAt: null,
    valid: true,
    reason: null,
    certificate: null,
    status: null,
  }
}

interface Rig {
  daemon: NodeDaemon
  /** Joins in flight now, the most at once, and what each waits for. */
  joining: { now: number; most: number; gate: Promise<void> }
  log: string[]
  reports: TelemetryReport[]
  joins: string[]
  finder: () => FakeFinder
  engines: FakeEngine[]
  /** Next telemetry answer. */
  ack: { value: 'ok' | 'not_joined' }
  failEngine: { error: Error | null }
  heads: string[]
}

describe('NodeDaemon (stand-in mesh, head and engine)', () => {
  let dir: string
  const daemons: NodeDaemon[] = []

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-node-daemon-'))
  })
  afterEach(async () => {
    for (const d of daemons.splice(0)) await d.stop({ graceMs: 0 })
    await rm(dir, { recursive: true, force: true })
  })

  async function rig(
    options: { telemetryIntervalMs?: number; unreachableJoins?: number; leaveDelayMs?: number } = {},
  ): Promise<Rig> {
    const heads = await Promise.all(
      [0, 1].map(async () => peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString()),
    )
    const model = join(dir, 'model.gguf')
    await writeFile(model, 'not read by the stand-in engine')
    const log: string[] = []
    const reports: TelemetryReport[] = []
    const joins: string[] = []
    const engines: FakeEngine[] = []
    const ack = { value: 'ok' as 'ok' | 'not_joined' }
    const failEngine = { error: null as Error | null }
    const unreachable = { joins: options.unreachableJoins ?? 0 }
    let finder: FakeFinder | null = null
    const joining = { now: 0, most: 0, gate: Promise.resolve() }
    let current = 0
    // The daemon signs its capability report with the identity in its data dir.
    const selfKey = await loadOrCreateIdentity(dir)
    const components: Partial<NodeComponents> = {
      createMeshNode: async () =>
        ({ peerId: peerIdFromPrivateKey(selfKey), stop: async () => {} }) as unknown as MeshNode,
      createDiscovery: () => {
        finder = new FakeFinder(() => head(heads[current]!))
        return finder
      },
      requestJoin: async (_node, peer) => {
        if (unreachable.joins > 0) {
          unreachable.joins--
          throw new Error('the dial to the head timed out')
        }
        joining.now++
        joining.most = Math.max(joining.most, joining.now)
        await joining.gate
        joining.now--
        joins.push(peer.toString())
        const assignment: Assignment = {
          v: 1,
          region: 'eu-test',
          head: peer.toString(),
          model: 'garage-tiny',
          engine: 'llamacpp',
          source: { gguf: model },
          engineArgs: { parallel: 1 },
          telemetryIntervalMs: options.telemetryIntervalMs ?? 60_000,
        }
        return assignment
      },
      requestLeave: async (_node, peer) => {
        // The leave crosses the network: reports tick meanwhile.
        if (options.leaveDelayMs != null)
          await new Promise((resolve) => setTimeout(resolve, options.leaveDelayMs))
        log.push(`leave ${peer.toString() === heads[current] ? 'head' : 'other'}`)
      },
      sendTelemetry: async (_node, _head, report) => {
        reports.push(report)
        return ack.value
      },
      serveInfer: async () => ({ activeRequests: () => 0, idle: async () => {}, stop: async () => {} }),
      createEngine: () => {
        const engine = new FakeEngine(log, () => failEngine.error)
        engines.push(engine)
        return engine
      },
    }
    const daemon = new NodeDaemon({
      dataDir: dir,
      authority: heads[0]!,
      bootstrap: [],
      hardware: cpuOnlyMachine(),
      hostPolicies: false,
      pauseGraceMs: 0,
      components,
    })
    daemons.push(daemon)
    return {
      daemon,
      joining,
      log,
      reports,
      joins,
      engines,
      ack,
      failEngine,
      heads,
      finder: () => {
        if (finder == null) throw new Error('no discovery yet')
        current = 1
        return finder
      },
    }
  }

  function states(daemon: NodeDaemon): NodeDaemonState[] {
    const seen: NodeDaemonState[] = []
    daemon.addEventListener('state', (e) => seen.push(e.detail.state as NodeDaemonState))
    return seen
  }

  it('starts: joins the head discovery chose, starts the engine the assignment names, serves', async () => {
    const r = await rig()
    const seen = states(r.daemon)
    await r.daemon.start()
    expect(r.daemon.state).toBe('serving')
    expect(seen).toEqual(['starting', 'serving'])
    expect(r.joins).toEqual([r.heads[0]])
    expect(r.log).toEqual(['engine start garage-tiny'])
    expect(r.daemon.status()).toMatchObject({ state: 'serving', region: 'eu-test', model: 'garage-tiny' })
  })

  it('a head that cannot be reached at start: waits and tries again with backoff, saying so in the status', async () => {
    const r = await rig({ unreachableJoins: 2 })
    const reasons: Array<string | null> = []
    r.daemon.addEventListener('state', (e) => reasons.push(e.detail.reason))
    const started = performance.now()
    await r.daemon.start()
    expect(r.daemon.state).toBe('serving')
    expect(r.daemon.status().reason).toBeNull()
    // Two waits, 1 s then 2 s, each said in the status.
    expect(performance.now() - started).toBeGreaterThanOrEqual(2_900)
    expect(reasons.filter((x) => x != null)).toEqual([
      expect.stringMatching(
        /cannot join region eu-test .*the dial to the head timed out; trying again in 1 s$/,
      ),
      expect.stringMatching(/; trying again in 2 s$/),
    ])
    expect(r.joins).toEqual([r.heads[0]])
  })

  it('stop() while a start waits for its region ends the start at once, stopped, nothing left running', async () => {
    const r = await rig({ unreachableJoins: 1_000 })
    const starting = r.daemon.start()
    while (r.daemon.status().reason == null) await new Promise((resolve) => setTimeout(resolve, 10))
    const stopped = performance.now()
    await r.daemon.stop()
    await expect(starting).rejects.toThrow('stopped before the node could join a region')
    expect(performance.now() - stopped).toBeLessThan(500)
    expect(r.daemon.state).toBe('stopped')
  })

  it("reports 'starting' from the join on while the engine loads, so the head does not evict it", async () => {
    const r = await rig({ telemetryIntervalMs: 20 })
    let loaded!: () => void
    FakeEngine.loading = new Promise((resolve) => {
      loaded = resolve
    })
    try {
      const starting = r.daemon.start()
      // Several reports reach the head while the model loads, every one saying 'starting'.
      while (r.reports.length < 3) await new Promise((resolve) => setTimeout(resolve, 10))
      expect(r.daemon.state).toBe('starting')
      expect(r.reports.every((report) => report.state === 'starting')).toBe(true)
      loaded()
      await starting
      // Serving is told at once, not at the next tick.
      expect(r.reports.at(-1)!.state).toBe('serving')
    } finally {
      loaded()
      FakeEngine.loading = Promise.resolve()
    }
  })

  it('pauses for the user and a game; resumes only when both let go, with a fresh engine and join', async () => {
    const r = await rig()
    await r.daemon.start()
    const seen = states(r.daemon)
    const released: string[][] = []
    r.daemon.addEventListener('released', (e) => released.push(e.detail.reasons))
    await r.daemon.pause({ minutes: 30 })
    expect(r.daemon.state).toBe('paused')
    expect(r.daemon.status()).toMatchObject({ reason: 'paused by you', pausedUntil: expect.any(String) })
    expect(r.log).toEqual(['engine start garage-tiny', 'engine stop'])
    expect(released).toEqual([['paused by you']])
    // The head heard of the pause at once, not at the next tick.
    expect(r.reports.at(-1)?.state).toBe('paused')
    await r.daemon.pause({ source: 'host', reason: 'game: cs2.exe' })
    expect(r.daemon.status().reason).toBe('paused by you, game: cs2.exe')
    await r.daemon.resume()
    expect(r.daemon.state).toBe('paused')
    expect(r.daemon.status()).toMatchObject({ reason: 'game: cs2.exe', pausedUntil: null })
    await r.daemon.resume({ source: 'host' })
    expect(r.daemon.state).toBe('serving')
    expect(r.log).toEqual(['engine start garage-tiny', 'engine stop', 'engine start garage-tiny'])
    expect(r.joins).toHaveLength(2)
    expect(seen).toEqual(['paused', 'paused', 'paused', 'paused', 'starting', 'serving'])
  })

  it('a user pause with an end resumes by itself', async () => {
    const r = await rig()
    await r.daemon.start()
    const serving = new Promise<void>((resolve) =>
      r.daemon.addEventListener('state', (e) => e.detail.state === 'serving' && resolve()),
    )
    await r.daemon.pause({ until: new Date(Date.now() + 50) })
    expect(r.daemon.state).toBe('paused')
    await serving
    expect(r.daemon.status().pausedUntil).toBeNull()
  })

  it('stays paused, saying why, when the engine cannot start again; the next resume retries', async () => {
    const r = await rig()
    await r.daemon.start()
    await r.daemon.pause()
    r.failEngine.error = new Error('out of memory')
    await expect(r.daemon.resume()).rejects.toThrow('out of memory')
    expect(r.daemon.status()).toMatchObject({ state: 'paused', reason: 'could not resume: out of memory' })
    r.failEngine.error = null
    await r.daemon.pause()
    await r.daemon.resume()
    expect(r.daemon.state).toBe('serving')
  })

  it('rejoins when the head forgets it, one join at a time, and joins the new head discovery picks', async () => {
    const r = await rig({ telemetryIntervalMs: 10 })
    await r.daemon.start()
    let release = (): void => {}
    r.joining.gate = new Promise<void>((resolve) => {
      release = resolve
    })
    // The head answers not_joined to every report: each tick asks for a rejoin while one is under way.
    r.ack.value = 'not_joined'
    await vi.waitFor(() => expect(r.joining.now).toBe(1))
    // More not_joined answers while that join waits: none starts a second one.
    const reported = r.reports.length
    await vi.waitFor(() => expect(r.reports.length).toBeGreaterThan(reported + 3))
    expect(r.joining.most).toBe(1)
    r.ack.value = 'ok'
    release()
    await vi.waitFor(() => expect(r.joins).toHaveLength(2))
    expect(r.daemon.state).toBe('serving')
    // Reports are numbered from 1 again for the new entry (the head takes a high first number as
    // one sent before the join).
    await vi.waitFor(() => expect(r.reports.filter((x) => x.seq === 1)).toHaveLength(2))
    const finder = r.finder()
    const joinedNew = new Promise<void>((resolve) =>
      r.daemon.addEventListener('joined', (e) => e.detail.head === r.heads[1] && resolve()),
    )
    finder.safeDispatchEvent('region:chosen', { detail: head(r.heads[1]!) })
    await joinedNew
    expect(r.joins.at(-1)).toBe(r.heads[1])
    expect(r.daemon.status().head).toBe(r.heads[1])
    // Same model, same engine: a rejoin does not restart it.
    expect(r.log.filter((l) => l.startsWith('engine start'))).toHaveLength(1)
    expect(r.joining.most).toBe(1)
  })

  it('joins at once when the head it lost comes back (a restarted head forgot it): no wait for telemetry', async () => {
    const r = await rig()
    await r.daemon.start()
    expect(r.joins).toEqual([r.heads[0]])
    const finder = r.finder()
    // The same head chosen again without a loss: nothing to do.
    finder.safeDispatchEvent('region:chosen', { detail: head(r.heads[0]!) })
    expect(r.joins).toHaveLength(1)
    const rejoined = new Promise<void>((resolve) => r.daemon.addEventListener('joined', () => resolve()))
    finder.safeDispatchEvent('region:lost', { detail: head(r.heads[0]!) })
    finder.safeDispatchEvent('region:chosen', { detail: head(r.heads[0]!) })
    await rejoined
    expect(r.joins).toEqual([r.heads[0], r.heads[0]])
    expect(r.daemon.state).toBe('serving')
  })

  it("a head's not_joined after the node's leave (it is draining) starts no rejoin, and no engine after the stop", async () => {
    const r = await rig({ telemetryIntervalMs: 5, leaveDelayMs: 50 })
    await r.daemon.start()
    // From the leave on, the head no longer knows the node and says so to every report.
    r.daemon.addEventListener('state', (e) => {
      if (e.detail.state === 'draining') r.ack.value = 'not_joined'
    })
    await r.daemon.stop({ graceMs: 0 })
    // Reports that were in flight come back; none may bring the node back.
    await new Promise((resolve) => setTimeout(resolve, 50))
    expect(r.daemon.state).toBe('stopped')
    expect(r.joins).toHaveLength(1)
    expect(r.log.filter((l) => l.startsWith('engine start'))).toHaveLength(1)
    expect(r.log.at(-1)).toBe('engine stop')
  })

  it('stop drains, tells the head it leaves, stops the engine', async () => {
    const r = await rig()
    await r.daemon.start()
    const seen = states(r.daemon)
    await r.daemon.stop({ graceMs: 100 })
    expect(seen).toEqual(['draining', 'stopping', 'stopped'])
    expect(r.reports.at(-1)?.state).toBe('draining')
    expect(r.log.slice(-2)).toEqual(['leave head', 'engine stop'])
  })

  it('a start that fails stops what it started and says why', async () => {
    const r = await rig()
    r.failEngine.error = new Error('no such model file')
    await expect(r.daemon.start()).rejects.toThrow('no such model file')
    expect(r.daemon.status()).toMatchObject({ state: 'stopped', reason: 'no such model file' })
  })
})

describe('NodeDaemon: the engine an assignment names, and when vLLM cannot serve', () => {
  let dir: string
  const daemons: NodeDaemon[] = []

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-node-engines-'))
  })
  afterEach(async () => {
    for (const d of daemons.splice(0)) await d.stop({ graceMs: 0 })
    await rm(dir, { recursive: true, force: true })
  })

  /** A vLLM engine that fails to start with `failure`, or starts and can be made to crash. */
  class FakeVllm extends FakeEngine {
    override readonly kind = 'vllm' as never
    crash(message: string): void {
      this.safeDispatchEvent('crashed', { detail: { error: new Error(message), restarts: 5 } })
    }
  }

  /** A daemon on an NVIDIA machine whose head runs the real assignment rules over `engines`. */
  async function rig(engines: Array<'vllm' | 'llamacpp'>, vllmFailure: Error | null) {
    const log: string[] = []
    const reports: CapabilityReport[] = []
    const made: FakeEngine[] = []
    const selfKey = await loadOrCreateIdentity(dir)
    const self = peerIdFromPrivateKey(selfKey)
    const headId = peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString()
    const policy = parseRegionPolicy({
      region: 'eu-test',
      models: [
        {
          name: 'llama-3.1-8b-instruct',
          engine: engines,
          source: { hf: 'meta-llama/Llama-3.1-8B-Instruct', gguf: 'garage-tiny' },
          replicas: 1,
          minVramMiB: 0,
          minRamMiB: 16,
        },
      ],
    })
    const components: Partial<NodeComponents> = {
      createMeshNode: async () => ({ peerId: self, stop: async () => {} }) as unknown as MeshNode,
      createDiscovery: () => new FakeFinder(() => head(headId)),
      requestJoin: async (_node, peer, signed) => {
        const report = await verifyCapabilityReport(signed, {
          remotePeer: self,
          region: 'eu-test',
          now: Date.now(),
        })
        reports.push(report)
        const assignment = chooseAssignment(policy, report, new Map(), peer.toString())
        if (assignment == null)
          throw new JoinRefusedError('no_assignment', 'no model of region eu-test fits this node')
        return { ...assignment, telemetryIntervalMs: 60_000 }
      },
      requestLeave: async () => {},
      sendTelemetry: async () => 'ok',
      serveInfer: async () => ({ activeRequests: () => 0, idle: async () => {}, stop: async () => {} }),
      createEngine: (assignment) => {
        const engine =
          assignment.engine === 'vllm'
            ? new FakeVllm(log, () => vllmFailure)
            : new FakeEngine(log, () => null)
        made.push(engine)
        return engine
      },
    }
    const daemon = new NodeDaemon({
      dataDir: dir,
      authority: headId,
      bootstrap: [],
      hardware: nvidiaMachine(),
      hostPolicies: false,
      rayOptIn: true,
      components,
    })
    daemons.push(daemon)
    return { daemon, log, reports, made }
  }

  it('runs vLLM when the head assigns it, on a machine with an NVIDIA GPU and a container path', async () => {
    const r = await rig(['vllm', 'llamacpp'], null)
    await r.daemon.start()
    expect(r.reports[0]!.engines).toEqual(['llamacpp', 'vllm', 'ray-worker'])
    expect(r.daemon.status().engine).toMatchObject({ kind: 'vllm', failed: [] })
    expect(r.made.map((e) => e.kind)).toEqual(['vllm'])
  })

  it('falls back to the embedded engine when vLLM cannot start, and tells the head why', async () => {
    const reason =
      'pulling docker.io/vllm/vllm-openai:v0.30.0 failed: dial tcp: lookup docker.io: no such host'
    const r = await rig(['vllm', 'llamacpp'], new Error(reason))
    await r.daemon.start()
    expect(r.daemon.state).toBe('serving')
    expect(r.made.map((e) => e.kind)).toEqual(['vllm', 'llamacpp'])
    const again = r.reports.at(-1)!
    expect(again.engines).toEqual(['llamacpp'])
    expect(again.engineFailures).toEqual([{ engine: 'vllm', reason }])
    expect(r.daemon.status().engine).toMatchObject({
      kind: 'llamacpp',
      failed: [{ engine: 'vllm', reason: expect.stringContaining('no such host') }],
    })
  })

  it('moves to the embedded engine when vLLM crash-loops after it served', async () => {
    const r = await rig(['vllm', 'llamacpp'], null)
    await r.daemon.start()
    const joined = new Promise<void>((resolve) =>
      r.daemon.addEventListener('joined', () => resolve(), { once: true }),
    )
    ;(r.made[0] as FakeVllm).crash('the vLLM container exited 5 times in 10 minutes: CUDA out of memory')
    await joined
    await vi.waitFor(() => expect(r.daemon.status().engine?.kind).toBe('llamacpp'))
    expect(r.reports.at(-1)!.engineFailures?.[0]?.reason).toMatch(/CUDA out of memory/)
  })

  it('says what failed when the region has nothing else for it', async () => {
    const r = await rig(['vllm'], new Error('the image localhost/vllm:missing does not exist'))
    await expect(r.daemon.start()).rejects.toThrow(
      /vllm failed \(the image localhost\/vllm:missing does not exist\), and the head has nothing else for this node: .*no model of region eu-test fits/,
    )
  })
})

describe('the engine a vllm assignment makes', () => {
  it('reads the Hugging Face token from a 0600 file in the data dir, and refuses one others can read', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'garage-hf-'))
    try {
      expect(await readHuggingFaceToken(dir)).toBeUndefined()
      await writeFile(join(dir, 'huggingface.token'), 'hf_secret\n', { mode: 0o600 })
      expect(await readHuggingFaceToken(dir)).toBe('hf_secret')
      await chmod(join(dir, 'huggingface.token'), 0o644)
      await expect(readHuggingFaceToken(dir)).rejects.toThrow(/mode 644.*chmod 600/)
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })

  it("tells a pull's progress as a status line", () => {
    const base = {
      image: 'docker.io/vllm/vllm-openai:v0.30.0',
      layersTotal: 0,
      layersDone: 0,
      bytesDone: null,
      bytesTotal: null,
      fraction: null,
      line: '',
    }
    expect(pullDetail({ ...base, phase: 'resolving' })).toBe('pulling docker.io/vllm/vllm-openai:v0.30.0')
    expect(
      pullDetail({ ...base, phase: 'downloading', fraction: 0.421, bytesDone: 3.4e9, bytesTotal: 8.1e9 }),
    ).toBe('pulling docker.io/vllm/vllm-openai:v0.30.0: 42% (3.4 GB of 8.1 GB)')
    expect(pullDetail({ ...base, phase: 'extracting', layersTotal: 12, layersDone: 5, fraction: 0.41 })).toBe(
      'pulling docker.io/vllm/vllm-openai:v0.30.0: 41% (5 of 12 layers)',
    )
    expect(pullDetail({ ...base, phase: 'done' })).toBe('pulled docker.io/vllm/vllm-openai:v0.30.0')
  })

  it('gets the GPU on the path the probe found: CDI devices with Podman, --gpus with Docker', () => {
    const m = nvidiaMachine()
    expect(vllmGpuRequest(m, 'podman')).toBe('all')
    expect(
      vllmGpuRequest(
        { ...m, nvidiaContainer: { ...m.nvidiaContainer, cdiDevices: ['nvidia.com/gpu=0'] } },
        'podman',
      ),
    ).toEqual({
      devices: ['nvidia.com/gpu=0'],
    })
    expect(vllmGpuRequest(m, 'docker')).toBe('all')
  })

  it('is VllmEngine on the runtime with a GPU path, and a clear error where vLLM cannot run', () => {
    const assignment: Assignment = {
      v: 1,
      region: 'eu-test',
      head: 'h',
      model: 'm',
      engine: 'vllm',
      source: { hf: 'org/m' },
      engineArgs: {},
      telemetryIntervalMs: 2_000,
    }
    const init = (hardware: HardwareReport) => ({
      dataDir: '/tmp/x',
      nodePeerId: () => '12D3KooWTest',
      hardware: () => hardware,
      logger: silentLogger,
    })
    const context = { onPullProgress: () => {} }
    expect(createNodeEngine(assignment, context, init(nvidiaMachine()))).toBeInstanceOf(VllmEngine)
    expect(
      createNodeEngine({ ...assignment, engine: 'llamacpp' }, context, init(cpuOnlyMachine())),
    ).toBeInstanceOf(LlamaCppEngine)
    expect(() => createNodeEngine(assignment, context, init(cpuOnlyMachine()))).toThrow(
      /vLLM needs an NVIDIA GPU/,
    )
  })
})
