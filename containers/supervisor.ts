import { setTimeout as sleep } from 'node:timers/promises'
import { TypedEventEmitter } from 'main-event'
import { GarageError } from '../core/errors.ts'
import type { Logger } from '../core/logger.ts'
import { LineRing } from './logs.ts'
import type { ContainerRuntime, LogFollower } from './types.ts'

/** The container kept crashing: the supervisor gave up (the daemon reports the engine as crashed). */
export class ContainerCrashLoopError extends GarageError {}

/** The container disappeared under the supervisor (removed by hand or by another process). */
export class ContainerGoneError extends GarageError {}

export interface RestartPolicy {
  /** Delay before the first restart; doubles with each crash still inside the window. */
  baseDelayMs: number
  maxDelayMs: number
  /** This many crashes inside `windowMs` and the supervisor gives up. */
  maxCrashes: number
  windowMs: number
}

export const defaultRestartPolicy: Readonly<RestartPolicy> = Object.freeze({
  baseDelayMs: 1_000,
  maxDelayMs: 60_000,
  maxCrashes: 5,
  windowMs: 10 * 60_000,
})

/** Delay before restart number `crashesInWindow` (1 = the first crash of the window). */
export function restartDelayMs(policy: RestartPolicy, crashesInWindow: number): number {
  return Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** Math.max(0, crashesInWindow - 1))
}

export type SupervisorState = 'idle' | 'watching' | 'backing-off' | 'crashed' | 'stopped'

export interface SupervisorEvents {
  exited: CustomEvent<{ exitCode: number | null; oomKilled: boolean; crashesInWindow: number }>
  restarting: CustomEvent<{ delayMs: number; attempt: number }>
  restarted: CustomEvent<{ restarts: number; startedAt: string | null }>
  'gave-up': CustomEvent<{ error: Error; restarts: number }>
}

export interface ContainerSupervisorInit {
  runtime: ContainerRuntime
  /** Container id or name. */
  container: string
  /** The engine's child logger; the container's lines go to it. */
  logger: Logger
  policy?: Partial<RestartPolicy>
  /** Each `wait` call's deadline; the watch re-arms after it. */
  waitTimeoutMs?: number
  onLine?: (line: string) => void
  /** Clock of the crash window (tests). */
  now?: () => number
  /**
   * false: an exit before `arm()` is reported but not restarted (an engine that dies while it loads
   * has a reason a restart will not fix; its start fails instead).
   */
  armed?: boolean
}

/**
 * Watches one container, streams its logs, and restarts it (`start` on the same container, so its
 * port, key and mounts stay) when it exits on its own, with exponential backoff. After
 * `maxCrashes` exits inside `windowMs` it gives up: state `crashed` and a `gave-up` event.
 * The engines' own restart policy rather than `--restart`: Docker does not restart a container
 * that was killed by hand, neither runtime reports a crash loop as an event, and rootless Podman
 * restarts only while its conmon lives.
 */
export class ContainerSupervisor extends TypedEventEmitter<SupervisorEvents> {
  private readonly runtime: ContainerRuntime
  private readonly container: string
  private readonly logger: Logger
  private readonly policy: RestartPolicy
  private readonly waitTimeoutMs: number
  private readonly onLine: ((line: string) => void) | undefined
  private readonly now: () => number
  private armed: boolean
  private readonly lines = new LineRing(50)
  private readonly crashTimes: number[] = []
  private controller: AbortController | null = null
  private follower: LogFollower | null = null
  private loop: Promise<void> | null = null
  private current: SupervisorState = 'idle'
  private restartCount = 0

  constructor(init: ContainerSupervisorInit) {
    super()
    this.runtime = init.runtime
    this.container = init.container
    this.logger = init.logger
    this.policy = { ...defaultRestartPolicy, ...init.policy }
    this.waitTimeoutMs = init.waitTimeoutMs ?? 10 * 60_000
    this.onLine = init.onLine
    this.now = init.now ?? Date.now
    this.armed = init.armed ?? true
  }

  /** From now on an exit is restarted. */
  arm(): void {
    this.armed = true
  }

  get state(): SupervisorState {
    return this.current
  }

  get restarts(): number {
    return this.restartCount
  }

  /** The container's last lines (across restarts). */
  tail(): string[] {
    return this.lines.values()
  }

  /** Resolves when the current log stream ended (the container stopped writing), or after `timeoutMs`. */
  async logsSettled(timeoutMs: number): Promise<void> {
    const timer = sleep(timeoutMs, undefined, { ref: false })
    await Promise.race([this.follower?.done ?? Promise.resolve(), timer])
  }

  start(): void {
    if (this.controller != null) return
    this.controller = new AbortController()
    this.current = 'watching'
    this.follow(undefined)
    this.loop = this.watch(this.controller.signal).catch((err: unknown) => {
      if (this.controller?.signal.aborted === true) return
      this.giveUp(err instanceof Error ? err : new Error(String(err)))
    })
  }

  /** Stops watching and following logs; the container itself is left as it is. */
  async stop(): Promise<void> {
    if (this.controller == null) return
    this.controller.abort()
    await this.loop
    await this.follower?.done
    this.controller = null
    if (this.current !== 'crashed') this.current = 'stopped'
  }

  private follow(since: string | undefined): void {
    if (this.controller == null) return
    this.follower = this.runtime.followLogs(this.container, {
      logger: this.logger,
      signal: this.controller.signal,
      ...(since != null ? { since } : {}),
      onLine: (line) => {
        this.lines.push(line)
        this.onLine?.(line)
      },
    })
  }

  private giveUp(error: Error): void {
    this.current = 'crashed'
    this.logger.error({ err: error, restarts: this.restartCount }, 'container supervisor gave up')
    this.safeDispatchEvent('gave-up', { detail: { error, restarts: this.restartCount } })
  }

  private async watch(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      let exitCode: number | null
      try {
        exitCode = await this.runtime.wait(this.container, { signal, timeoutMs: this.waitTimeoutMs })
        if (exitCode == null) continue
      } catch (err) {
        if (signal.aborted) return
        const status = await this.runtime.inspect(this.container)
        if (status == null)
          throw new ContainerGoneError(`container ${this.container} is gone`, 'CONTAINER_GONE', {
            cause: err,
          })
        if (status.running) continue
        exitCode = status.exitCode
      }
      if (signal.aborted) return
      const status = await this.runtime.inspect(this.container)
      if (status == null)
        throw new ContainerGoneError(`container ${this.container} is gone`, 'CONTAINER_GONE')
      if (signal.aborted) return

      const now = this.now()
      this.crashTimes.push(now)
      while (this.crashTimes.length > 0 && now - this.crashTimes[0]! > this.policy.windowMs)
        this.crashTimes.shift()
      const crashesInWindow = this.crashTimes.length
      this.logger.warn(
        { exitCode, oomKilled: status.oomKilled, crashesInWindow, lastLines: this.lines.values().slice(-5) },
        'container exited',
      )
      this.safeDispatchEvent('exited', { detail: { exitCode, oomKilled: status.oomKilled, crashesInWindow } })
      if (!this.armed) {
        this.current = 'idle'
        return
      }
      if (crashesInWindow >= this.policy.maxCrashes) {
        const minutes = Math.round(this.policy.windowMs / 60_000)
        throw new ContainerCrashLoopError(
          `container ${this.container} exited ${crashesInWindow} times in ${minutes} min (last exit code ${exitCode ?? 'unknown'}${status.oomKilled ? ', out of memory' : ''})`,
          'CONTAINER_CRASH_LOOP',
        )
      }

      const delayMs = restartDelayMs(this.policy, crashesInWindow)
      this.current = 'backing-off'
      this.safeDispatchEvent('restarting', { detail: { delayMs, attempt: this.restartCount + 1 } })
      await sleep(delayMs, undefined, { signal }).catch(() => undefined)
      if (signal.aborted) return
      await this.follower?.done
      try {
        await this.runtime.start(this.container)
      } catch (err) {
        // Still exited: the next wait returns at once and counts as another crash.
        this.logger.warn({ err }, 'container restart failed')
        if (signal.aborted) return
        continue
      }
      this.restartCount++
      this.current = 'watching'
      const started = await this.runtime.inspect(this.container)
      this.follow(started?.startedAt ?? undefined)
      this.logger.info({ restarts: this.restartCount, delayMs }, 'container restarted')
      this.safeDispatchEvent('restarted', {
        detail: { restarts: this.restartCount, startedAt: started?.startedAt ?? null },
      })
    }
  }
}

/**
 * Ends a supervised container in the one safe order: the supervisor first (so the stop is not
 * taken for a crash and restarted), then a graceful stop, then removal.
 */
export async function stopSupervisedContainer(
  runtime: ContainerRuntime | null,
  run: { id: string; supervisor: ContainerSupervisor },
  graceMs: number,
): Promise<void> {
  await run.supervisor.stop()
  if (runtime == null) return
  await runtime.stop(run.id, { graceMs })
  await runtime.remove(run.id)
}
