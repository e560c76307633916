import { connect, isIP } from 'node:net'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { TypedEventEmitter } from 'main-event'
import { rayImage } from '../../containers/images.ts'
import { type RunningContainer, SupervisedContainer } from '../../containers/supervised.ts'
import type { RestartPolicy } from '../../containers/supervisor.ts'
import type { ContainerRuntime, ContainerSpec, GarageContainerRole } from '../../containers/types.ts'
import { GarageError } from '../../core/errors.ts'
import { type Logger, silentLogger } from '../../core/logger.ts'
import { loadOrCreateSecret } from '../../core/secret-file.ts'
import type { RayCredentials } from '../../mesh/region-messages.ts'

/** The Ray head could not start, or is not running when its credentials are asked for. */
export class RayHeadStartError extends GarageError {}

// GarageContainerRole (container/types.ts) does not list the head yet; the label is written as given.
export const rayHeadRole: GarageContainerRole = 'ray-head'

/** Ray's default GCS port (`ray start --head` without `--port`). */
export const defaultRayGcsPort = 6379

/** The cluster token's file in the head's data dir: kept across restarts, so joined workers stay valid. */
export const rayHeadTokenFile = 'ray-head.token'

export interface RayHeadContainerInput {
  image: string
  name: string
  /** PeerId of the regional head (the `garage.node` label). */
  nodePeerId: string
  /** The address Ray advertises for the head and workers dial. */
  nodeIpAddress: string
  gcsPort: number
  /** 0600 file with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN. */
  envFile: string
  shmSize: string
}

function checkAddress(nodeIpAddress: string, gcsPort: number): void {
  if (isIP(nodeIpAddress) === 0) throw new RangeError(`node IP ${nodeIpAddress} is not an IP address`)
  // Workers dial the advertised address: "any address" is not one they can reach.
  if (nodeIpAddress === '0.0.0.0' || nodeIpAddress === '::')
    throw new RangeError(`node IP ${nodeIpAddress} is not an address workers can dial`)
  if (!Number.isInteger(gcsPort) || gcsPort < 1 || gcsPort > 65_535)
    throw new RangeError(`GCS port ${gcsPort} is out of range`)
}

/** host:port as `ray start --address` takes it (IPv6 in brackets). */
export function rayHeadAddress(nodeIpAddress: string, gcsPort: number): string {
  return isIP(nodeIpAddress) === 6 ? `[${nodeIpAddress}]:${gcsPort}` : `${nodeIpAddress}:${gcsPort}`
}

/** `ray start --head` in the foreground, so the container lives as long as the cluster's head. */
export function rayHeadContainerSpec(input: RayHeadContainerInput): ContainerSpec {
  checkAddress(input.nodeIpAddress, input.gcsPort)
  return {
    image: input.image,
    name: input.name,
    role: rayHeadRole,
    nodePeerId: input.nodePeerId,
    // The region's image may be vLLM's (whose entrypoint is `vllm serve`): run `ray` whatever the image.
    entrypoint: 'ray',
    args: [
      'start',
      '--head',
      `--port=${input.gcsPort}`,
      `--node-ip-address=${input.nodeIpAddress}`,
      // The dashboard's job API runs code on the cluster: this machine only.
      '--dashboard-host=127.0.0.1',
      '--num-gpus=0',
      '--block',
      '--disable-usage-stats',
    ],
    envFile: input.envFile,
    // Workers reach the head's GCS, raylet and object manager on Ray-chosen ports; one published port is not enough.
    network: 'host',
    shmSize: input.shmSize,
  }
}

export interface RayHeadInit {
  /** The regional head's PeerId (container label; its orphans are found by it). */
  nodePeerId: string
  /** `<dataDir>/ray-head.token` holds the cluster token; `<dataDir>/run` the short-lived env files. */
  dataDir: string
  /**
   * The address Ray advertises and workers on other machines dial: a coordinator sets its LAN, VPN
   * or public IP. Default 127.0.0.1: workers on this machine only (devnet, tests).
   */
  nodeIpAddress?: string
  /** Default 6379, Ray's own. */
  gcsPort?: number
  runtime?: ContainerRuntime
  /** Default the pinned rayImage; the region's workers must run the same Ray and Python. */
  image?: string
  /** /dev/shm for Ray's object store (the runtimes' 64 MB default makes Ray fall back to /tmp). */
  shmSize?: string
  /** How long the GCS may take to accept connections. */
  readyTimeoutMs?: number
  readyPollIntervalMs?: number
  stopGraceMs?: number
  restartPolicy?: Partial<RestartPolicy>
  logger?: Logger
}

export type RayHeadState = 'stopped' | 'starting' | 'ready' | 'crashed'

export interface RayHeadEvents {
  starting: CustomEvent<{ address: string }>
  ready: CustomEvent<{ container: string; address: string }>
  crashed: CustomEvent<{ error: Error; restarts: number }>
  stopped: CustomEvent<{ address: string }>
}

const defaults = {
  nodeIpAddress: '127.0.0.1',
  shmSize: '2g',
  readyTimeoutMs: 2 * 60_000,
  readyPollIntervalMs: 500,
  connectTimeoutMs: 2_000,
  stopGraceMs: 30_000,
}

/** True when something accepts a TCP connection at host:port within timeoutMs. */
function accepts(host: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host, port, timeout: timeoutMs })
    const done = (ok: boolean): void => {
      socket.destroy()
      resolve(ok)
    }
    socket.once('connect', () => done(true))
    socket.once('timeout', () => done(false))
    socket.once('error', () => done(false))
  })
}

/**
 * The region's Ray head in a container, run by a regional head whose policy enables a trusted Ray
 * cluster. Token authentication: a random token kept 0600 in the data dir, passed to the container in
 * a 0600 env file (never argv or labels), and handed to workers only inside assignments (credentials()).
 * The container's lifecycle is containers/supervised.ts.
 */
export class RayHead extends TypedEventEmitter<RayHeadEvents> {
  readonly kind = 'ray-head' as const
  private readonly init: RayHeadInit
  private readonly log: Logger
  private readonly nodeIpAddress: string
  private readonly gcsPort: number
  private readonly supervised: SupervisedContainer
  private token: string | null = null

  constructor(init: RayHeadInit) {
    super()
    this.init = init
    this.nodeIpAddress = init.nodeIpAddress ?? defaults.nodeIpAddress
    this.gcsPort = init.gcsPort ?? defaultRayGcsPort
    checkAddress(this.nodeIpAddress, this.gcsPort)
    this.log = (init.logger ?? silentLogger).child({ component: 'bootstrap:ray-head' })
    this.supervised = new SupervisedContainer({
      what: 'the Ray head',
      runtime: init.runtime ?? null,
      logger: this.log,
      stopGraceMs: init.stopGraceMs ?? defaults.stopGraceMs,
      ...(init.restartPolicy != null ? { restartPolicy: init.restartPolicy } : {}),
      error: (message, code, options) => new RayHeadStartError(message, code, options),
      codes: {
        running: 'RAY_HEAD_RUNNING',
        stopped: 'RAY_HEAD_STOPPED',
        startFailed: 'RAY_HEAD_START_FAILED',
      },
    })
    const address = (): { address: string } => ({ address: this.address })
    this.supervised.addEventListener('starting', () =>
      this.safeDispatchEvent('starting', { detail: address() }),
    )
    this.supervised.addEventListener('ready', (e) =>
      this.safeDispatchEvent('ready', { detail: { container: e.detail.name, address: this.address } }),
    )
    this.supervised.addEventListener('crashed', (e) => {
      this.token = null
      this.safeDispatchEvent('crashed', { detail: e.detail })
    })
    this.supervised.addEventListener('stopped', () =>
      this.safeDispatchEvent('stopped', { detail: address() }),
    )
  }

  get state(): RayHeadState {
    return this.supervised.state
  }

  /** host:port of the GCS, as workers pass it to `ray start --address`. */
  get address(): string {
    return rayHeadAddress(this.nodeIpAddress, this.gcsPort)
  }

  get container(): { id: string; name: string } | null {
    const run = this.supervised.running
    return run == null ? null : { id: run.id, name: run.name }
  }

  /** What an assignment carries to a worker; from a successful start() until stop() or a crash loop. */
  credentials(): RayCredentials {
    if (this.token == null || this.supervised.running == null || this.supervised.state === 'crashed') {
      throw new RayHeadStartError('the Ray head is not running', 'RAY_HEAD_NOT_RUNNING')
    }
    return { address: this.address, token: this.token, image: this.init.image ?? rayImage }
  }

  async start(options: { signal?: AbortSignal } = {}): Promise<{ container: string; address: string }> {
    const image = this.init.image ?? rayImage
    let token = ''
    const run = await this.supervised.start(
      {
        image,
        namePrefix: 'garage-ray-head',
        secrets: () => ({ RAY_AUTH_MODE: 'token', RAY_AUTH_TOKEN: token }),
        runDir: join(this.init.dataDir, 'run'),
        prepare: async (runtime) => {
          token = await loadOrCreateSecret(join(this.init.dataDir, rayHeadTokenFile), 32)
          // A head process that died left its container holding the GCS port: this head's, so remove it.
          const orphans = await runtime.removeOrphans(this.init.nodePeerId, { role: rayHeadRole })
          if (orphans.length > 0)
            this.log.warn({ containers: orphans }, 'removed Ray head containers left running')
          if (await accepts(this.nodeIpAddress, this.gcsPort, defaults.connectTimeoutMs)) {
            throw new RayHeadStartError(
              `something already listens on ${this.address}; the Ray head needs that port for its GCS`,
              'RAY_HEAD_PORT_IN_USE',
            )
          }
        },
        spec: ({ name, envFile }) =>
          rayHeadContainerSpec({
            image,
            name,
            nodePeerId: this.init.nodePeerId,
            nodeIpAddress: this.nodeIpAddress,
            gcsPort: this.gcsPort,
            envFile,
            shmSize: this.init.shmSize ?? defaults.shmSize,
          }),
        ready: (r, signal) => this.waitReady(r, signal),
        readyTimeoutCode: 'RAY_HEAD_READY_TIMEOUT',
      },
      options.signal,
    )
    this.token = token
    this.log.info({ container: run.name, address: this.address }, 'Ray head ready')
    return { container: run.name, address: this.address }
  }

  /** Resolves once the container runs and its GCS port accepts a connection; fails if it exits first or time runs out. */
  private async waitReady(run: RunningContainer, signal: AbortSignal): Promise<void> {
    const timeoutMs = this.init.readyTimeoutMs ?? defaults.readyTimeoutMs
    const pollMs = this.init.readyPollIntervalMs ?? defaults.readyPollIntervalMs
    const stop = new AbortController()
    const exit = { code: null as number | null }
    run.supervisor.addEventListener(
      'exited',
      (e) => {
        exit.code = e.detail.exitCode
        stop.abort()
      },
      { once: true, signal: stop.signal },
    )
    const deadline = performance.now() + timeoutMs
    const waiting = AbortSignal.any([signal, stop.signal])
    try {
      while (!waiting.aborted) {
        if (await accepts(this.nodeIpAddress, this.gcsPort, defaults.connectTimeoutMs)) {
          const status = await this.supervised.runtime?.inspect(run.id)
          if (status?.running === true) return
        }
        if (performance.now() >= deadline) {
          throw new RayHeadStartError(
            `the Ray head's GCS did not accept connections on ${this.address} within ${Math.round(timeoutMs / 1_000)} s`,
            'RAY_HEAD_READY_TIMEOUT',
          )
        }
        await sleep(pollMs, undefined, { signal: waiting }).catch(() => undefined)
      }
      if (signal.aborted) throw signal.reason instanceof Error ? signal.reason : new Error('aborted')
      await run.supervisor.logsSettled(2_000)
      const last = run.supervisor.tail().slice(-3).join(' | ')
      throw new RayHeadStartError(
        `ray start --head exited (code ${exit.code ?? 'unknown'}) before its GCS served${last !== '' ? `: ${last}` : ''}`,
        'RAY_HEAD_EXITED',
      )
    } finally {
      stop.abort()
    }
  }

  /** True while the head's container runs and its GCS port accepts connections. */
  async health(): Promise<boolean> {
    const run = this.supervised.running
    const runtime = this.supervised.runtime
    if (run == null || runtime == null) return false
    const status = await runtime.inspect(run.id).catch(() => null)
    return (
      status?.running === true && (await accepts(this.nodeIpAddress, this.gcsPort, defaults.connectTimeoutMs))
    )
  }

  async stop(): Promise<void> {
    this.token = null
    // Ray's SIGTERM handler stops the head's processes cleanly; workers then lose the cluster.
    await this.supervised.stop()
  }
}
