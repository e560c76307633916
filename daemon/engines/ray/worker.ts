import { randomBytes } from 'node:crypto'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { TypedEventEmitter } from 'main-event'
import { detectContainerRuntime } from '../../../containers/cli.ts'
import { type SecretEnvFile, writeSecretEnvFile } from '../../../containers/env-file.ts'
import {
  ContainerSupervisor,
  type RestartPolicy,
  stopSupervisedContainer,
} from '../../../containers/supervisor.ts'
import type { ContainerRuntime, GpuRequest } from '../../../containers/types.ts'
import { GarageError } from '../../../core/errors.ts'
import { type Logger, silentLogger } from '../../../core/logger.ts'
import { rayImage, rayWorkerContainerSpec } from './spec.ts'

/** The region's certificate does not mark its Ray cluster as trusted: Ray has no isolation between members. */
export class RayClusterNotTrustedError extends GarageError {}
/** The user did not opt in to joining Ray clusters. */
export class RayClusterOptInRequiredError extends GarageError {}
export class RayWorkerStartError extends GarageError {}

/** What the head hands over (through the authenticated join protocol, never the DHT) for a Ray cluster. */
export interface RayClusterAssignment {
  region: string
  /** host:port of the Ray head's GCS. */
  headAddress: string
  /** RAY_AUTH_TOKEN of the cluster (Ray token authentication). */
  token: string
  /** From the region certificate's rayTrusted flag. */
  trusted: boolean
  /** The address the head and the other nodes reach this node at. */
  nodeIpAddress: string
  /** The head's image: Ray (and vLLM) versions must match across the cluster. */
  image?: string
}

export interface RayWorkerInit {
  nodePeerId: string
  dataDir: string
  /** The user's consent to join Ray clusters (off by default in the daemon's settings). */
  optIn: boolean
  runtime?: ContainerRuntime
  /** Overrides the assignment's image and the pinned default (tests). */
  image?: string
  gpu?: GpuRequest
  shmSize?: string
  /** How long `ray start` may take to print that it joined. */
  readyTimeoutMs?: number
  stopGraceMs?: number
  restartPolicy?: Partial<RestartPolicy>
  logger?: Logger
}

export interface RayWorkerStartOptions {
  assignment: RayClusterAssignment
  numGpus: number
  vramMiB: number
  signal?: AbortSignal
}

export type RayWorkerState = 'stopped' | 'starting' | 'ready' | 'crashed'

export interface RayWorkerEvents {
  starting: CustomEvent<{ region: string }>
  ready: CustomEvent<{ container: string; headAddress: string }>
  crashed: CustomEvent<{ error: Error; restarts: number }>
  stopped: CustomEvent<{ region: string }>
}

/** What `ray start` prints once the node has joined the cluster. */
const joinedLine = /Ray runtime started/

const defaults = {
  shmSize: '8g',
  readyTimeoutMs: 5 * 60_000,
  stopGraceMs: 30_000,
}

interface RunningWorker {
  id: string
  name: string
  region: string
  headAddress: string
  supervisor: ContainerSupervisor
}

/**
 * A Ray worker node in a container, for models larger than one GPU. Joins only a trusted cluster the
 * user opted in to; the cluster token travels in a 0600 env file, never on a command line or in labels.
 */
export class RayWorker extends TypedEventEmitter<RayWorkerEvents> {
  readonly kind = 'ray-worker' as const
  private readonly init: RayWorkerInit
  private readonly log: Logger
  private runtime: ContainerRuntime | null
  private current: RayWorkerState = 'stopped'
  private active: RunningWorker | null = null
  private readonly lineListeners = new Set<(line: string) => void>()
  private recovery: AbortController | null = null
  private starting: { controller: AbortController; done: Promise<unknown> } | null = null
  private startingRegion: string | null = null

  constructor(init: RayWorkerInit) {
    super()
    this.init = init
    this.runtime = init.runtime ?? null
    this.log = (init.logger ?? silentLogger).child({ component: 'daemon:engine', engine: 'ray-worker' })
  }

  get state(): RayWorkerState {
    return this.current
  }

  get container(): { id: string; name: string } | null {
    return this.active == null ? null : { id: this.active.id, name: this.active.name }
  }

  /** Refuses untrusted clusters and missing consent before anything runs. */
  static check(assignment: RayClusterAssignment, optIn: boolean): void {
    if (!assignment.trusted) {
      throw new RayClusterNotTrustedError(
        `region ${assignment.region} does not certify its Ray cluster as trusted; Ray has no isolation between cluster members`,
        'RAY_CLUSTER_NOT_TRUSTED',
      )
    }
    if (!optIn) {
      throw new RayClusterOptInRequiredError(
        'joining Ray clusters is off; turn it on in the settings to serve models larger than one GPU',
        'RAY_OPT_IN_REQUIRED',
      )
    }
    if (assignment.token === '' || /[\s\0]/.test(assignment.token)) {
      throw new RayWorkerStartError('the Ray cluster token is empty or malformed', 'RAY_TOKEN_INVALID')
    }
  }

  async start(options: RayWorkerStartOptions): Promise<{ container: string }> {
    RayWorker.check(options.assignment, this.init.optIn)
    if (this.starting == null && this.current === 'crashed') await this.teardown()
    if (this.active != null || this.starting != null) {
      throw new RayWorkerStartError('the Ray worker is already running', 'ENGINE_RUNNING')
    }
    const controller = new AbortController()
    const done = this.startContainer(options, controller.signal)
    this.starting = { controller, done }
    this.startingRegion = options.assignment.region
    try {
      return await done
    } finally {
      this.starting = null
      this.startingRegion = null
    }
  }

  private async startContainer(
    options: RayWorkerStartOptions,
    stopSignal: AbortSignal,
  ): Promise<{ container: string }> {
    const { assignment } = options
    this.current = 'starting'
    this.safeDispatchEvent('starting', { detail: { region: assignment.region } })
    const signal = options.signal != null ? AbortSignal.any([options.signal, stopSignal]) : stopSignal
    let envFile: SecretEnvFile | null = null
    try {
      const runtime = this.runtime ?? (await detectContainerRuntime({ logger: this.log }))
      this.runtime = runtime
      const image = this.init.image ?? assignment.image ?? rayImage
      if (!(await runtime.imageExists(image))) await runtime.pull(image, { signal })
      const cacheDir = join(this.init.dataDir, 'huggingface')
      await mkdir(cacheDir, { recursive: true })
      envFile = await writeSecretEnvFile(join(this.init.dataDir, 'run'), {
        RAY_AUTH_MODE: 'token',
        RAY_AUTH_TOKEN: assignment.token,
      })
      const name = `garage-ray-worker-${randomBytes(5).toString('hex')}`
      const spec = rayWorkerContainerSpec({
        image,
        name,
        nodePeerId: this.init.nodePeerId,
        headAddress: assignment.headAddress,
        nodeIpAddress: assignment.nodeIpAddress,
        numGpus: options.numGpus,
        region: assignment.region,
        vramMiB: options.vramMiB,
        envFile: envFile.path,
        cacheDir,
        gpu: this.init.gpu ?? 'all',
        shmSize: this.init.shmSize ?? defaults.shmSize,
      })
      const id = await runtime.run(spec, { signal })
      const supervisor = new ContainerSupervisor({
        runtime,
        container: id,
        logger: this.log.child({ container: name }),
        armed: false,
        onLine: (line) => {
          for (const listener of this.lineListeners) listener(line)
        },
        ...(this.init.restartPolicy != null ? { policy: this.init.restartPolicy } : {}),
      })
      const run: RunningWorker = {
        id,
        name,
        region: assignment.region,
        headAddress: assignment.headAddress,
        supervisor,
      }
      this.active = run
      // The container holds its environment from now on; the file has no reason to stay on disk.
      await envFile.remove()
      envFile = null
      const joined = this.waitJoined(run, signal)
      supervisor.start()
      await joined
      supervisor.arm()
      this.watch(run)
      this.current = 'ready'
      this.log.info(
        { container: name, head: assignment.headAddress, region: assignment.region },
        'joined the Ray cluster',
      )
      this.safeDispatchEvent('ready', { detail: { container: name, headAddress: assignment.headAddress } })
      return { container: name }
    } catch (err) {
      await envFile?.remove()
      await this.teardown().catch((e: unknown) =>
        this.log.warn({ err: e }, 'could not remove the Ray container'),
      )
      if (signal.aborted) {
        this.current = 'stopped'
        // Whoever aborted says why (stop() while starting, the caller's signal), not a bare AbortError.
        throw signal.reason instanceof Error ? signal.reason : err
      }
      this.current = 'crashed'
      const error =
        err instanceof GarageError
          ? err
          : new RayWorkerStartError(
              `the Ray worker could not start: ${(err as Error).message}`,
              'RAY_START_FAILED',
              {
                cause: err,
              },
            )
      this.safeDispatchEvent('crashed', { detail: { error, restarts: 0 } })
      throw error
    }
  }

  /** Resolves on "Ray runtime started"; fails when the container exits first or the deadline passes. */
  private waitJoined(run: RunningWorker, signal: AbortSignal): Promise<void> {
    const timeoutMs = this.init.readyTimeoutMs ?? defaults.readyTimeoutMs
    return new Promise<void>((resolve, reject) => {
      const stop = new AbortController()
      const finish = (err?: Error): void => {
        stop.abort()
        this.lineListeners.delete(onLine)
        if (err != null) reject(err)
        else resolve()
      }
      const onLine = (line: string): void => {
        if (joinedLine.test(line)) finish()
      }
      this.lineListeners.add(onLine)
      run.supervisor.addEventListener(
        'exited',
        (e) => {
          void run.supervisor.logsSettled(2_000).then(() => {
            const last = run.supervisor.tail().slice(-3).join(' | ')
            finish(
              new RayWorkerStartError(
                `ray start exited (code ${e.detail.exitCode ?? 'unknown'}) before joining ${run.headAddress}${last !== '' ? `: ${last}` : ''}`,
                'RAY_EXITED',
              ),
            )
          })
        },
        { once: true, signal: stop.signal },
      )
      sleep(timeoutMs, undefined, { signal: AbortSignal.any([signal, stop.signal]) }).then(
        () =>
          finish(
            new RayWorkerStartError(
              `the Ray worker did not join ${run.headAddress} within ${Math.round(timeoutMs / 1_000)} s`,
              'RAY_JOIN_TIMEOUT',
            ),
          ),
        () => {
          if (signal.aborted) finish(signal.reason instanceof Error ? signal.reason : new Error('aborted'))
        },
      )
    })
  }

  private watch(run: RunningWorker): void {
    run.supervisor.addEventListener('exited', () => {
      this.recovery?.abort()
      if (this.current === 'ready') this.current = 'starting'
    })
    run.supervisor.addEventListener('restarted', () => {
      this.recovery?.abort()
      const recovery = new AbortController()
      this.recovery = recovery
      this.current = 'starting'
      this.safeDispatchEvent('starting', { detail: { region: run.region } })
      this.waitJoined(run, recovery.signal).then(
        () => {
          if (this.active !== run) return
          this.current = 'ready'
          this.safeDispatchEvent('ready', { detail: { container: run.name, headAddress: run.headAddress } })
        },
        (err: unknown) => {
          if (recovery.signal.aborted || this.active !== run) return
          if ((err as GarageError).code === 'RAY_JOIN_TIMEOUT')
            this.runtime?.kill(run.id).catch(() => undefined)
        },
      )
    })
    run.supervisor.addEventListener('gave-up', (e) => {
      this.recovery?.abort()
      this.current = 'crashed'
      this.safeDispatchEvent('crashed', { detail: e.detail })
    })
  }

  /** True while the worker's container runs. */
  async health(): Promise<boolean> {
    const run = this.active
    if (run == null || this.runtime == null) return false
    const status = await this.runtime.inspect(run.id).catch(() => null)
    return status?.running === true
  }

  async stop(): Promise<void> {
    const wasRunning = this.active != null || this.starting != null || this.current !== 'stopped'
    const region = this.active?.region ?? this.startingRegion ?? ''
    if (this.starting != null) {
      this.starting.controller.abort(
        new RayWorkerStartError('the Ray worker was stopped while starting', 'ENGINE_STOPPED'),
      )
      await this.starting.done.catch(() => undefined)
    }
    await this.teardown()
    this.current = 'stopped'
    if (wasRunning) this.safeDispatchEvent('stopped', { detail: { region } })
  }

  private async teardown(): Promise<void> {
    const run = this.active
    if (run == null) return
    this.recovery?.abort()
    this.recovery = null
    // Ray's SIGTERM handler leaves the cluster cleanly (the head reschedules the node's work).
    await stopSupervisedContainer(this.runtime, run, this.init.stopGraceMs ?? defaults.stopGraceMs)
    this.active = null
  }
}
