import { access, mkdir } from 'node:fs/promises'
import { isAbsolute, join } from 'node:path'
import type { PeerId, PrivateKey } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { TypedEventEmitter } from 'main-event'
import { GarageError } from '../core/errors.ts'
import { type Logger, type LogTail, silentLogger } from '../core/logger.ts'
import { signCapabilityReport } from '../mesh/capability-report.ts'
import { type DiscoveredHead, RegionDiscovery } from '../mesh/discovery.ts'
import { loadOrCreateIdentity } from '../mesh/identity.ts'
import { JoinRefusedError, requestJoin, requestLeave } from '../mesh/join-protocol.ts'
import { createMeshNode, type MeshNode } from '../mesh/node.ts'
import type {
  Assignment,
  CapabilityReport,
  GpuTelemetry,
  NodeServingState,
  TelemetryReport,
} from '../mesh/region-messages.ts'
import { sendTelemetry, TelemetryReporter } from '../mesh/telemetry-protocol.ts'
import { defaultSettings } from './control/settings.ts'
import type { ControlEvents, ControlTarget, NodeSettings, NodeStatus } from './control/types.ts'
import { LlamaCppEngine } from './engines/llamacpp/engine.ts'
import { pullGgufModel } from './engines/llamacpp/gguf-pull.ts'
import { writeTinyModel } from './engines/llamacpp/tiny-model.ts'
import { RayWorker } from './engines/ray/worker.ts'
import type { Engine, EngineHandle } from './engines/types.ts'
import { cpuRamShare, llamaCppCapability, vllmCapability } from './hardware/capability.ts'
import { nvidiaGpuArgs, parseNvidiaGpus } from './hardware/nvidia.ts'
import { probeHardware } from './hardware/probe.ts'
import { runTool } from '../core/tools.ts'
import type { HardwareReport } from './hardware/types.ts'
import { HostPolicyMonitor, type HostPolicyState } from './host/monitor.ts'
import { createHostSampler, type HostSampler } from './host/sampler.ts'
import { type InferMeshServer, serveInferOverMesh } from './infer-handler.ts'

export class NodeJoinError extends GarageError {}

export type NodeDaemonState = 'stopped' | 'starting' | NodeServingState | 'stopping'

export interface NodeDaemonEvents extends ControlEvents {
  joined: CustomEvent<{ head: string; region: string; assignment: Assignment }>
  /** The engine let go of the model (and the GPU) for a pause: how long it took from the pause. */
  released: CustomEvent<{ ms: number; reasons: string[] }>
}

/** Sums a cumulative counter that may restart (a rejoin) into a per-UTC-day total. */
class DailyTotal {
  private day = ''
  private today = 0
  private last = 0

  feed(cumulative: number, now = new Date()): void {
    const day = now.toISOString().slice(0, 10)
    if (day !== this.day) {
      this.day = day
      this.today = 0
    }
    this.today += cumulative >= this.last ? cumulative - this.last : cumulative
    this.last = cumulative
  }

  /** A counter that restarts from zero (a new join) must not count its first value twice. */
  restart(): void {
    this.last = 0
  }

  value(now = new Date()): number {
    return now.toISOString().slice(0, 10) === this.day ? this.today : 0
  }
}

export interface NodeDaemonOptions {
  dataDir: string
  /** Pinned federation authority (PeerId form). */
  authority: string
  bootstrap: string[]
  /** Pin a region; default: the lowest RTT. */
  region?: string
  listen?: string[]
  allowPrivateAddresses?: boolean
  logger?: Logger
  /** The machine as the probe sees it; default: probe it now. */
  hardware?: HardwareReport
  /** The most GPU memory Garage may use (MiB); default: 90% of the largest GPU. */
  vramCapMiB?: number
  /** Memory a CPU model may use (MiB); default: 75% of RAM. */
  ramCapMiB?: number
  /** Embedded engine CPU threads. */
  threads?: number
  /** Embedded engine cap per sequence (a volunteer's limit). */
  maxTokensPerSecond?: number
  /** How long in-flight requests may take to finish when the node drains. */
  drainGraceMs?: number
  rayOptIn?: boolean
  /** The address the region's Ray head reaches this node at (LAN or VPN); default 127.0.0.1. */
  rayNodeIpAddress?: string
  /** For tests: make the Ray worker (default: a container through Podman or Docker). */
  createRayWorker?: () => RayWorker
  /** Where models are kept (default `<dataDir>/models`). */
  modelsDir?: string
  daemonVersion?: string
  /** For tests: make the engine (default: the embedded llama.cpp engine). */
  createEngine?: (assignment: Assignment) => Engine
  /**
   * How long requests in flight may run when the node pauses before the engine is stopped (the
   * GPU must be free within 2 s of a game starting).
   */
  pauseGraceMs?: number
  /** Where `logs()` reads from (the CLI passes the tail its logger writes to). */
  logTail?: LogTail
  /** User settings in force at start (the control API changes them later). */
  settings?: NodeSettings
  /** Persists settings changed through the control API. */
  saveSettings?: (settings: NodeSettings) => Promise<void>
  /** Pause when a game runs, on battery, outside the schedule... (default on; docs/host-policies.md). */
  hostPolicies?: boolean
  /** How often the host is sampled (default 1 s: a game frees the GPU within about 1.2 s at worst). */
  hostPolicyIntervalMs?: number
}

export const defaultPauseGraceMs = 1_000
/** Sampling the host costs ~1.5 ms; once a second keeps an idle node under 1% CPU. */
export const defaultHostPolicyIntervalMs = 1_000

export const defaultNodeSettings: NodeSettings = Object.freeze(defaultSettings()) as NodeSettings

export const defaultDrainGraceMs = 30_000
const joinTimeoutMs = 15_000
const leaveTimeoutMs = 5_000
const gpuTelemetryTimeoutMs = 2_000

/** The capability report a node sends to join: what it has, what it may use, what it can run. */
export function capabilityFromHardware(
  peerId: string,
  region: string,
  hw: HardwareReport,
  init: {
    vramCapMiB?: number
    ramCapMiB?: number
    rayOptIn?: boolean
    daemonVersion: string
    paused?: string
  },
): CapabilityReport {
  const largest = Math.max(0, ...hw.gpus.map((g) => g.vramTotalMiB))
  const vllm = vllmCapability(hw).available
  const engines: CapabilityReport['engines'] = []
  if (llamaCppCapability(hw).available) engines.push('llamacpp')
  if (vllm) engines.push('vllm')
  if (vllm && init.rayOptIn === true) engines.push('ray-worker')
  return {
    v: 1,
    peerId,
    region,
    daemonVersion: init.daemonVersion,
    issuedAt: Date.now(),
    hardware: {
      gpus: hw.gpus.slice(0, 16).map((g) => ({
        vendor: g.vendor,
        name: g.name.slice(0, 128),
        vramMiB: Math.round(g.vramTotalMiB),
      })),
      ramMiB: Math.round(hw.system.memory.totalMiB),
      cpuCores: hw.system.cpu.cores,
    },
    engines,
    vramCapMiB: Math.round(init.vramCapMiB ?? largest * 0.9),
    ramCapMiB: Math.round(init.ramCapMiB ?? hw.system.memory.totalMiB * cpuRamShare),
    hostPolicy: init.paused != null ? { state: 'paused', reason: init.paused } : { state: 'clear' },
    rayOptIn: init.rayOptIn === true,
  }
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  )
}

/**
 * `garage node`: probe → discovery → join → engine → telemetry → serve over /garage/infer/1.0.0.
 * stop() drains (no new requests, in-flight ones finish within the grace period) and leaves.
 */
export class NodeDaemon extends TypedEventEmitter<NodeDaemonEvents> implements ControlTarget {
  private readonly options: NodeDaemonOptions
  private readonly log: Logger
  private current: NodeDaemonState = 'stopped'
  private key: PrivateKey | null = null
  private node: MeshNode | null = null
  private discovery: RegionDiscovery | null = null
  private hardware: HardwareReport | null = null
  private head: DiscoveredHead | null = null
  private assignment: Assignment | null = null
  private engine: Engine | null = null
  private handle: EngineHandle | null = null
  private infer: InferMeshServer | null = null
  private reporter: TelemetryReporter | null = null
  private seq = 0
  /** Engine counters when this node joined: telemetry reports tokens since the join. */
  private baseline = { generation: 0, prompt: 0 }
  private lastRate = { at: 0, tokens: 0, perSecond: 0 }
  private rejoining: Promise<void> | null = null
  private rayWorker: RayWorker | null = null
  /** Why the node is paused: 'user' and/or host-policy reasons. Paused while any remains. */
  private readonly pauseReasons = new Map<string, string[]>()
  private pausedUntil: Date | null = null
  private pauseTimer: NodeJS.Timeout | null = null
  private readonly startedAt = Date.now()
  private readonly tokensToday = new DailyTotal()
  private readonly creditsToday = new DailyTotal()
  private currentSettings: NodeSettings
  private statsTimer: NodeJS.Timeout | null = null
  /** Pause and resume run one at a time, in order. */
  private transitions: Promise<void> = Promise.resolve()
  private idleSeconds: number | null = null
  /** Why the node entered its current state (a failed start says what failed). */
  private stateReason: string | null = null
  private hostSampler: HostSampler | null = null
  private hostMonitor: HostPolicyMonitor | null = null

  constructor(options: NodeDaemonOptions) {
    super()
    this.options = options
    this.log = (options.logger ?? silentLogger).child({ component: 'daemon' })
    this.currentSettings = { ...defaultNodeSettings, ...options.settings }
  }

  get state(): NodeDaemonState {
    return this.current
  }

  get peerId(): string | null {
    return this.node?.peerId.toString() ?? null
  }

  get meshNode(): MeshNode | null {
    return this.node
  }

  /** Where the node is and what it serves, for status displays and devnet.json. */
  info(): {
    peerId: string | null
    region: string | null
    head: string | null
    rttMs: number | null
    model: string | null
    engineUrl: string | null
    engineKey: string | null
    state: NodeDaemonState
  } {
    return {
      peerId: this.peerId,
      region: this.head?.region ?? null,
      head: this.head?.peerId ?? null,
      rttMs: this.head?.rttMs ?? null,
      model: this.assignment?.model ?? null,
      engineUrl: this.handle?.baseUrl ?? null,
      engineKey: this.handle?.apiKey ?? null,
      state: this.current,
    }
  }

  private setState(state: NodeDaemonState, reason?: string): void {
    if (state === this.current) return
    this.current = state
    this.stateReason = reason ?? null
    this.log.info({ state, reason }, 'node state')
    this.safeDispatchEvent('state', { detail: this.status() })
  }

  /** The control API's view: state, where, what, how fast, what it earned today. */
  status(): NodeStatus {
    const gpu = this.hardware?.gpus[0]
    const reasons = [...this.pauseReasons.values()].flat()
    return {
      state: this.current,
      reason: this.current === 'paused' && reasons.length > 0 ? reasons.join(', ') : this.stateReason,
      pausedUntil: this.pausedUntil?.toISOString() ?? null,
      peerId: this.peerId,
      region: this.head?.region ?? null,
      head: this.head?.peerId ?? null,
      model: this.assignment?.model ?? null,
      engine:
        this.assignment != null ? { kind: this.assignment.engine, url: this.handle?.baseUrl ?? null } : null,
      gpu:
        gpu != null
          ? {
              name: gpu.name,
              vramMiB: gpu.vramTotalMiB,
              utilizationPct: gpu.utilizationPct,
              temperatureC: gpu.temperatureC,
            }
          : null,
      tokensPerSecond: Math.max(0, Math.round(this.lastRate.perSecond * 10) / 10),
      tokensToday: this.tokensToday.value(),
      creditsToday: this.creditsToday.value(),
      uptimeSeconds: Math.round((Date.now() - this.startedAt) / 1000),
    }
  }

  settings(): NodeSettings {
    return { ...this.currentSettings }
  }

  async updateSettings(patch: Partial<NodeSettings>): Promise<NodeSettings> {
    this.currentSettings = { ...this.currentSettings, ...patch }
    await this.options.saveSettings?.(this.currentSettings)
    this.log.info({ settings: Object.keys(patch) }, 'settings changed')
    return this.settings()
  }

  logs(lines: number): string[] {
    return this.options.logTail?.last(lines) ?? []
  }

  reportIdle(seconds: number): void {
    this.idleSeconds = seconds
    this.hostSampler?.idle.report(seconds)
  }

  /** What the host policies see now (for status displays and tests). */
  hostPolicy(): HostPolicyState | null {
    return this.hostMonitor?.current() ?? null
  }

  /** Watches the host: a game, the schedule, battery, temperature, idle-only mode pause the node. */
  private startHostPolicies(): void {
    if (this.options.hostPolicies === false) return
    const sampler = createHostSampler({
      nvidia: this.hardware?.nvidia.status === 'ok',
      // The engine's own work on the GPU must not count as "someone else is using it".
      ourPids: () => {
        const pid = (this.engine as { pid?: number | null } | null)?.pid
        return pid != null ? [pid] : []
      },
      settings: () => this.currentSettings,
    })
    const monitor = new HostPolicyMonitor({
      sample: (o) => sampler.sample(o),
      settings: () => this.currentSettings,
      intervalMs: this.options.hostPolicyIntervalMs ?? defaultHostPolicyIntervalMs,
      logger: this.log,
    })
    monitor.addEventListener('pause', (evt) => {
      void this.pause({ source: 'host', reason: evt.detail.reasons.join(', ') }).catch(() => {})
    })
    monitor.addEventListener('resume', () => {
      void this.resume({ source: 'host' }).catch(() => {})
    })
    this.hostSampler = sampler
    this.hostMonitor = monitor
    monitor.start()
  }

  /** Seconds without user input, as the tray app last reported (null: unknown). */
  get userIdleSeconds(): number | null {
    return this.idleSeconds
  }

  async start(): Promise<void> {
    if (this.current !== 'stopped') throw new GarageError(`the node is ${this.current}`, 'NODE_STATE')
    this.setState('starting')
    try {
      const o = this.options
      this.key = await loadOrCreateIdentity(o.dataDir)
      this.hardware =
        o.hardware ?? (await probeHardware({ dataDir: o.dataDir, commandTimeoutMs: 5_000, otherGpus: false }))
      this.node = await createMeshNode({
        privateKey: this.key,
        ...(o.listen != null ? { listen: o.listen } : {}),
        bootstrap: o.bootstrap,
        allowPrivateAddresses: o.allowPrivateAddresses ?? false,
      })
      this.discovery = new RegionDiscovery(this.node, {
        authority: o.authority,
        ...(o.region != null ? { region: o.region } : {}),
      })
      this.discovery.addEventListener('region:lost', (evt) => {
        this.log.warn({ head: evt.detail.peerId }, 'lost the regional head; finding a region again')
      })
      this.discovery.addEventListener('region:chosen', (evt) => {
        // A new head after a loss: join it (the first choice is joined by start()).
        if (this.head != null && this.head.peerId !== evt.detail.peerId && this.current !== 'stopping') {
          this.head = evt.detail
          void this.rejoin('head changed')
        }
      })
      this.discovery.start()
      this.head = await this.discovery.choose()
      this.infer = await serveInferOverMesh(this.node, {
        allowedHeads: () => new Set(this.assignment != null ? [this.assignment.head] : []),
        // A request the head routed just before it learnt of a drain is still served.
        engine: () =>
          this.handle != null && (this.current === 'serving' || this.current === 'draining')
            ? { baseUrl: this.handle.baseUrl, apiKey: this.handle.apiKey }
            : null,
        logger: this.log,
      })
      await this.join()
      this.reporter = new TelemetryReporter({
        intervalMs: this.assignment!.telemetryIntervalMs,
        send: (report) => this.sendReport(report),
        collect: () => this.collect(),
        onNotJoined: () => void this.rejoin('the head does not know this node'),
        onError: (err) => this.log.debug({ err: err.message }, 'telemetry not delivered'),
      })
      this.setState('serving')
      this.reporter.start()
      // 1 Hz numbers for the dashboard's chart.
      this.statsTimer = setInterval(() => {
        const st = this.status()
        this.safeDispatchEvent('stats', {
          detail: {
            tokensPerSecond: st.tokensPerSecond,
            tokensToday: st.tokensToday,
            creditsToday: st.creditsToday,
            at: new Date().toISOString(),
          },
        })
      }, 1_000)
      this.statsTimer.unref()
      this.startHostPolicies()
    } catch (err) {
      await this.teardown()
      this.setState('stopped', (err as Error).message)
      throw err
    }
  }

  private async sendReport(report: Omit<TelemetryReport, 'v' | 'seq'>): Promise<'ok' | 'not_joined'> {
    if (this.node == null || this.assignment == null) return 'ok'
    const full: TelemetryReport = { v: 1, seq: ++this.seq, ...report }
    return sendTelemetry(this.node, peerIdFromString(this.assignment.head) as PeerId, full, {
      signal: AbortSignal.timeout(5_000),
      onVerified: (tokens) => this.creditsToday.feed(tokens),
    })
  }

  /** Joins the chosen head and starts (or keeps) the engine the assignment names. */
  private async join(): Promise<void> {
    const node = this.node!
    const head = this.head!
    if (head.region == null) throw new NodeJoinError(`head ${head.peerId} has no region`, 'NO_REGION')
    const report = capabilityFromHardware(node.peerId.toString(), head.region, this.hardware!, {
      // The user's VRAM cap (settings) wins over the command line's; it sizes the engine's memory.
      ...((this.currentSettings.vramCapMiB ?? this.options.vramCapMiB) != null
        ? { vramCapMiB: (this.currentSettings.vramCapMiB ?? this.options.vramCapMiB)! }
        : {}),
      ...(this.options.ramCapMiB != null ? { ramCapMiB: this.options.ramCapMiB } : {}),
      rayOptIn: this.options.rayOptIn === true,
      daemonVersion: this.options.daemonVersion ?? '0.1.0',
    })
    const signed = await signCapabilityReport(this.key!, report)
    let assignment: Assignment
    try {
      assignment = await requestJoin(node, peerIdFromString(head.peerId) as PeerId, signed, {
        signal: AbortSignal.timeout(joinTimeoutMs),
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
        {
          cause: err,
        },
      )
    }
    const previous = this.assignment
    this.assignment = assignment
    this.seq = 0
    this.safeDispatchEvent('joined', { detail: { head: head.peerId, region: head.region, assignment } })
    this.log.info({ region: head.region, head: head.peerId, model: assignment.model }, 'joined the region')
    const sameModel =
      previous != null &&
      previous.model === assignment.model &&
      previous.engine === assignment.engine &&
      this.handle != null
    if (!sameModel) {
      if (this.engine != null) await this.engine.stop()
      this.handle = null
      await this.startEngine(assignment)
    }
    await this.startRayWorker(assignment)
    const m = await this.engine!.metrics().catch(() => null)
    this.baseline = {
      generation: m?.['vllm:generation_tokens_total'] ?? 0,
      prompt: m?.['vllm:prompt_tokens_total'] ?? 0,
    }
    this.lastRate = { at: performance.now(), tokens: 0, perSecond: 0 }
    // Both cumulative counts start again from zero with this join.
    this.tokensToday.restart()
    this.creditsToday.restart()
  }

  private async startEngine(assignment: Assignment): Promise<void> {
    const engine = this.options.createEngine?.(assignment) ?? new LlamaCppEngine()
    this.engine = engine
    engine.addEventListener('crashed', (evt) => {
      this.log.error({ err: evt.detail.error.message }, 'engine crashed')
    })
    const model = assignment.engine === 'llamacpp' ? await this.resolveGguf(assignment) : assignment.source.hf
    if (model == null) {
      throw new NodeJoinError(
        `the assignment for ${assignment.model} names no model source`,
        'NO_MODEL_SOURCE',
      )
    }
    this.handle = await engine.start({
      model,
      servedModelName: assignment.model,
      ...(assignment.engineArgs.parallel != null ? { parallel: assignment.engineArgs.parallel } : {}),
      ...(assignment.engineArgs.contextLength != null
        ? { contextLength: assignment.engineArgs.contextLength }
        : {}),
      ...(assignment.engineArgs.gpuMemoryUtilization != null
        ? { gpuMemoryUtilization: assignment.engineArgs.gpuMemoryUtilization }
        : {}),
      ...(this.options.threads != null ? { threads: this.options.threads } : {}),
      ...(this.options.maxTokensPerSecond != null
        ? { maxTokensPerSecond: this.options.maxTokensPerSecond }
        : {}),
    })
    this.log.info({ model: assignment.model, url: this.handle.baseUrl }, 'engine ready')
  }

  /**
   * Joins the region's Ray cluster when the assignment carries its credentials: the head sends them
   * only to nodes that opted in, for a cluster its certificate marks as trusted. A failure here
   * leaves the node serving its own model.
   */
  private async startRayWorker(assignment: Assignment): Promise<void> {
    if (assignment.ray == null || this.rayWorker != null) return
    const trusted = this.head?.certificate?.rayTrusted === true
    const worker =
      this.options.createRayWorker?.() ??
      new RayWorker({
        nodePeerId: this.node!.peerId.toString(),
        dataDir: this.options.dataDir,
        optIn: this.options.rayOptIn === true,
        logger: this.log,
      })
    const nvidia = this.hardware?.gpus.filter((g) => g.vendor === 'nvidia') ?? []
    try {
      await worker.start({
        assignment: {
          region: assignment.region,
          headAddress: assignment.ray.address,
          token: assignment.ray.token,
          trusted,
          nodeIpAddress: this.options.rayNodeIpAddress ?? '127.0.0.1',
        },
        numGpus: nvidia.length,
        vramMiB: Math.min(
          this.options.vramCapMiB ?? Number.POSITIVE_INFINITY,
          nvidia.reduce((n, g) => n + g.vramTotalMiB, 0),
        ),
      })
      this.rayWorker = worker
      this.log.info({ head: assignment.ray.address }, "joined the region's Ray cluster")
    } catch (err) {
      this.log.error(
        { err: (err as Error).message },
        "cannot join the region's Ray cluster; serving without it",
      )
    }
  }

  /** The GGUF file the assignment names: the project's tiny model, a local path, or an hf: download. */
  private async resolveGguf(assignment: Assignment): Promise<string> {
    const source = assignment.source.gguf
    const dir = this.options.modelsDir ?? join(this.options.dataDir, 'models')
    if (source == null) throw new NodeJoinError(`no GGUF source for ${assignment.model}`, 'NO_MODEL_SOURCE')
    if (source === 'garage-tiny') {
      const path = join(dir, 'garage-tiny.gguf')
      if (!(await exists(path))) {
        await mkdir(dir, { recursive: true })
        await writeTinyModel(path)
      }
      return path
    }
    if (source.startsWith('hf:') || source.startsWith('https://')) {
      let lastLog = 0
      const pulled = await pullGgufModel(source, {
        dir,
        onProgress: (p) => {
          if (Date.now() - lastLog < 5_000) return
          lastLog = Date.now()
          this.log.info(
            { model: assignment.model, done: p.downloadedBytes, total: p.totalBytes },
            'downloading model',
          )
        },
      })
      return pulled.path
    }
    if (!isAbsolute(source) || !(await exists(source))) {
      throw new NodeJoinError(
        `the model file ${source} for ${assignment.model} is not on this machine`,
        'MODEL_MISSING',
      )
    }
    return source
  }

  private async collect(): Promise<Omit<TelemetryReport, 'v' | 'seq'>> {
    const m = await this.engine?.metrics().catch(() => null)
    const tokensTotal = Math.max(0, (m?.['vllm:generation_tokens_total'] ?? 0) - this.baseline.generation)
    if (m != null) this.tokensToday.feed(tokensTotal)
    const now = performance.now()
    const elapsed = (now - this.lastRate.at) / 1000
    if (elapsed >= 1) {
      this.lastRate = {
        at: now,
        tokens: tokensTotal,
        perSecond: (tokensTotal - this.lastRate.tokens) / elapsed,
      }
    }
    const gpu = await this.gpuTelemetry()
    const state: NodeServingState =
      this.current === 'serving' || this.current === 'paused' || this.current === 'draining'
        ? this.current
        : 'starting'
    return {
      state,
      model: this.assignment?.model ?? '',
      tokensTotal,
      promptTokensTotal: Math.max(0, (m?.['vllm:prompt_tokens_total'] ?? 0) - this.baseline.prompt),
      tokensPerSecond: Math.max(0, Math.round(this.lastRate.perSecond * 10) / 10),
      running: m?.['vllm:num_requests_running'] ?? 0,
      waiting: m?.['vllm:num_requests_waiting'] ?? 0,
      kvCacheUsage: Math.min(1, Math.max(0, m?.['vllm:kv_cache_usage_perc'] ?? 0)),
      ...(gpu != null ? { gpu } : {}),
    }
  }

  /** Utilisation, temperature and power of the first NVIDIA GPU, when there is one. */
  private async gpuTelemetry(): Promise<GpuTelemetry | null> {
    if (this.hardware?.nvidia.status !== 'ok') return null
    const result = await runTool('nvidia-smi', nvidiaGpuArgs, { timeoutMs: gpuTelemetryTimeoutMs })
    if (result.status !== 'ok') return null
    const gpu = parseNvidiaGpus(result.stdout)[0]
    if (gpu == null) return null
    return {
      utilizationPct: gpu.utilizationPct ?? 0,
      temperatureC: gpu.temperatureC ?? 0,
      powerW: gpu.powerDrawW ?? 0,
    }
  }

  private async rejoin(reason: string): Promise<void> {
    if (this.rejoining != null || this.current === 'stopping' || this.current === 'stopped') return
    this.log.info({ reason }, 'joining the region again')
    this.rejoining = (async () => {
      try {
        if (this.head == null && this.discovery != null) this.head = await this.discovery.choose()
        await this.join()
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'rejoin failed; the next telemetry tick retries')
      } finally {
        this.rejoining = null
      }
    })()
    await this.rejoining
  }

  /** Sends a telemetry report now rather than at the next tick (state changes the head must know). */
  private async reportNow(): Promise<void> {
    await this.collect()
      .then((r) => this.sendReport(r))
      .catch((err: Error) => this.log.debug({ err: err.message }, 'telemetry not delivered'))
  }

  /**
   * Pauses the node: the head stops routing here at once, requests in flight get up to the pause
   * grace period, then the engine stops and frees the GPU. Several sources may hold a pause (the
   * user, a game, the schedule); the node resumes when none does. `source` 'user' takes
   * minutes/until; host policies pass their own source and reasons.
   */
  async pause(
    options: { minutes?: number; until?: Date; reason?: string; source?: string } = {},
  ): Promise<void> {
    const source = options.source ?? 'user'
    this.pauseReasons.set(source, [options.reason ?? (source === 'user' ? 'paused by you' : source)])
    if (source === 'user') {
      if (this.pauseTimer != null) clearTimeout(this.pauseTimer)
      this.pauseTimer = null
      const until =
        options.until ?? (options.minutes != null ? new Date(Date.now() + options.minutes * 60_000) : null)
      this.pausedUntil = until
      if (until != null) {
        this.pauseTimer = setTimeout(() => void this.resume(), Math.max(0, until.getTime() - Date.now()))
        this.pauseTimer.unref()
      }
    }
    await this.transition()
  }

  /** Lifts a pause (the user's by default); the node serves again when no other pause holds. */
  async resume(options: { source?: string } = {}): Promise<void> {
    const source = options.source ?? 'user'
    this.pauseReasons.delete(source)
    if (source === 'user') {
      if (this.pauseTimer != null) clearTimeout(this.pauseTimer)
      this.pauseTimer = null
      this.pausedUntil = null
    }
    await this.transition()
  }

  /** Moves between serving and paused to match the pause reasons, one move at a time. */
  private transition(): Promise<void> {
    const next = this.transitions.then(async () => {
      const wantPaused = this.pauseReasons.size > 0
      if (wantPaused && this.current === 'serving') await this.enterPause()
      else if (wantPaused && this.current === 'paused')
        this.safeDispatchEvent('state', { detail: this.status() })
      else if (!wantPaused && this.current === 'paused') await this.leavePause()
    })
    this.transitions = next.catch((err: Error) => {
      this.log.error({ err: err.message }, 'pause or resume failed')
    })
    return next
  }

  private async enterPause(): Promise<void> {
    const started = performance.now()
    const reasons = [...this.pauseReasons.values()].flat()
    this.setState('paused', reasons.join(', '))
    // The head learns at once, not at the next tick: nothing new is routed here from now on.
    await this.reportNow()
    let timer: NodeJS.Timeout | undefined
    await Promise.race([
      this.infer?.idle() ?? Promise.resolve(),
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, this.options.pauseGraceMs ?? defaultPauseGraceMs)
      }),
    ])
    clearTimeout(timer)
    // Free the GPU: the engine process exits and takes the model with it.
    const engine = this.engine
    this.engine = null
    await engine?.stop()
    this.handle = null
    const ms = Math.round(performance.now() - started)
    this.log.info({ ms, reasons }, 'paused: the engine released the model')
    this.safeDispatchEvent('released', { detail: { ms, reasons } })
    // Watchers (the dashboard, the tray) see the engine gone.
    this.safeDispatchEvent('state', { detail: this.status() })
  }

  private async leavePause(): Promise<void> {
    this.log.info('resuming: starting the engine and joining again')
    this.setState('starting')
    try {
      if (this.assignment != null) await this.startEngine(this.assignment)
      await this.join()
      this.setState('serving')
      await this.reportNow()
    } catch (err) {
      // Stay paused-but-wanting-to-serve: the next resume or rejoin retries.
      this.log.error({ err: (err as Error).message }, 'could not resume')
      this.setState('paused', `could not resume: ${(err as Error).message}`)
      throw err
    }
  }

  /** Stop taking requests, let in-flight ones finish (up to the grace period), leave, stop. */
  async stop(options: { graceMs?: number } = {}): Promise<void> {
    if (this.current === 'stopped' || this.current === 'stopping') return
    const graceMs = options.graceMs ?? this.options.drainGraceMs ?? defaultDrainGraceMs
    if (this.current === 'serving' || this.current === 'paused') {
      this.setState('draining')
      // Tell the head at once, not at the next tick: it stops routing here now.
      await this.reportNow()
      const started = performance.now()
      let timer: NodeJS.Timeout | undefined
      await Promise.race([
        this.infer?.idle() ?? Promise.resolve(),
        new Promise<void>((resolve) => {
          timer = setTimeout(resolve, graceMs)
        }),
      ])
      clearTimeout(timer)
      this.log.info(
        { ms: Math.round(performance.now() - started), left: this.infer?.activeRequests() ?? 0 },
        'drained',
      )
      if (this.node != null && this.assignment != null) {
        await requestLeave(this.node, peerIdFromString(this.assignment.head) as PeerId, {
          signal: AbortSignal.timeout(leaveTimeoutMs),
        }).catch((err: Error) => this.log.debug({ err: err.message }, 'leave not delivered'))
      }
    }
    this.setState('stopping')
    await this.teardown()
    this.setState('stopped')
  }

  private async teardown(): Promise<void> {
    if (this.pauseTimer != null) clearTimeout(this.pauseTimer)
    if (this.statsTimer != null) clearInterval(this.statsTimer)
    this.statsTimer = null
    await this.hostMonitor?.stop().catch(() => {})
    this.hostMonitor = null
    await Promise.resolve(this.hostSampler?.close()).catch(() => {})
    this.hostSampler = null
    this.reporter?.stop()
    this.reporter = null
    this.discovery?.stop()
    await this.rayWorker?.stop().catch(() => {})
    this.rayWorker = null
    await this.infer?.stop().catch(() => {})
    this.infer = null
    await this.engine?.stop().catch(() => {})
    this.engine = null
    this.handle = null
    await Promise.resolve(this.node?.stop()).catch(() => {})
    this.node = null
  }
}
