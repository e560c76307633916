import { randomBytes } from 'node:crypto'
import { TypedEventEmitter } from 'main-event'
import { GarageError } from '../core/errors.ts'
import type { Logger } from '../core/logger.ts'
import { detectContainerRuntime } from './cli.ts'
import { type SecretEnvFile, writeSecretEnvFile } from './env-file.ts'
import { freeLoopbackPort, isPortInUse } from './ports.ts'
import { ContainerSupervisor, type RestartPolicy, stopSupervisedContainer } from './supervisor.ts'
import type { ContainerRuntime, ContainerSpec, PullProgress } from './types.ts'

/**
 * One supervised-container lifecycle for every long-running container Garage starts (vLLM, the Ray
 * worker, the Ray head): pull the image when missing, hand secrets over in a 0600 env file, run the
 * container, wait until it serves, restart it with backoff when it exits on its own (waiting until
 * it serves again), give up on a crash loop, and stop it gracefully. What differs between them is a
 * `ContainerLaunch`: the spec, the secrets, and how to tell that the container serves.
 */

export type SupervisedState = 'stopped' | 'starting' | 'ready' | 'crashed'

/** A container that runs under a supervisor. */
export interface RunningContainer {
  id: string
  name: string
  /** The loopback port published for it, when the launch asked for one. */
  port: number | null
  supervisor: ContainerSupervisor
}

export interface ContainerLaunch {
  image: string
  /** Containers are named `<namePrefix>-<random>`. */
  namePrefix: string
  /**
   * Written to a 0600 env file in `runDir` for `--env-file` (asked for after prepare()); removed once
   * the container holds them.
   */
  secrets(): Record<string, string>
  runDir: string
  /** Publish a free loopback port (retried when another process takes it before the run). */
  publishPort?: boolean
  spec(input: { name: string; envFile: string; port: number | null }): ContainerSpec
  /** Before the image is looked at: clean-ups and checks of the host. */
  prepare?(runtime: ContainerRuntime, signal: AbortSignal): Promise<void>
  /** Resolves once the container serves; rejects with why it cannot (it exited, the deadline passed). */
  ready(run: RunningContainer, signal: AbortSignal): Promise<void>
  /** The code of ready()'s deadline error: a restarted container that never serves again is killed. */
  readyTimeoutCode: string
  onPullProgress?: (progress: PullProgress) => void
}

export interface SupervisedContainerInit {
  /** How logs and messages name it: 'vLLM', 'the Ray worker', 'the Ray head'. */
  what: string
  runtime?: ContainerRuntime | null
  logger: Logger
  restartPolicy?: Partial<RestartPolicy>
  /** SIGTERM, then SIGKILL after this long. */
  stopGraceMs: number
  /** The component's own error (VllmStartError, RayWorkerStartError...). */
  error(message: string, code: string, options?: ErrorOptions): GarageError
  /** Codes of its errors: already running, stopped while starting, failed to start. */
  codes: { running: string; stopped: string; startFailed: string }
  /** True for a start failure that already says what went wrong; others are wrapped. */
  explains?(err: unknown): boolean
}

export interface SupervisedContainerEvents {
  starting: CustomEvent<null>
  ready: CustomEvent<RunningContainer>
  exited: CustomEvent<{ exitCode: number | null; oomKilled: boolean; crashesInWindow: number }>
  restarting: CustomEvent<{ delayMs: number; attempt: number }>
  crashed: CustomEvent<{ error: Error; restarts: number }>
  stopped: CustomEvent<null>
  /** A line the container wrote (across restarts). */
  line: CustomEvent<string>
}

const pullLogIntervalMs = 5_000

export class SupervisedContainer extends TypedEventEmitter<SupervisedContainerEvents> {
  readonly #init: SupervisedContainerInit
  readonly #log: Logger
  #runtime: ContainerRuntime | null
  #state: SupervisedState = 'stopped'
  #running: RunningContainer | null = null
  #starting: { controller: AbortController; done: Promise<unknown> } | null = null
  #recovery: AbortController | null = null

  constructor(init: SupervisedContainerInit) {
    super()
    this.#init = init
    this.#log = init.logger
    this.#runtime = init.runtime ?? null
  }

  get state(): SupervisedState {
    return this.#state
  }

  get running(): RunningContainer | null {
    return this.#running
  }

  /** True from start() until the start is over. */
  get isStarting(): boolean {
    return this.#starting != null
  }

  get runtime(): ContainerRuntime | null {
    return this.#runtime
  }

  /** The container's last lines (across restarts). */
  tail(): string[] {
    return this.#running?.supervisor.tail() ?? []
  }

  async start(launch: ContainerLaunch, callerSignal?: AbortSignal): Promise<RunningContainer> {
    // A run the supervisor gave up on still holds its exited container: clear it first.
    if (this.#starting == null && this.#state === 'crashed') await this.#teardown()
    if (this.#starting != null || this.#running != null) {
      throw this.#init.error(`${this.#init.what} is already running; stop it first`, this.#init.codes.running)
    }
    const controller = new AbortController()
    const signal =
      callerSignal != null ? AbortSignal.any([callerSignal, controller.signal]) : controller.signal
    const done = this.#launch(launch, signal)
    this.#starting = { controller, done }
    try {
      return await done
    } finally {
      this.#starting = null
    }
  }

  async #launch(launch: ContainerLaunch, signal: AbortSignal): Promise<RunningContainer> {
    this.#state = 'starting'
    this.safeDispatchEvent('starting', { detail: null })
    let envFile: SecretEnvFile | null = null
    try {
      const runtime = this.#runtime ?? (await detectContainerRuntime({ logger: this.#log }))
      this.#runtime = runtime
      await launch.prepare?.(runtime, signal)
      if (!(await runtime.imageExists(launch.image))) await this.#pull(runtime, launch, signal)
      signal.throwIfAborted()
      envFile = await writeSecretEnvFile(launch.runDir, launch.secrets())
      const name = `${launch.namePrefix}-${randomBytes(5).toString('hex')}`
      let id = ''
      let port: number | null = null
      for (let attempt = 1; id === ''; attempt++) {
        port = launch.publishPort === true ? await freeLoopbackPort() : null
        try {
          id = await runtime.run(launch.spec({ name, envFile: envFile.path, port }), { signal })
        } catch (err) {
          // The port was free a moment ago; another process took it.
          if (port != null && attempt < 3 && isPortInUse((err as Error).message)) continue
          throw err
        }
      }
      const supervisor = new ContainerSupervisor({
        runtime,
        container: id,
        logger: this.#log.child({ container: name }),
        armed: false,
        onLine: (line) => this.safeDispatchEvent('line', { detail: line }),
        ...(this.#init.restartPolicy != null ? { policy: this.#init.restartPolicy } : {}),
      })
      const run: RunningContainer = { id, name, port, supervisor }
      this.#running = run
      // The container holds its environment from now on; the file has no reason to stay on disk.
      await envFile.remove()
      envFile = null
      // Listening before the supervisor follows the logs: a line that says "ready" is never missed.
      const ready = launch.ready(run, signal)
      supervisor.start()
      await ready
      supervisor.arm()
      this.#watch(run, launch)
      this.#state = 'ready'
      this.safeDispatchEvent('ready', { detail: run })
      return run
    } catch (err) {
      const lastLines = this.tail().slice(-10)
      await envFile?.remove()
      await this.#teardown().catch((e: unknown) =>
        this.#log.warn({ err: e }, `could not remove the ${this.#init.what} container`),
      )
      if (signal.aborted) {
        this.#state = 'stopped'
        // Whoever aborted says why (stop() while starting, the caller's signal), not a bare AbortError.
        throw signal.reason instanceof Error ? signal.reason : err
      }
      this.#state = 'crashed'
      const error =
        (this.#init.explains?.(err) ?? err instanceof GarageError)
          ? (err as Error)
          : this.#init.error(
              `${this.#init.what} could not start: ${(err as Error).message}`,
              this.#init.codes.startFailed,
              { cause: err },
            )
      this.#log.error({ err: error, lastLines }, `${this.#init.what} did not start`)
      this.safeDispatchEvent('crashed', { detail: { error, restarts: 0 } })
      throw error
    }
  }

  async #pull(runtime: ContainerRuntime, launch: ContainerLaunch, signal: AbortSignal): Promise<void> {
    let lastLog = 0
    await runtime.pull(launch.image, {
      signal,
      onProgress: (progress) => {
        launch.onPullProgress?.(progress)
        const now = Date.now()
        if (now - lastLog >= pullLogIntervalMs || progress.phase === 'done') {
          lastLog = now
          const { phase, layersDone, layersTotal, bytesDone, bytesTotal, fraction } = progress
          this.#log.info(
            { image: launch.image, phase, layersDone, layersTotal, bytesDone, bytesTotal, fraction },
            `pulling ${this.#init.what} image`,
          )
        }
      },
    })
  }

  /** After a restart by the supervisor: wait until it serves again, then report ready. */
  #watch(run: RunningContainer, launch: ContainerLaunch): void {
    run.supervisor.addEventListener('exited', (e) => {
      this.#recovery?.abort()
      if (this.#state === 'ready') this.#state = 'starting'
      this.safeDispatchEvent('exited', { detail: e.detail })
    })
    run.supervisor.addEventListener('restarting', (e) =>
      this.safeDispatchEvent('restarting', { detail: e.detail }),
    )
    run.supervisor.addEventListener('restarted', () => {
      this.#recovery?.abort()
      const recovery = new AbortController()
      this.#recovery = recovery
      this.#state = 'starting'
      this.safeDispatchEvent('starting', { detail: null })
      launch.ready(run, recovery.signal).then(
        () => {
          if (this.#running !== run) return
          this.#state = 'ready'
          this.#log.info({ restarts: run.supervisor.restarts }, `${this.#init.what} is ready again`)
          this.safeDispatchEvent('ready', { detail: run })
        },
        (err: unknown) => {
          if (recovery.signal.aborted || this.#running !== run) return
          if ((err as GarageError).code === launch.readyTimeoutCode) {
            // A hung container counts as a crash: kill it and let the supervisor decide.
            this.#log.warn({ err }, `${this.#init.what} did not serve again after a restart; killing it`)
            this.#runtime?.kill(run.id).catch(() => undefined)
          }
        },
      )
    })
    run.supervisor.addEventListener('gave-up', (e) => {
      this.#recovery?.abort()
      this.#state = 'crashed'
      this.safeDispatchEvent('crashed', { detail: e.detail })
    })
  }

  /** Stops a start in progress or the running container, and removes it. */
  async stop(): Promise<void> {
    const wasRunning = this.#running != null || this.#starting != null || this.#state !== 'stopped'
    if (this.#starting != null) {
      this.#starting.controller.abort(
        this.#init.error(`${this.#init.what} was stopped while starting`, this.#init.codes.stopped),
      )
      await this.#starting.done.catch(() => undefined)
    }
    await this.#teardown()
    this.#state = 'stopped'
    if (wasRunning) this.safeDispatchEvent('stopped', { detail: null })
  }

  async #teardown(): Promise<void> {
    const run = this.#running
    if (run == null) return
    this.#recovery?.abort()
    this.#recovery = null
    // The supervisor first (a stop is not a crash to restart), then a graceful stop, then removal.
    await stopSupervisedContainer(this.#runtime, run, this.#init.stopGraceMs)
    this.#running = null
    this.#log.info({ container: run.name }, `${this.#init.what} container removed`)
  }
}

/** Resolves when the container writes a line matching `pattern`; rejects when it exits first or time runs out. */
export function waitForLine(
  container: SupervisedContainer,
  run: RunningContainer,
  pattern: RegExp,
  init: {
    timeoutMs: number
    signal: AbortSignal
    exited: (exitCode: number | null, lastLines: string) => Error
    timedOut: () => Error
  },
): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const stop = new AbortController()
    const finish = (err?: Error): void => {
      if (stop.signal.aborted) return
      stop.abort()
      clearTimeout(timer)
      if (err != null) reject(err)
      else resolve()
    }
    container.addEventListener(
      'line',
      (e) => {
        if (pattern.test(e.detail)) finish()
      },
      { signal: stop.signal },
    )
    run.supervisor.addEventListener(
      'exited',
      (e) => {
        void run.supervisor.logsSettled(2_000).then(() => {
          finish(init.exited(e.detail.exitCode, run.supervisor.tail().slice(-3).join(' | ')))
        })
      },
      { once: true, signal: stop.signal },
    )
    const timer = setTimeout(() => finish(init.timedOut()), init.timeoutMs)
    init.signal.addEventListener(
      'abort',
      () => finish(init.signal.reason instanceof Error ? init.signal.reason : new Error('aborted')),
      { once: true, signal: stop.signal },
    )
    if (init.signal.aborted)
      finish(init.signal.reason instanceof Error ? init.signal.reason : new Error('aborted'))
  })
}
