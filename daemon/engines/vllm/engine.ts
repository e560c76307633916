import { randomBytes } from 'node:crypto'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { TypedEventEmitter } from 'main-event'
import { detectContainerRuntime } from '../../../containers/cli.ts'
import { type SecretEnvFile, writeSecretEnvFile } from '../../../containers/env-file.ts'
import { freeLoopbackPort, isPortInUse } from '../../../containers/ports.ts'
import {
  ContainerSupervisor,
  type RestartPolicy,
  stopSupervisedContainer,
} from '../../../containers/supervisor.ts'
import type { ContainerRuntime, GpuRequest, PullProgress } from '../../../containers/types.ts'
import { GarageError } from '../../../core/errors.ts'
import { type Logger, silentLogger } from '../../../core/logger.ts'
import type {
  Engine,
  EngineEvents,
  EngineHandle,
  EngineMetrics,
  EngineStartOptions,
  EngineState,
} from '../types.ts'
import { VllmMetricsError, vllmEngineMetrics } from './metrics.ts'
import { vllmContainerSpec, vllmImage, vllmSecrets } from './spec.ts'

export class VllmStartError extends GarageError {}

/** The Engine events, and the supervisor's view of a crash (for status displays). */
export interface VllmEngineEvents extends EngineEvents {
  exited: CustomEvent<{ exitCode: number | null; oomKilled: boolean; crashesInWindow: number }>
  restarting: CustomEvent<{ delayMs: number; attempt: number }>
}

export interface VllmEngineInit {
  /** This node's PeerId: the `garage.node` label of the container. */
  nodePeerId: string
  /** The daemon's data dir; the Hugging Face cache lives in `<dataDir>/huggingface`. */
  dataDir: string
  /** Podman or Docker; detected (Podman first) when absent. */
  runtime?: ContainerRuntime
  /** Defaults to the pinned vLLM image; tests pass a local stand-in. */
  image?: string
  /** Defaults to every GPU; `none` runs without one (tests on machines without a GPU). */
  gpu?: GpuRequest
  /** /dev/shm of the container. */
  shmSize?: string
  /** For gated models; handed over in a 0600 env file. */
  huggingFaceToken?: string
  /** Loading a model can mean downloading tens of GB first. */
  healthTimeoutMs?: number
  healthIntervalMs?: number
  /** SIGTERM, then SIGKILL after this long. */
  stopGraceMs?: number
  restartPolicy?: Partial<RestartPolicy>
  logger?: Logger
  onPullProgress?: (progress: PullProgress) => void
}

const defaults = {
  gpuMemoryUtilization: 0.9,
  // A bounded /dev/shm instead of --ipc=host: the container keeps its own IPC namespace and cannot
  // read or attach the host's shared memory (the game's, the browser's).
  shmSize: '8g',
  healthTimeoutMs: 30 * 60_000,
  healthIntervalMs: 1_000,
  stopGraceMs: 30_000,
  pullLogIntervalMs: 5_000,
}

interface RunningContainer {
  id: string
  name: string
  handle: EngineHandle
  supervisor: ContainerSupervisor
}

/**
 * vLLM's OpenAI-compatible server in a Podman or Docker container: 127.0.0.1 only, a random API key
 * per start (in a 0600 env file, not on the command line), GPUs by CDI (Podman) or --gpus (Docker), health wait, metrics from /metrics, restart
 * with backoff on a crash, drain and stop.
 */
export class VllmEngine extends TypedEventEmitter<VllmEngineEvents> implements Engine {
  readonly kind = 'vllm' as const
  private readonly init: VllmEngineInit
  private readonly log: Logger
  private runtime: ContainerRuntime | null
  private current: EngineState = 'stopped'
  private active: RunningContainer | null = null
  private starting: { controller: AbortController; done: Promise<unknown> } | null = null
  private recovery: AbortController | null = null

  constructor(init: VllmEngineInit) {
    super()
    this.init = init
    this.runtime = init.runtime ?? null
    this.log = (init.logger ?? silentLogger).child({ component: 'daemon:engine', engine: 'vllm' })
  }

  get state(): EngineState {
    return this.current
  }

  /** The container serving now, for status displays and cleanup. */
  get container(): { id: string; name: string } | null {
    return this.active == null ? null : { id: this.active.id, name: this.active.name }
  }

  async start(options: EngineStartOptions): Promise<EngineHandle> {
    // A run the supervisor gave up on still holds its exited container: clear it first.
    if (this.starting == null && this.current === 'crashed') await this.teardown()
    if (this.starting != null || this.active != null) {
      throw new VllmStartError('the vLLM engine is already running; stop it first', 'ENGINE_RUNNING')
    }
    const controller = new AbortController()
    const done = this.startContainer(options, controller.signal)
    this.starting = { controller, done }
    try {
      return await done
    } finally {
      this.starting = null
    }
  }

  private async startContainer(options: EngineStartOptions, stopSignal: AbortSignal): Promise<EngineHandle> {
    const signal = options.signal != null ? AbortSignal.any([options.signal, stopSignal]) : stopSignal
    this.current = 'starting'
    this.safeDispatchEvent('starting', { detail: { kind: this.kind } })
    let envFile: SecretEnvFile | null = null
    try {
      const runtime = this.runtime ?? (await detectContainerRuntime({ logger: this.log }))
      this.runtime = runtime
      const image = this.init.image ?? vllmImage
      if (!(await runtime.imageExists(image))) await this.pull(runtime, image, signal)
      signal.throwIfAborted()

      const cacheDir = join(this.init.dataDir, 'huggingface')
      await mkdir(cacheDir, { recursive: true })
      const apiKey = randomBytes(32).toString('base64url')
      envFile = await writeSecretEnvFile(
        join(this.init.dataDir, 'run'),
        vllmSecrets(apiKey, this.init.huggingFaceToken),
      )
      const servedModelName = options.servedModelName ?? options.model
      const name = `garage-vllm-${randomBytes(5).toString('hex')}`
      let id = ''
      let port = 0
      for (let attempt = 1; id === ''; attempt++) {
        port = await freeLoopbackPort()
        const spec = vllmContainerSpec({
          image,
          name,
          nodePeerId: this.init.nodePeerId,
          hostPort: port,
          model: options.model,
          servedModelName,
          gpuMemoryUtilization: options.gpuMemoryUtilization ?? defaults.gpuMemoryUtilization,
          ...(options.contextLength != null ? { maxModelLen: options.contextLength } : {}),
          ...(options.parallel != null ? { maxNumSeqs: options.parallel } : {}),
          cacheDir,
          gpu: this.init.gpu ?? 'all',
          shmSize: this.init.shmSize ?? defaults.shmSize,
          envFile: envFile.path,
        })
        try {
          id = await runtime.run(spec, { signal })
        } catch (err) {
          // The port was free a moment ago; another process took it.
          if (attempt < 3 && isPortInUse((err as Error).message)) continue
          throw err
        }
      }
      const handle: EngineHandle = {
        kind: this.kind,
        baseUrl: `http://127.0.0.1:${port}`,
        apiKey,
        servedModelName,
      }
      const supervisor = new ContainerSupervisor({
        runtime,
        container: id,
        logger: this.log.child({ container: name }),
        armed: false,
        ...(this.init.restartPolicy != null ? { policy: this.init.restartPolicy } : {}),
      })
      this.active = { id, name, handle, supervisor }
      // The container holds its environment from now on; the file has no reason to stay on disk.
      await envFile?.remove()
      envFile = null
      supervisor.start()
      await this.waitHealthy(this.active, signal)
      supervisor.arm()
      this.watch(this.active)
      this.current = 'ready'
      this.log.info(
        { baseUrl: handle.baseUrl, model: options.model, servedModelName, container: name },
        'vLLM is ready',
      )
      this.safeDispatchEvent('ready', { detail: handle })
      return handle
    } catch (err) {
      const lastLines = this.active?.supervisor.tail().slice(-10) ?? []
      await envFile?.remove()
      await this.teardown().catch((e: unknown) =>
        this.log.warn({ err: e }, 'could not remove the vLLM container'),
      )
      if (signal.aborted) {
        this.current = 'stopped'
        // Whoever aborted says why (stop() while starting, the caller's signal), not a bare AbortError.
        throw signal.reason instanceof Error ? signal.reason : err
      }
      this.current = 'crashed'
      const error =
        err instanceof VllmStartError
          ? err
          : new VllmStartError(`vLLM could not start: ${(err as Error).message}`, 'VLLM_START_FAILED', {
              cause: err,
            })
      this.log.error({ err: error, lastLines }, 'vLLM did not start')
      this.safeDispatchEvent('crashed', { detail: { error, restarts: 0 } })
      throw error
    }
  }

  private async pull(runtime: ContainerRuntime, image: string, signal: AbortSignal): Promise<void> {
    let lastLog = 0
    await runtime.pull(image, {
      signal,
      onProgress: (progress) => {
        this.init.onPullProgress?.(progress)
        const now = Date.now()
        if (now - lastLog >= defaults.pullLogIntervalMs || progress.phase === 'done') {
          lastLog = now
          const { phase, layersDone, layersTotal, bytesDone, bytesTotal, fraction } = progress
          this.log.info(
            { image, phase, layersDone, layersTotal, bytesDone, bytesTotal, fraction },
            'pulling vLLM image',
          )
        }
      },
    })
  }

  /** Polls /health until it answers 200; fails when the container exits or the deadline passes. */
  private async waitHealthy(run: RunningContainer, signal: AbortSignal): Promise<void> {
    const timeoutMs = this.init.healthTimeoutMs ?? defaults.healthTimeoutMs
    const deadline = Date.now() + timeoutMs
    let exitCode: number | null | undefined
    const exited = new Promise<'exited'>((resolve) => {
      run.supervisor.addEventListener(
        'exited',
        (e) => {
          exitCode = e.detail.exitCode
          resolve('exited')
        },
        { once: true, signal },
      )
    })
    while (true) {
      signal.throwIfAborted()
      if (await this.health({ signal: AbortSignal.any([signal, AbortSignal.timeout(2_000)]) })) return
      if (exitCode !== undefined) break
      const left = deadline - Date.now()
      if (left <= 0) {
        throw new VllmStartError(
          `vLLM did not answer /health within ${Math.round(timeoutMs / 1_000)} s`,
          'VLLM_HEALTH_TIMEOUT',
        )
      }
      const interval = Math.min(left, this.init.healthIntervalMs ?? defaults.healthIntervalMs)
      await Promise.race([sleep(interval, undefined, { signal }), exited])
    }
    // Its last lines say why (CUDA out of memory, a gated model): let the log stream catch up.
    await run.supervisor.logsSettled(2_000)
    const last = run.supervisor.tail().slice(-3).join(' | ')
    throw new VllmStartError(
      `the vLLM container exited (code ${exitCode ?? 'unknown'}) before it was healthy${last !== '' ? `: ${last}` : ''}`,
      'VLLM_EXITED',
    )
  }

  /** After a restart by the supervisor: wait for health again, then report ready with the same handle. */
  private watch(run: RunningContainer): void {
    run.supervisor.addEventListener('exited', (e) => {
      this.recovery?.abort()
      if (this.current === 'ready' || this.current === 'draining') this.current = 'starting'
      this.safeDispatchEvent('exited', { detail: e.detail })
    })
    run.supervisor.addEventListener('restarting', (e) =>
      this.safeDispatchEvent('restarting', { detail: e.detail }),
    )
    run.supervisor.addEventListener('restarted', () => {
      this.recovery?.abort()
      const recovery = new AbortController()
      this.recovery = recovery
      this.current = 'starting'
      this.safeDispatchEvent('starting', { detail: { kind: this.kind } })
      this.waitHealthy(run, recovery.signal).then(
        () => {
          if (this.active !== run) return
          this.current = 'ready'
          this.log.info({ restarts: run.supervisor.restarts }, 'vLLM is ready again')
          this.safeDispatchEvent('ready', { detail: run.handle })
        },
        (err: unknown) => {
          if (recovery.signal.aborted || this.active !== run) return
          if ((err as GarageError).code === 'VLLM_HEALTH_TIMEOUT') {
            // A hung engine counts as a crash: kill it and let the supervisor decide.
            this.log.warn({ err }, 'vLLM did not become healthy after a restart; killing it')
            this.runtime?.kill(run.id).catch(() => undefined)
          }
        },
      )
    })
    run.supervisor.addEventListener('gave-up', (e) => {
      this.recovery?.abort()
      this.current = 'crashed'
      this.safeDispatchEvent('crashed', { detail: e.detail })
    })
  }

  async health(options: { signal?: AbortSignal } = {}): Promise<boolean> {
    const run = this.active
    if (run == null) return false
    try {
      const res = await fetch(`${run.handle.baseUrl}/health`, {
        signal: options.signal ?? AbortSignal.timeout(2_000),
      })
      await res.arrayBuffer()
      return res.ok
    } catch {
      return false
    }
  }

  async metrics(options: { signal?: AbortSignal } = {}): Promise<EngineMetrics> {
    const run = this.active
    if (run == null) throw new VllmMetricsError('the vLLM engine is not running', 'ENGINE_NOT_RUNNING')
    let text: string
    try {
      const res = await fetch(`${run.handle.baseUrl}/metrics`, {
        headers: { authorization: `Bearer ${run.handle.apiKey}` },
        signal: options.signal ?? AbortSignal.timeout(5_000),
      })
      text = await res.text()
      if (!res.ok) throw new Error(`HTTP ${res.status}`)
    } catch (err) {
      throw new VllmMetricsError(
        `vLLM /metrics did not answer: ${(err as Error).message}`,
        'VLLM_METRICS_UNAVAILABLE',
        {
          cause: err,
        },
      )
    }
    return vllmEngineMetrics(text)
  }

  /** Waits until vLLM has no running or waiting request, or the grace period ends; routing away is the head's job. */
  async drain(options: { graceMs?: number } = {}): Promise<void> {
    if (this.active == null) return
    if (this.current === 'ready') this.current = 'draining'
    const deadline = Date.now() + (options.graceMs ?? 30_000)
    while (this.active != null && Date.now() < deadline) {
      const m = await this.metrics({ signal: AbortSignal.timeout(2_000) }).catch(() => null)
      if (m == null) return
      if (m['vllm:num_requests_running'] + m['vllm:num_requests_waiting'] === 0) return
      await sleep(Math.min(250, Math.max(0, deadline - Date.now())))
    }
  }

  async stop(): Promise<void> {
    const wasRunning = this.active != null || this.starting != null || this.current !== 'stopped'
    if (this.starting != null) {
      this.starting.controller.abort(
        new VllmStartError('the engine was stopped while starting', 'ENGINE_STOPPED'),
      )
      await this.starting.done.catch(() => undefined)
    }
    await this.teardown()
    this.current = 'stopped'
    if (wasRunning) this.safeDispatchEvent('stopped', { detail: { kind: this.kind } })
  }

  private async teardown(): Promise<void> {
    const run = this.active
    if (run == null) return
    this.recovery?.abort()
    this.recovery = null
    await stopSupervisedContainer(this.runtime, run, this.init.stopGraceMs ?? defaults.stopGraceMs)
    this.active = null
    this.log.info({ container: run.name }, 'vLLM container removed')
  }
}
