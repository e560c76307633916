import { createInterface } from 'node:readline'
import { execa } from 'execa'
import { type Logger, silentLogger } from '../core/logger.ts'
import { runTool, type ToolResult } from '../core/tools.ts'
import { buildRunArgs, isValidImageReference } from './argv.ts'
import {
  ContainerCommandError,
  ContainerCommandTimeoutError,
  ContainerRuntimeUnavailableError,
  ContainerSpecError,
  ImagePullError,
} from './errors.ts'
import { nodeLabelFilter } from './labels.ts'
import { LineRing, logContainerLine } from './logs.ts'
import { probeDocker, probePodman } from './probe.ts'
import { PullProgressParser, stripAnsi } from './pull-progress.ts'
import type {
  CommandOptions,
  ContainerRuntime,
  ContainerRuntimeDetails,
  ContainerRuntimeInfo,
  ContainerRuntimeName,
  ContainerSpec,
  ContainerStateName,
  ContainerStatus,
  GarageContainerRole,
  LogFollower,
  LogFollowOptions,
  PullOptions,
} from './types.ts'

export interface CliContainerRuntimeInit {
  /** The binary; defaults to the runtime's name on PATH. */
  command?: string
  /** Deadline of short commands (inspect, ps, rm, start). */
  commandTimeoutMs?: number
  /** Deadline of `run` (creating the container, setting up its network). */
  runTimeoutMs?: number
  /** Deadline of a pull: a vLLM image is ~10 GB. */
  pullTimeoutMs?: number
  /**
   * Linux: run `pull` under util-linux `script` so the CLI sees a terminal and prints byte counts;
   * without a terminal Podman only names each layer once.
   */
  pullInTerminal?: boolean
  /** Added to the CLI's environment (CONTAINER_HOST, DOCKER_HOST, CONTAINERS_REGISTRIES_CONF). */
  env?: Record<string, string>
  logger?: Logger
}

const defaults = {
  commandTimeoutMs: 30_000,
  runTimeoutMs: 120_000,
  pullTimeoutMs: 2 * 60 * 60_000,
}

const noSuchContainer = /no such (container|object)|no container with (name|id)|not found/i
const knownStates: readonly string[] = [
  'created',
  'running',
  'paused',
  'restarting',
  'exited',
  'stopped',
  'removing',
  'dead',
]

function abortError(signal: AbortSignal): Error {
  return signal.reason instanceof Error ? signal.reason : new DOMException('aborted', 'AbortError')
}

function time(value: unknown): string | null {
  if (typeof value !== 'string' || value === '' || value.startsWith('0001-01-01')) return null
  return value
}

function parseStatus(doc: Record<string, unknown>): ContainerStatus {
  const state = (doc.State ?? {}) as Record<string, unknown>
  const config = (doc.Config ?? {}) as Record<string, unknown>
  const rawState = String(state.Status ?? 'unknown').toLowerCase()
  const stateName = (
    knownStates.includes(rawState)
      ? rawState
      : rawState === 'configured' || rawState === 'initialized'
        ? 'created'
        : 'unknown'
  ) as ContainerStateName
  const health = String((state.Health as { Status?: unknown } | undefined)?.Status ?? '')
  const exited = stateName === 'exited' || stateName === 'stopped' || stateName === 'dead'
  return {
    id: String(doc.Id ?? ''),
    name: String(doc.Name ?? '').replace(/^\//, ''),
    image: String(config.Image ?? doc.ImageName ?? doc.Image ?? ''),
    state: stateName,
    running: state.Running === true,
    exitCode: exited && typeof state.ExitCode === 'number' ? state.ExitCode : null,
    oomKilled: state.OOMKilled === true,
    health: health === 'starting' || health === 'healthy' || health === 'unhealthy' ? health : null,
    startedAt: time(state.StartedAt),
    finishedAt: time(state.FinishedAt),
    labels: (config.Labels as Record<string, string> | null | undefined) ?? {},
  }
}

/** Podman or Docker through its CLI; every command has a deadline, long ones also take a signal. */
export class CliContainerRuntime implements ContainerRuntime {
  readonly name: ContainerRuntimeName
  private readonly command: string
  private readonly commandTimeoutMs: number
  private readonly runTimeoutMs: number
  private readonly pullTimeoutMs: number
  private readonly pullInTerminal: boolean
  private readonly log: Logger
  private readonly env: Record<string, string> | undefined
  private terminalWrapper: Promise<boolean> | null = null

  constructor(name: ContainerRuntimeName, init: CliContainerRuntimeInit = {}) {
    this.name = name
    this.command = init.command ?? name
    this.commandTimeoutMs = init.commandTimeoutMs ?? defaults.commandTimeoutMs
    this.runTimeoutMs = init.runTimeoutMs ?? defaults.runTimeoutMs
    this.pullTimeoutMs = init.pullTimeoutMs ?? defaults.pullTimeoutMs
    this.pullInTerminal = init.pullInTerminal ?? true
    this.env = init.env
    this.log = (init.logger ?? silentLogger).child({ component: 'daemon:container', runtime: name })
  }

  private async exec(args: string[], timeoutMs = this.commandTimeoutMs): Promise<ToolResult> {
    const result = await runTool(this.command, args, {
      timeoutMs,
      concurrent: true,
      ...(this.env != null ? { env: { ...process.env, ...this.env } } : {}),
    })
    const what = `${this.name} ${args[0] ?? ''}`.trim()
    if (result.status === 'not-found') {
      throw new ContainerRuntimeUnavailableError(`${this.name} is not installed`, 'CONTAINER_RUNTIME_MISSING')
    }
    if (result.status === 'timeout') {
      throw new ContainerCommandTimeoutError(
        `${what} did not finish within ${timeoutMs} ms`,
        'CONTAINER_COMMAND_TIMEOUT',
      )
    }
    return result
  }

  private async execOk(args: string[], timeoutMs?: number): Promise<string> {
    const result = await this.exec(args, timeoutMs)
    if (result.status !== 'ok')
      throw new ContainerCommandError(`${this.name} ${args[0]}`, result.exitCode, result.stderr)
    return result.stdout
  }

  async details(options: CommandOptions = {}): Promise<ContainerRuntimeDetails> {
    const probe = this.name === 'podman' ? probePodman : probeDocker
    const info = await probe({
      timeoutMs: options.timeoutMs ?? this.commandTimeoutMs,
      ...(this.env != null ? { env: { ...process.env, ...this.env } } : {}),
    })
    if (!info.installed || !info.reachable) {
      throw new ContainerRuntimeUnavailableError(
        info.message ?? `${this.name} does not answer`,
        'CONTAINER_RUNTIME_UNREACHABLE',
      )
    }
    return { name: this.name, version: info.version, rootless: info.rootless }
  }

  runArgs(spec: ContainerSpec): string[] {
    return buildRunArgs(this.name, spec)
  }

  async imageExists(image: string, options: CommandOptions = {}): Promise<boolean> {
    const result = await this.exec(['image', 'inspect', '--format', '{{.Id}}', image], options.timeoutMs)
    return result.status === 'ok'
  }

  private usesTerminal(): Promise<boolean> {
    if (!this.pullInTerminal || process.platform !== 'linux') return Promise.resolve(false)
    this.terminalWrapper ??= runTool('script', ['--version'], { timeoutMs: 5_000 }).then(
      (r) => r.status === 'ok' && /util-linux/.test(r.stdout + r.stderr),
    )
    return this.terminalWrapper
  }

  async pull(image: string, options: PullOptions = {}): Promise<void> {
    if (!isValidImageReference(image)) {
      throw new ContainerSpecError(
        `image reference ${JSON.stringify(image)} is not allowed`,
        'CONTAINER_SPEC_INVALID',
      )
    }
    const parser = new PullProgressParser(image)
    const lines = new LineRing(20)
    const report = (text: string): void => {
      for (const progress of parser.push(text)) options.onProgress?.(progress)
    }
    const terminal = await this.usesTerminal()
    // The image reference matched a strict pattern (no quotes, spaces or shell characters) above.
    const [file, args] = terminal
      ? [
          'script',
          ['-qfec', `stty cols 200 rows 50 2>/dev/null; exec ${this.command} pull '${image}'`, '/dev/null'],
        ]
      : [this.command, ['pull', image]]
    this.log.info({ image, terminal }, 'pulling image')
    const child = execa(file, args, {
      timeout: options.timeoutMs ?? this.pullTimeoutMs,
      cancelSignal: options.signal,
      forceKillAfterDelay: 2_000,
      reject: false,
      stdin: 'ignore',
      // Not in our terminal's process group: a Ctrl-C is ours to handle, not this helper's.
      detached: process.platform !== 'win32',
      buffer: false,
      ...(this.env != null ? { env: this.env } : {}),
    })
    for (const stream of [child.stdout, child.stderr]) {
      stream?.setEncoding('utf8')
      stream?.on('data', (chunk: string) => {
        for (const l of chunk.split(/[\r\n]+/)) if (l.trim() !== '') lines.push(l.trim())
        report(chunk)
      })
    }
    const result = await child
    for (const progress of parser.end()) options.onProgress?.(progress)
    if (result.isCanceled && options.signal != null) throw abortError(options.signal)
    if (result.timedOut) {
      throw new ContainerCommandTimeoutError(
        `${this.name} pull ${image} did not finish in time`,
        'CONTAINER_COMMAND_TIMEOUT',
      )
    }
    if (result.failed) {
      const reason = stripAnsi(lines.values().pop() ?? `exit code ${result.exitCode}`)
      throw new ImagePullError(`${this.name} could not pull ${image}: ${reason}`, 'IMAGE_PULL_FAILED')
    }
    options.onProgress?.(parser.finished())
    this.log.info({ image }, 'pulled image')
  }

  async run(spec: ContainerSpec, options: CommandOptions = {}): Promise<string> {
    const args = this.runArgs(spec)
    const result = await this.exec(args, options.timeoutMs ?? this.runTimeoutMs)
    if (result.status !== 'ok') {
      // A run that failed at start (a port taken) leaves a created container holding the name.
      await this.exec(['rm', '--force', spec.name]).catch(() => undefined)
      throw new ContainerCommandError(`${this.name} run`, result.exitCode, result.stderr)
    }
    const id = result.stdout.trim().split('\n').pop()?.trim() ?? ''
    this.log.info(
      { name: spec.name, id: id.slice(0, 12), role: spec.role, image: spec.image },
      'container started',
    )
    return id
  }

  async start(id: string, options: CommandOptions = {}): Promise<void> {
    await this.execOk(['start', id], options.timeoutMs ?? this.runTimeoutMs)
  }

  async inspect(id: string, options: CommandOptions = {}): Promise<ContainerStatus | null> {
    const result = await this.exec(['container', 'inspect', id], options.timeoutMs)
    if (result.status !== 'ok') {
      if (noSuchContainer.test(result.stderr)) return null
      throw new ContainerCommandError(`${this.name} inspect`, result.exitCode, result.stderr)
    }
    const docs = JSON.parse(result.stdout) as Array<Record<string, unknown>>
    return docs[0] != null ? parseStatus(docs[0]) : null
  }

  async wait(id: string, options: CommandOptions = {}): Promise<number | null> {
    const result = await execa(this.command, ['wait', id], {
      timeout: options.timeoutMs ?? 10 * 60_000,
      cancelSignal: options.signal,
      forceKillAfterDelay: 1_000,
      reject: false,
      stdin: 'ignore',
      // Not in our terminal's process group: a Ctrl-C is ours to handle, not this helper's.
      detached: process.platform !== 'win32',
      ...(this.env != null ? { env: this.env } : {}),
    })
    if (result.isCanceled && options.signal != null) throw abortError(options.signal)
    if (result.timedOut) return null
    if (result.failed)
      throw new ContainerCommandError(`${this.name} wait`, result.exitCode ?? null, String(result.stderr))
    const code = Number.parseInt(String(result.stdout).trim().split('\n').pop() ?? '', 10)
    return Number.isNaN(code) ? null : code
  }

  followLogs(id: string, options: LogFollowOptions): LogFollower {
    const ring = new LineRing(50)
    const args = ['logs', '--follow', ...(options.since != null ? ['--since', options.since] : []), id]
    // Bounded by the container's life and the signal rather than a clock: it ends when the container stops.
    const child = execa(this.command, args, {
      cancelSignal: options.signal,
      reject: false,
      stdin: 'ignore',
      // Not in our terminal's process group: a Ctrl-C is ours to handle, not this helper's.
      detached: process.platform !== 'win32',
      buffer: false,
      ...(this.env != null ? { env: this.env } : {}),
    })
    const streams: Array<['stdout' | 'stderr', NodeJS.ReadableStream | null]> = [
      ['stdout', child.stdout],
      ['stderr', child.stderr],
    ]
    const closed = streams.map(([name, stream]) => {
      if (stream == null) return Promise.resolve()
      const lines = createInterface({ input: stream, crlfDelay: Number.POSITIVE_INFINITY })
      lines.on('line', (line) => {
        ring.push(line)
        logContainerLine(options.logger, line, name)
        options.onLine?.(line)
      })
      return new Promise<void>((resolve) => lines.once('close', () => resolve()))
    })
    const done = Promise.all([child, ...closed]).then(
      () => undefined,
      () => undefined,
    )
    return { done, tail: () => ring.values() }
  }

  async kill(id: string, options: CommandOptions & { killSignal?: string } = {}): Promise<void> {
    await this.execOk(['kill', '--signal', options.killSignal ?? 'KILL', id], options.timeoutMs)
  }

  async stop(id: string, options: CommandOptions & { graceMs?: number } = {}): Promise<void> {
    const graceSeconds = Math.max(0, Math.ceil((options.graceMs ?? 10_000) / 1_000))
    const result = await this.exec(
      ['stop', '-t', String(graceSeconds), id],
      options.timeoutMs ?? graceSeconds * 1_000 + 30_000,
    )
    if (result.status !== 'ok' && !noSuchContainer.test(result.stderr)) {
      throw new ContainerCommandError(`${this.name} stop`, result.exitCode, result.stderr)
    }
  }

  async remove(id: string, options: CommandOptions = {}): Promise<void> {
    const result = await this.exec(['rm', '--force', '--volumes', id], options.timeoutMs)
    if (result.status !== 'ok' && !noSuchContainer.test(result.stderr)) {
      throw new ContainerCommandError(`${this.name} rm`, result.exitCode, result.stderr)
    }
  }

  async list(labels: Record<string, string>, options: CommandOptions = {}): Promise<ContainerStatus[]> {
    const filters = Object.entries(labels).flatMap(([k, v]) => ['--filter', `label=${k}=${v}`])
    const ids = (await this.execOk(['ps', '--all', '--quiet', '--no-trunc', ...filters], options.timeoutMs))
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean)
    if (ids.length === 0) return []
    const all = await this.exec(['container', 'inspect', ...ids], options.timeoutMs)
    if (all.status === 'ok')
      return (JSON.parse(all.stdout) as Array<Record<string, unknown>>).map(parseStatus)
    // One of them went away between ps and inspect: ask one by one.
    const one = await Promise.all(ids.map((id) => this.inspect(id, options)))
    return one.filter((s) => s != null)
  }

  async removeOrphans(
    nodePeerId: string,
    options: CommandOptions & { role?: GarageContainerRole; keep?: string[] } = {},
  ): Promise<string[]> {
    const keep = new Set(options.keep ?? [])
    const found = await this.list(nodeLabelFilter(nodePeerId, options.role), options)
    const orphans = found.filter((c) => !keep.has(c.id) && !keep.has(c.name))
    for (const orphan of orphans) {
      this.log.warn(
        { name: orphan.name, id: orphan.id.slice(0, 12), state: orphan.state },
        'removing orphaned container',
      )
      if (orphan.running) await this.stop(orphan.id, { graceMs: 5_000 })
      await this.remove(orphan.id, options)
    }
    return orphans.map((o) => o.name)
  }
}

export interface DetectContainerRuntimeOptions extends CliContainerRuntimeInit {
  prefer?: ContainerRuntimeName
  probeTimeoutMs?: number
}

/**
 * The runtime to run engines with: the preferred one when it answers, else Podman (CDI without a
 * daemon), else Docker. Reuses the hardware probe's checks of each CLI.
 */
export async function detectContainerRuntime(
  options: DetectContainerRuntimeOptions = {},
): Promise<CliContainerRuntime> {
  const probeOptions = { timeoutMs: options.probeTimeoutMs ?? 10_000 }
  const [podman, docker] = await Promise.all([probePodman(probeOptions), probeDocker(probeOptions)])
  const order: ContainerRuntimeInfo[] = options.prefer === 'docker' ? [docker, podman] : [podman, docker]
  const chosen = order.find((r) => r.installed && r.reachable)
  if (chosen == null) {
    const why = [podman, docker].map((r) => `${r.name}: ${r.message ?? 'does not answer'}`).join('; ')
    throw new ContainerRuntimeUnavailableError(
      `no container runtime answers (${why}); install Podman (apt install podman) or start Docker`,
      'CONTAINER_RUNTIME_UNAVAILABLE',
    )
  }
  return new CliContainerRuntime(chosen.name, options)
}
