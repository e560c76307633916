import { readFile, stat } from 'node:fs/promises'
import { buildRunArgs } from '../../containers/argv.ts'
import type {
  CommandOptions,
  ContainerRuntime,
  ContainerRuntimeDetails,
  ContainerSpec,
  ContainerStatus,
  LogFollower,
  LogFollowOptions,
  PullOptions,
} from '../../containers/types.ts'

/**
 * A ContainerRuntime in memory, for the fast suites: one container at a time, which the test makes
 * exit (`exit(code)`) and write lines (`line(text)`). Records every call and what `run` saw on disk.
 */
export class FakeRuntime implements ContainerRuntime {
  readonly name = 'podman' as const
  readonly calls: string[] = []
  /** argv of each run, and the env file as it was when run was called. */
  readonly runs: Array<{
    argv: string[]
    spec: ContainerSpec
    envFile: { mode: number; text: string } | null
  }> = []
  running = false
  exitCode: number | null = null
  gone = false
  /** Lines written as soon as the container (re)starts. */
  startupLines: string[] = []
  private waiters: Array<(code: number) => void> = []
  private followers: Array<{ options: LogFollowOptions; end: () => void }> = []

  async details(): Promise<ContainerRuntimeDetails> {
    return { name: 'podman', version: '4.3.1', rootless: false }
  }

  runArgs(spec: ContainerSpec): string[] {
    return buildRunArgs('podman', spec)
  }

  async imageExists(): Promise<boolean> {
    return true
  }

  async pull(image: string, _options?: PullOptions): Promise<void> {
    this.calls.push(`pull ${image}`)
  }

  async run(spec: ContainerSpec): Promise<string> {
    const argv = this.runArgs(spec)
    let envFile: { mode: number; text: string } | null = null
    if (spec.envFile != null) {
      envFile = { mode: (await stat(spec.envFile)).mode & 0o777, text: await readFile(spec.envFile, 'utf8') }
    }
    this.runs.push({ argv, spec, envFile })
    this.calls.push(`run ${spec.name}`)
    this.running = true
    this.exitCode = null
    return 'c0ffee'
  }

  async start(id: string): Promise<void> {
    this.calls.push(`start ${id}`)
    if (this.gone) throw new Error('no such container')
    this.running = true
  }

  async inspect(id: string): Promise<ContainerStatus | null> {
    if (this.gone) return null
    return {
      id,
      name: 'fake',
      image: 'fake',
      state: this.running ? 'running' : 'exited',
      running: this.running,
      exitCode: this.running ? null : this.exitCode,
      oomKilled: false,
      health: null,
      startedAt: '2026-11-24T05:00:00.000000000Z',
      finishedAt: null,
      labels: {},
    }
  }

  wait(_id: string, options: CommandOptions = {}): Promise<number | null> {
    if (!this.running) return Promise.resolve(this.exitCode ?? 0)
    return new Promise((resolve, reject) => {
      const waiter = (code: number): void => resolve(code)
      this.waiters.push(waiter)
      options.signal?.addEventListener(
        'abort',
        () => {
          this.waiters = this.waiters.filter((w) => w !== waiter)
          reject(options.signal?.reason)
        },
        { once: true },
      )
    })
  }

  followLogs(_id: string, options: LogFollowOptions): LogFollower {
    let end = (): void => undefined
    const done = new Promise<void>((resolve) => {
      end = resolve
    })
    const follower = { options, end }
    this.followers.push(follower)
    options.signal?.addEventListener('abort', () => end(), { once: true })
    const lines = [...this.startupLines]
    queueMicrotask(() => {
      for (const l of lines) options.onLine?.(l)
    })
    return { done, tail: () => [] }
  }

  /** The container writes a line. */
  line(text: string): void {
    for (const f of this.followers) f.options.onLine?.(text)
  }

  /** The container exits with `code`. */
  exit(code: number): void {
    this.running = false
    this.exitCode = code
    for (const f of this.followers.splice(0)) f.end()
    for (const w of this.waiters.splice(0)) w(code)
  }

  async kill(id: string): Promise<void> {
    this.calls.push(`kill ${id}`)
    this.exit(137)
  }

  async stop(id: string): Promise<void> {
    this.calls.push(`stop ${id}`)
    if (this.running) this.exit(0)
  }

  async remove(id: string): Promise<void> {
    this.calls.push(`remove ${id}`)
    this.gone = true
  }

  async list(): Promise<ContainerStatus[]> {
    return []
  }

  async removeOrphans(): Promise<string[]> {
    return []
  }
}

/** Resolves with the next `type` event of `target` (rejects after `timeoutMs`). */
export function nextEvent<T = unknown>(target: EventTarget, type: string, timeoutMs = 10_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${type} event within ${timeoutMs} ms`)), timeoutMs)
    target.addEventListener(
      type,
      (e) => {
        clearTimeout(timer)
        resolve((e as CustomEvent<T>).detail)
      },
      { once: true },
    )
  })
}
