import { randomBytes } from 'node:crypto'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { TypedEventEmitter } from 'main-event'
import { vllmImage } from '../../../containers/images.ts'
import { type RunningContainer, SupervisedContainer } from '../../../containers/supervised.ts'
import type { RestartPolicy } from '../../../containers/supervisor.ts'
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
import { vllmContainerSpec, vllmSecrets } from './spec.ts'

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
  /** A pipeline group's vLLM on the region's Ray cluster (the regional head runs it). */
  rayCluster?: { address: string; token: string; pipelineParallel: number; tensorParallel: number }
  /** The container's role label (default `vllm`; a head's group is `vllm-group`). */
  role?: 'vllm' | 'vllm-group'
}

const defaults = {
  gpuMemoryUtilization: 0.9,
  // A bounded /dev/shm instead of --ipc=host: the container keeps its own IPC namespace and cannot
  // read or attach the host's shared memory (the game's, the browser's).
  shmSize: '8g',
  healthTimeoutMs: 30 * 60_000,
  healthIntervalMs: 1_000,
  stopGraceMs: 30_000,
}

/**
 * vLLM's OpenAI-compatible server in a Podman or Docker container: 127.0.0.1 only, a random API key
 * per start (in a 0600 env file, not on the command line), GPUs by CDI (Podman) or --gpus (Docker),
 * health wait, metrics from /metrics, restart with backoff on a crash, drain and stop. The container's
 * lifecycle is containers/supervised.ts; this class says what to run and how to tell it serves.
 */
export class VllmEngine extends TypedEventEmitter<VllmEngineEvents> implements Engine {
  readonly kind = 'vllm' as const
  private readonly init: VllmEngineInit
  private readonly log: Logger
  private readonly supervised: SupervisedContainer
  private draining = false
  private handle: EngineHandle | null = null

  constructor(init: VllmEngineInit) {
    super()
    this.init = init
    this.log = (init.logger ?? silentLogger).child({ component: 'daemon:engine', engine: 'vllm' })
    this.supervised = new SupervisedContainer({
      what: 'vLLM',
      runtime: init.runtime ?? null,
      logger: this.log,
      stopGraceMs: init.stopGraceMs ?? defaults.stopGraceMs,
      ...(init.restartPolicy != null ? { restartPolicy: init.restartPolicy } : {}),
      error: (message, code, options) => new VllmStartError(message, code, options),
      codes: { running: 'ENGINE_RUNNING', stopped: 'ENGINE_STOPPED', startFailed: 'VLLM_START_FAILED' },
      explains: (err) => err instanceof VllmStartError,
    })
    this.supervised.addEventListener('starting', () => {
      this.draining = false
      this.safeDispatchEvent('starting', { detail: { kind: this.kind } })
    })
    this.supervised.addEventListener('ready', () => {
      if (this.handle != null) this.safeDispatchEvent('ready', { detail: this.handle })
    })
    this.supervised.addEventListener('exited', (e) => this.safeDispatchEvent('exited', { detail: e.detail }))
    this.supervised.addEventListener('restarting', (e) =>
      this.safeDispatchEvent('restarting', { detail: e.detail }),
    )
    this.supervised.addEventListener('crashed', (e) =>
      this.safeDispatchEvent('crashed', { detail: e.detail }),
    )
    this.supervised.addEventListener('stopped', () =>
      this.safeDispatchEvent('stopped', { detail: { kind: this.kind } }),
    )
  }

  get state(): EngineState {
    const state = this.supervised.state
    return state === 'ready' && this.draining ? 'draining' : state
  }

  /** The container serving now, for status displays and cleanup. */
  get container(): { id: string; name: string } | null {
    const run = this.supervised.running
    return run == null ? null : { id: run.id, name: run.name }
  }

  async start(options: EngineStartOptions): Promise<EngineHandle> {
    const image = this.init.image ?? vllmImage
    const cacheDir = join(this.init.dataDir, 'huggingface')
    const apiKey = randomBytes(32).toString('base64url')
    const servedModelName = options.servedModelName ?? options.model
    const run = await this.supervised
      .start(
        {
          image,
          namePrefix: 'garage-vllm',
          secrets: () => vllmSecrets(apiKey, this.init.huggingFaceToken, this.init.rayCluster?.token),
          runDir: join(this.init.dataDir, 'run'),
          publishPort: true,
          prepare: async () => {
            await mkdir(cacheDir, { recursive: true })
          },
          spec: ({ name, envFile, port }) =>
            vllmContainerSpec({
              image,
              name,
              nodePeerId: this.init.nodePeerId,
              hostPort: port!,
              model: options.model,
              servedModelName,
              gpuMemoryUtilization: options.gpuMemoryUtilization ?? defaults.gpuMemoryUtilization,
              ...(options.contextLength != null ? { maxModelLen: options.contextLength } : {}),
              ...(options.parallel != null ? { maxNumSeqs: options.parallel } : {}),
              ...(options.task != null ? { task: options.task } : {}),
              ...(this.init.rayCluster != null
                ? {
                    ray: {
                      address: this.init.rayCluster.address,
                      pipelineParallel: this.init.rayCluster.pipelineParallel,
                      tensorParallel: this.init.rayCluster.tensorParallel,
                    },
                  }
                : {}),
              ...(this.init.role != null ? { role: this.init.role } : {}),
              cacheDir,
              gpu: this.init.gpu ?? 'all',
              shmSize: this.init.shmSize ?? defaults.shmSize,
              envFile,
            }),
          ready: (r, signal) => {
            // The handle exists before /health answers: health() polls through it.
            this.handle = { kind: this.kind, baseUrl: `http://127.0.0.1:${r.port}`, apiKey, servedModelName }
            return this.waitHealthy(r, signal)
          },
          readyTimeoutCode: 'VLLM_HEALTH_TIMEOUT',
          ...(this.init.onPullProgress != null ? { onPullProgress: this.init.onPullProgress } : {}),
        },
        options.signal,
      )
      .catch((err: unknown) => {
        this.handle = null
        throw err
      })
    this.log.info(
      { baseUrl: this.handle!.baseUrl, model: options.model, servedModelName, container: run.name },
      'vLLM is ready',
    )
    return this.handle!
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

  async health(options: { signal?: AbortSignal } = {}): Promise<boolean> {
    const handle = this.handle
    if (handle == null || this.supervised.running == null) return false
    try {
      const res = await fetch(`${handle.baseUrl}/health`, {
        signal: options.signal ?? AbortSignal.timeout(2_000),
      })
      await res.arrayBuffer()
      return res.ok
    } catch {
      return false
    }
  }

  async metrics(options: { signal?: AbortSignal } = {}): Promise<EngineMetrics> {
    const handle = this.handle
    if (handle == null || this.supervised.running == null)
      throw new VllmMetricsError('the vLLM engine is not running', 'ENGINE_NOT_RUNNING')
    let text: string
    try {
      const res = await fetch(`${handle.baseUrl}/metrics`, {
        headers: { authorization: `Bearer ${handle.apiKey}` },
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
    if (this.supervised.running == null) return
    if (this.supervised.state === 'ready') this.draining = true
    const deadline = Date.now() + (options.graceMs ?? 30_000)
    while (this.supervised.running != null && Date.now() < deadline) {
      const m = await this.metrics({ signal: AbortSignal.timeout(2_000) }).catch(() => null)
      if (m == null) return
      if (m['vllm:num_requests_running'] + m['vllm:num_requests_waiting'] === 0) return
      await sleep(Math.min(250, Math.max(0, deadline - Date.now())))
    }
  }

  async stop(): Promise<void> {
    await this.supervised.stop()
    this.handle = null
    this.draining = false
  }
}
