import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { TypedEventEmitter } from 'main-event'
import { rayImage } from '../../../containers/images.ts'
import { SupervisedContainer, waitForLine } from '../../../containers/supervised.ts'
import type { RestartPolicy } from '../../../containers/supervisor.ts'
import type { ContainerRuntime, GpuRequest } from '../../../containers/types.ts'
import { GarageError } from '../../../core/errors.ts'
import { type Logger, silentLogger } from '../../../core/logger.ts'
import { rayWorkerContainerSpec } from './spec.ts'

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

/**
 * A Ray worker node in a container, for models larger than one GPU. Joins only a trusted cluster the
 * user opted in to; the cluster token travels in a 0600 env file, never on a command line or in labels.
 * The container's lifecycle is containers/supervised.ts.
 */
export class RayWorker extends TypedEventEmitter<RayWorkerEvents> {
  readonly kind = 'ray-worker' as const
  private readonly init: RayWorkerInit
  private readonly log: Logger
  private readonly supervised: SupervisedContainer
  /** The cluster being joined or served. */
  private cluster: { region: string; headAddress: string } | null = null

  constructor(init: RayWorkerInit) {
    super()
    this.init = init
    this.log = (init.logger ?? silentLogger).child({ component: 'daemon:engine', engine: 'ray-worker' })
    this.supervised = new SupervisedContainer({
      what: 'the Ray worker',
      runtime: init.runtime ?? null,
      logger: this.log,
      stopGraceMs: init.stopGraceMs ?? defaults.stopGraceMs,
      ...(init.restartPolicy != null ? { restartPolicy: init.restartPolicy } : {}),
      error: (message, code, options) => new RayWorkerStartError(message, code, options),
      codes: { running: 'ENGINE_RUNNING', stopped: 'ENGINE_STOPPED', startFailed: 'RAY_START_FAILED' },
    })
    this.supervised.addEventListener('starting', () =>
      this.safeDispatchEvent('starting', { detail: { region: this.cluster?.region ?? '' } }),
    )
    this.supervised.addEventListener('ready', (e) =>
      this.safeDispatchEvent('ready', {
        detail: { container: e.detail.name, headAddress: this.cluster?.headAddress ?? '' },
      }),
    )
    this.supervised.addEventListener('crashed', (e) =>
      this.safeDispatchEvent('crashed', { detail: e.detail }),
    )
    this.supervised.addEventListener('stopped', () =>
      this.safeDispatchEvent('stopped', { detail: { region: this.cluster?.region ?? '' } }),
    )
  }

  get state(): RayWorkerState {
    return this.supervised.state
  }

  get container(): { id: string; name: string } | null {
    const run = this.supervised.running
    return run == null ? null : { id: run.id, name: run.name }
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
    const { assignment } = options
    RayWorker.check(assignment, this.init.optIn)
    if (this.supervised.running == null && !this.supervised.isStarting)
      this.cluster = { region: assignment.region, headAddress: assignment.headAddress }
    const image = this.init.image ?? assignment.image ?? rayImage
    const cacheDir = join(this.init.dataDir, 'huggingface')
    const readyTimeoutMs = this.init.readyTimeoutMs ?? defaults.readyTimeoutMs
    const run = await this.supervised.start(
      {
        image,
        namePrefix: 'garage-ray-worker',
        secrets: () => ({ RAY_AUTH_MODE: 'token', RAY_AUTH_TOKEN: assignment.token }),
        runDir: join(this.init.dataDir, 'run'),
        prepare: async () => {
          await mkdir(cacheDir, { recursive: true })
        },
        spec: ({ name, envFile }) =>
          rayWorkerContainerSpec({
            image,
            name,
            nodePeerId: this.init.nodePeerId,
            headAddress: assignment.headAddress,
            nodeIpAddress: assignment.nodeIpAddress,
            numGpus: options.numGpus,
            region: assignment.region,
            vramMiB: options.vramMiB,
            envFile,
            cacheDir,
            gpu: this.init.gpu ?? 'all',
            shmSize: this.init.shmSize ?? defaults.shmSize,
          }),
        ready: (r, signal) =>
          waitForLine(this.supervised, r, joinedLine, {
            timeoutMs: readyTimeoutMs,
            signal,
            exited: (code, last) =>
              new RayWorkerStartError(
                `ray start exited (code ${code ?? 'unknown'}) before joining ${assignment.headAddress}${last !== '' ? `: ${last}` : ''}`,
                'RAY_EXITED',
              ),
            timedOut: () =>
              new RayWorkerStartError(
                `the Ray worker did not join ${assignment.headAddress} within ${Math.round(readyTimeoutMs / 1_000)} s`,
                'RAY_JOIN_TIMEOUT',
              ),
          }),
        readyTimeoutCode: 'RAY_JOIN_TIMEOUT',
      },
      options.signal,
    )
    this.log.info(
      { container: run.name, head: assignment.headAddress, region: assignment.region },
      'joined the Ray cluster',
    )
    return { container: run.name }
  }

  /** True while the worker's container runs. */
  async health(): Promise<boolean> {
    const run = this.supervised.running
    const runtime = this.supervised.runtime
    if (run == null || runtime == null) return false
    const status = await runtime.inspect(run.id).catch(() => null)
    return status?.running === true
  }

  async stop(): Promise<void> {
    // Ray's SIGTERM handler leaves the cluster cleanly (the head reschedules the node's work).
    await this.supervised.stop()
  }
}
