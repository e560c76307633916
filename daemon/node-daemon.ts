import { setTimeout as sleep } from 'node:timers/promises'
import type { PrivateKey } from '@libp2p/interface'
import { TypedEventEmitter } from 'main-event'
import { GarageError } from '../core/errors.ts'
import { type Logger, type LogTail, silentLogger } from '../core/logger.ts'
import { loadOrCreateIdentity } from '../mesh/identity.ts'
import type { MeshNode } from '../mesh/node.ts'
import type { Assignment, CapabilityReport, NodeServingState } from '../mesh/region-messages.ts'
import { defaultSettings } from './control/settings.ts'
import type { ControlEvents, ControlTarget, NodeSettings, NodeStatus } from './control/types.ts'
import { RayWorker } from './engines/ray/worker.ts'
import { cpuRamShare, llamaCppCapability, vllmCapability } from './hardware/capability.ts'
import type { HardwareReport } from './hardware/types.ts'
import { HostPolicyMonitor, type HostPolicyState } from './host/monitor.ts'
import { createHostSampler, type HostSampler } from './host/sampler.ts'
import type { InferMeshServer } from './infer-handler.ts'
import { defaultNodeComponents, type NodeComponents } from './node/components.ts'
import { type EngineFault, NodeEngine, oneLine } from './node/engine.ts'
import { createNodeEngine, readHuggingFaceToken, vllmGpuRequest } from './node/engines.ts'
import { NodeMembership } from './node/membership.ts'
import { PauseController } from './node/pause.ts'
import { NodeTelemetry } from './node/telemetry.ts'

export type NodeDaemonState = 'stopped' | 'starting' | NodeServingState | 'stopping'

/** The first join's retries while the region cannot be reached: 1 s, doubling to 30 s. */
export const firstJoinRetryMs = { min: 1_000, max: 30_000 } as const

export interface NodeDaemonEvents extends ControlEvents {
  joined: CustomEvent<{ head: string; region: string; assignment: Assignment }>
  /** The engine let go of the model (and the GPU) for a pause: how long it took from the pause. */
  released: CustomEvent<{ ms: number; reasons: string[] }>
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
  /** Another vLLM image than the one pinned for the NVIDIA driver (a coordinator's build). */
  vllmImage?: string
  /** The address the region's Ray head reaches this node at (LAN or VPN); default 127.0.0.1. */
  rayNodeIpAddress?: string
  /** Where models are kept (default `<dataDir>/models`). */
  modelsDir?: string
  daemonVersion?: string
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
  /** Stand-ins for the mesh, the head, the engine (tests); the rest are the real ones. */
  components?: Partial<NodeComponents>
}

export const defaultPauseGraceMs = 1_000
/** Sampling the host costs ~1.5 ms; once a second keeps an idle node under 1% CPU. */
export const defaultHostPolicyIntervalMs = 1_000

export const defaultNodeSettings: NodeSettings = Object.freeze(defaultSettings()) as NodeSettings

export const defaultDrainGraceMs = 30_000

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

/** Resolves when `work` is done or after `ms`, whichever is first. */
async function atMost(work: Promise<void>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  await Promise.race([work, new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))])
  clearTimeout(timer)
}

/**
 * `garage node`: probe → discovery → join → engine → telemetry → serve over /garage/infer/1.0.0.
 * The state machine lives here; each concern is a service in daemon/node/ (membership, engine,
 * telemetry, pause) over the components it reaches (daemon/node/components.ts). stop() drains (no
 * new requests, in-flight ones finish within the grace period) and leaves.
 */
export class NodeDaemon extends TypedEventEmitter<NodeDaemonEvents> implements ControlTarget {
  private readonly options: NodeDaemonOptions
  private readonly components: NodeComponents
  private readonly log: Logger
  private current: NodeDaemonState = 'stopped'
  /** Why the node entered its current state (a failed start says what failed). */
  private stateReason: string | null = null
  /** Ends a first join that is waiting for its region (stop() during start). */
  private abortStart: (() => void) | null = null
  private key: PrivateKey | null = null
  private node: MeshNode | null = null
  private hardware: HardwareReport | null = null
  private membership: NodeMembership | null = null
  private readonly engine: NodeEngine
  private readonly telemetry: NodeTelemetry
  private readonly pauses: PauseController
  private infer: InferMeshServer | null = null
  private rejoining: Promise<void> | null = null
  private readonly startedAt = Date.now()
  private currentSettings: NodeSettings
  private statsTimer: NodeJS.Timeout | null = null
  private idleSeconds: number | null = null
  private hostSampler: HostSampler | null = null
  private hostMonitor: HostPolicyMonitor | null = null
  private huggingFaceToken: string | undefined

  constructor(options: NodeDaemonOptions) {
    super()
    this.options = options
    this.log = (options.logger ?? silentLogger).child({ component: 'daemon' })
    this.currentSettings = { ...defaultNodeSettings, ...options.settings }
    this.components = {
      ...defaultNodeComponents,
      createEngine: (assignment, context) =>
        createNodeEngine(assignment, context, {
          dataDir: options.dataDir,
          nodePeerId: () => this.node!.peerId.toString(),
          hardware: () => this.hardware,
          logger: this.log,
          ...(options.vllmImage != null ? { vllmImage: options.vllmImage } : {}),
          huggingFaceToken: () => this.huggingFaceToken,
        }),
      createRayWorker: () =>
        new RayWorker({
          nodePeerId: this.node!.peerId.toString(),
          dataDir: options.dataDir,
          optIn: options.rayOptIn === true,
          // A pause frees the GPU within about a second: the worker gets no longer to leave.
          stopGraceMs: 2_000,
          ...(this.hardware != null
            ? { gpu: vllmGpuRequest(this.hardware, vllmCapability(this.hardware).runtime ?? 'podman') }
            : {}),
          logger: this.log,
        }),
      ...options.components,
    }
    this.engine = new NodeEngine(
      {
        dataDir: options.dataDir,
        logger: this.log,
        ...(options.modelsDir != null ? { modelsDir: options.modelsDir } : {}),
        ...(options.threads != null ? { threads: options.threads } : {}),
        ...(options.maxTokensPerSecond != null ? { maxTokensPerSecond: options.maxTokensPerSecond } : {}),
        ...(options.vramCapMiB != null ? { vramCapMiB: options.vramCapMiB } : {}),
        ...(options.rayNodeIpAddress != null ? { rayNodeIpAddress: options.rayNodeIpAddress } : {}),
        onDetail: () => this.safeDispatchEvent('state', { detail: this.status() }),
        onFault: (fault) => {
          if (fault.engine === 'llamacpp') return
          this.engine.markFailed(fault)
          void this.rejoin(`${fault.engine} failed: ${fault.reason}`)
        },
      },
      this.components,
    )
    this.telemetry = new NodeTelemetry(
      {
        metrics: () => this.engine.metrics(),
        state: () =>
          this.current === 'serving' || this.current === 'paused' || this.current === 'draining'
            ? this.current
            : 'starting',
        model: () => this.membership?.assignment?.model ?? '',
        nvidia: () => this.hardware?.nvidia.status === 'ok',
        ray: () => this.engine.rayState,
        integrityChanged: () => this.safeDispatchEvent('state', { detail: this.status() }),
        send: async (report, onVerified) => {
          const head = this.membership?.headPeerId()
          if (this.node == null || head == null) return 'ok'
          return this.components.sendTelemetry(this.node, head, report, {
            signal: AbortSignal.timeout(5_000),
            onVerified,
          })
        },
      },
      this.log,
    )
    this.pauses = new PauseController({
      state: () => this.current,
      enter: (reasons) => this.enterPause(reasons),
      leave: () => this.leavePause(),
      changed: () => this.safeDispatchEvent('state', { detail: this.status() }),
      failed: (err) => this.log.error({ err: err.message }, 'pause or resume failed'),
    })
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
    const head = this.membership?.head
    return {
      peerId: this.peerId,
      region: head?.region ?? null,
      head: head?.peerId ?? null,
      rttMs: head?.rttMs ?? null,
      model: this.membership?.assignment?.model ?? null,
      engineUrl: this.engine.handle?.baseUrl ?? null,
      engineKey: this.engine.handle?.apiKey ?? null,
      state: this.current,
    }
  }

  private setState(state: NodeDaemonState, reason?: string): void {
    const why = reason ?? null
    if (state === this.current && why === this.stateReason) return
    // The same state with a new reason (what a start waits for) is news to watchers too.
    if (state !== this.current) this.log.info({ state, reason }, 'node state')
    this.current = state
    this.stateReason = why
    this.safeDispatchEvent('state', { detail: this.status() })
  }

  /** The control API's view: state, where, what, how fast, what it earned today. */
  status(): NodeStatus {
    const gpu = this.hardware?.gpus[0]
    const reasons = this.pauses.reasons()
    const head = this.membership?.head
    const assignment = this.membership?.assignment
    return {
      state: this.current,
      reason: this.current === 'paused' && reasons.length > 0 ? reasons.join(', ') : this.stateReason,
      pausedUntil: this.pauses.until?.toISOString() ?? null,
      peerId: this.peerId,
      region: head?.region ?? null,
      head: head?.peerId ?? null,
      model: assignment?.model ?? null,
      engine:
        assignment != null
          ? {
              kind: assignment.engine,
              url: this.engine.handle?.baseUrl ?? null,
              detail: this.engine.detail,
              failed: this.engine.faults,
            }
          : null,
      gpu:
        gpu != null
          ? {
              name: gpu.name,
              vramMiB: gpu.vramTotalMiB,
              utilizationPct: gpu.utilizationPct,
              temperatureC: gpu.temperatureC,
            }
          : null,
      tokensPerSecond: this.telemetry.tokensPerSecond,
      tokensToday: this.telemetry.tokensToday(),
      creditsToday: this.telemetry.creditsToday(),
      integrity: this.telemetry.integrity(),
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

  /** Seconds without user input, as the tray app last reported (null: unknown). */
  get userIdleSeconds(): number | null {
    return this.idleSeconds
  }

  /** What the host policies see now (for status displays and tests). */
  hostPolicy(): HostPolicyState | null {
    return this.hostMonitor?.current() ?? null
  }

  async start(): Promise<void> {
    if (this.current !== 'stopped') throw new GarageError(`the node is ${this.current}`, 'NODE_STATE')
    this.setState('starting')
    try {
      const o = this.options
      const c = this.components
      this.key = await loadOrCreateIdentity(o.dataDir)
      this.hardware = o.hardware ?? (await c.probeHardware({ dataDir: o.dataDir }))
      this.huggingFaceToken = await readHuggingFaceToken(o.dataDir)
      this.node = await c.createMeshNode({
        privateKey: this.key,
        ...(o.listen != null ? { listen: o.listen } : {}),
        bootstrap: o.bootstrap,
        allowPrivateAddresses: o.allowPrivateAddresses ?? false,
      })
      this.membership = new NodeMembership(
        { authority: o.authority, logger: this.log, ...(o.region != null ? { region: o.region } : {}) },
        this.node,
        c,
      )
      await this.membership.start((reason) => void this.rejoin(reason))
      this.infer = await c.serveInfer(this.node, {
        allowedHeads: () => {
          const head = this.membership?.assignment?.head
          return new Set(head != null ? [head] : [])
        },
        // The direct path: requests with a ticket from the head, while this node serves (not
        // draining: its head stopped leasing it, and the gateway goes through the head instead).
        tickets: () => (this.current === 'serving' ? (this.membership?.tickets ?? null) : null),
        // A request the head routed just before it learnt of a drain is still served.
        engine: () => {
          const handle = this.engine.handle
          return handle != null && (this.current === 'serving' || this.current === 'draining')
            ? { baseUrl: handle.baseUrl, apiKey: handle.apiKey }
            : null
        },
        logger: this.log,
      })
      await this.firstJoin()
      this.setState('serving')
      await this.telemetry.reportNow()
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

  /**
   * The first join, tried until it works while the region cannot be reached (no head found, a head
   * that does not answer): with backoff, saying in the status what it waits for. A refusal, or a node
   * that cannot serve what it is given, ends the start with its reason.
   */
  private async firstJoin(): Promise<void> {
    const stopped = new AbortController()
    this.abortStart = () => stopped.abort()
    let delayMs: number = firstJoinRetryMs.min
    try {
      for (;;) {
        try {
          await this.membership!.ensureHead()
          await this.join()
          if (stopped.signal.aborted) throw new GarageError('stopped while the node started', 'NODE_STOPPED')
          return
        } catch (err) {
          const code = (err as GarageError).code
          if (stopped.signal.aborted || (code !== 'NO_REGION' && code !== 'JOIN_FAILED')) throw err
          if (code === 'JOIN_FAILED') this.membership!.forgetHead()
          const reason = `${oneLine((err as Error).message)}; trying again in ${Math.round(delayMs / 1000)} s`
          this.log.warn(
            { err: oneLine((err as Error).message), retryInMs: delayMs },
            'region not reachable yet',
          )
          this.setState('starting', reason)
          const waited = await sleep(delayMs, undefined, { signal: stopped.signal }).then(
            () => true,
            () => false,
          )
          if (!waited) throw new GarageError('stopped before the node could join a region', 'NODE_STOPPED')
          delayMs = Math.min(delayMs * 2, firstJoinRetryMs.max)
        }
      }
    } finally {
      this.abortStart = null
    }
  }

  /**
   * Joins the chosen head and starts (or keeps) the engine the assignment names. When vLLM cannot
   * serve (no image, a failed pull, out of memory, a crash loop), the node says so in its next
   * report, which then offers the head only the engines left: the head assigns the next engine of
   * the model's list, or another model, or refuses the join with its reason.
   */
  private async join(): Promise<void> {
    const membership = this.membership!
    const assignment = await membership
      .join(this.key!, (region) => this.capabilityReport(region))
      .catch((err: Error) => {
        const faults = this.engine.faults
        if (faults.length === 0) throw err
        throw new GarageError(
          `${faults.map((f) => `${f.engine} failed (${f.reason})`).join('; ')}, and the head has nothing else for this node: ${err.message}`,
          'NO_ENGINE',
          { cause: err },
        )
      })
    this.telemetry.resetSequence()
    // The head counts this node from zero now: so do its reports, from the next one on (again once
    // the engine is up, in case it is a new one).
    await this.telemetry.joined()
    // Stopped meanwhile: no engine may start after the stop tore everything down (it would keep
    // the process alive past its SIGTERM).
    if (this.current === 'stopping' || this.current === 'stopped')
      throw new GarageError('the node stopped while it joined', 'NODE_STOPPED')
    const head = membership.head!
    this.safeDispatchEvent('joined', { detail: { head: head.peerId, region: head.region!, assignment } })
    // Report from the join on, 'starting' while the engine loads: a head that heard nothing for its
    // deadline evicted a node whose model took longer than that to load (7 s), right after it joined.
    this.telemetry.start(
      assignment.telemetryIntervalMs,
      () => void this.rejoin('the head does not know this node'),
    )
    if (!this.engine.serves(assignment)) {
      try {
        await this.engine.start(assignment)
      } catch (err) {
        if (assignment.engine !== 'vllm') throw err
        const reason = oneLine((err as Error).message)
        this.log.error(
          { engine: 'vllm', err: reason },
          'vLLM cannot serve here; asking the head for another engine',
        )
        this.engine.markFailed({ engine: 'vllm', reason })
        return this.join()
      }
    }
    try {
      await this.engine.startRayWorker(assignment, this.hardware, head.certificate?.rayTrusted === true)
    } catch (err) {
      // A pipeline stage whose Ray worker cannot join: offer the head no Ray worker from now on.
      this.engine.markFailed({ engine: 'ray', reason: oneLine((err as Error).message) })
      return this.join()
    }
    await this.telemetry.joined()
  }

  /** What this node offers its region now: its hardware, caps, and the engines that did not fail here. */
  private capabilityReport(region: string): CapabilityReport {
    const report = capabilityFromHardware(this.node!.peerId.toString(), region, this.hardware!, {
      // The user's VRAM cap (settings) wins over the command line's; it sizes the engine's memory.
      ...((this.currentSettings.vramCapMiB ?? this.options.vramCapMiB) != null
        ? { vramCapMiB: (this.currentSettings.vramCapMiB ?? this.options.vramCapMiB)! }
        : {}),
      ...(this.options.ramCapMiB != null ? { ramCapMiB: this.options.ramCapMiB } : {}),
      rayOptIn: this.options.rayOptIn === true,
      daemonVersion: this.options.daemonVersion ?? '0.1.0',
    })
    const faults = this.engine.faults
    if (faults.length === 0) return report
    const failed = new Set<string>(faults.map((f) => f.engine))
    return {
      ...report,
      // A Ray worker runs vLLM's image on the GPU: without vLLM here it cannot either.
      engines: report.engines.filter(
        (e) => !failed.has(e) && !(e === 'ray-worker' && (failed.has('vllm') || failed.has('ray'))),
      ),
      engineFailures: faults
        .filter((f): f is EngineFault & { engine: 'vllm' | 'llamacpp' } => f.engine !== 'ray')
        .slice(0, 2),
    }
  }

  /** Joins again (the head forgot this node, or another head took over); one rejoin at a time. */
  private async rejoin(reason: string): Promise<void> {
    // A draining node is leaving: the head's not_joined after its leave is no reason to join again.
    if (
      this.rejoining != null ||
      this.current === 'draining' ||
      this.current === 'stopping' ||
      this.current === 'stopped'
    )
      return
    this.log.info({ reason }, 'joining the region again')
    this.rejoining = (async () => {
      try {
        await this.membership?.ensureHead()
        await this.join()
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'rejoin failed; the next telemetry tick retries')
      } finally {
        this.rejoining = null
      }
    })()
    await this.rejoining
  }

  /** Watches the host: a game, the schedule, battery, temperature, idle-only mode pause the node. */
  private startHostPolicies(): void {
    if (this.options.hostPolicies === false) return
    const sampler = createHostSampler({
      nvidia: this.hardware?.nvidia.status === 'ok',
      // The engine's own work on the GPU must not count as "someone else is using it".
      ourPids: () => {
        const pid = this.engine.pid
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

  /**
   * Pauses the node: the head stops routing here at once, requests in flight get up to the pause
   * grace period, then the engine stops and frees the GPU. Several sources may hold a pause (the
   * user, a game, the schedule); the node resumes when none does. `source` 'user' takes
   * minutes/until; host policies pass their own source and reasons.
   */
  pause(options: { minutes?: number; until?: Date; reason?: string; source?: string } = {}): Promise<void> {
    return this.pauses.pause(options)
  }

  /** Lifts a pause (the user's by default); the node serves again when no other pause holds. */
  resume(options: { source?: string } = {}): Promise<void> {
    return this.pauses.resume(options)
  }

  private async enterPause(reasons: string[]): Promise<void> {
    const started = performance.now()
    this.setState('paused', reasons.join(', '))
    // The head learns at once, not at the next tick: nothing new is routed here from now on.
    await this.telemetry.reportNow()
    await atMost(this.infer?.idle() ?? Promise.resolve(), this.options.pauseGraceMs ?? defaultPauseGraceMs)
    // Free the GPU: the engine process exits and takes the model with it.
    await this.engine.release()
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
      const assignment = this.membership?.assignment
      if (assignment != null) await this.engine.start(assignment)
      await this.firstJoin()
      this.setState('serving')
      await this.telemetry.reportNow()
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
    // A start still waiting for its region ends there; start() stops what it started.
    if (this.current === 'starting' && this.abortStart != null) {
      const stopped = new Promise<void>((resolve) => {
        const watch = (evt: CustomEvent<NodeStatus>): void => {
          if (evt.detail.state !== 'stopped') return
          this.removeEventListener('state', watch)
          resolve()
        }
        this.addEventListener('state', watch)
      })
      this.abortStart()
      await stopped
      return
    }
    const graceMs = options.graceMs ?? this.options.drainGraceMs ?? defaultDrainGraceMs
    if (this.current === 'serving' || this.current === 'paused') {
      this.setState('draining')
      // Tell the head at once, not at the next tick: it stops routing here now.
      await this.telemetry.reportNow()
      const started = performance.now()
      await atMost(this.infer?.idle() ?? Promise.resolve(), graceMs)
      this.log.info(
        { ms: Math.round(performance.now() - started), left: this.infer?.activeRequests() ?? 0 },
        'drained',
      )
      await this.membership?.leave()
    }
    this.setState('stopping')
    await this.teardown()
    this.setState('stopped')
  }

  private async teardown(): Promise<void> {
    this.pauses.stop()
    if (this.statsTimer != null) clearInterval(this.statsTimer)
    this.statsTimer = null
    await this.hostMonitor?.stop().catch(() => {})
    this.hostMonitor = null
    await Promise.resolve(this.hostSampler?.close()).catch(() => {})
    this.hostSampler = null
    this.telemetry.stop()
    this.membership?.stop()
    await this.infer?.stop().catch(() => {})
    this.infer = null
    await this.engine.stop()
    await Promise.resolve(this.node?.stop()).catch(() => {})
    this.node = null
  }
}
