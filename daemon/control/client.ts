import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { GarageError } from '../../core/errors.ts'
import { type ControlInfo, controlInfoFileName, controlTokenFileName } from './server.ts'
import type { ControlEvents, NodeSettings, NodeStatus } from './types.ts'

/**
 * Talks to a running daemon's control API: finds it through `<dataDir>/control.json` and
 * `control.token`. The CLI (`garage status`, ...) and the tray app's main process use it.
 */

/** No daemon is running for this data dir, or it does not answer. */
export class DaemonNotRunningError extends GarageError {}
/** control.token cannot be read (another user's daemon, a permissions mistake). */
export class ControlTokenUnreadableError extends GarageError {}
/** The control API answered with an error; `code` is one of controlErrorCodes. */
export class ControlApiError extends GarageError {
  readonly status: number
  readonly field: string | null
  readonly fields: Record<string, string> | null

  constructor(
    message: string,
    init: { code: string; status: number; field?: string | null; fields?: Record<string, string> | null },
  ) {
    super(message, init.code)
    this.status = init.status
    this.field = init.field ?? null
    this.fields = init.fields ?? null
  }
}

export interface ControlConnection {
  url: string
  token: string
  pid: number
}

export type ControlStats = ControlEvents['stats']['detail']
export type ControlEvent = { type: 'state'; status: NodeStatus } | { type: 'stats'; stats: ControlStats }

const requestTimeoutMs = 10_000
const startHint = 'start it with garage node'

function isErrno(err: unknown, ...codes: string[]): boolean {
  return codes.includes(String((err as NodeJS.ErrnoException).code))
}

/** Reads control.json and control.token; throws a one-line GarageError saying what is missing. */
export async function findDaemon(dataDir: string): Promise<ControlConnection> {
  const infoPath = join(dataDir, controlInfoFileName)
  let text: string
  try {
    text = await readFile(infoPath, 'utf8')
  } catch (err) {
    if (isErrno(err, 'ENOENT', 'ENOTDIR'))
      throw new DaemonNotRunningError(
        `no daemon running (no ${controlInfoFileName} in ${dataDir}); ${startHint}`,
        'DAEMON_NOT_RUNNING',
      )
    throw new DaemonNotRunningError(
      `cannot read ${infoPath}: ${(err as Error).message}`,
      'DAEMON_NOT_RUNNING',
    )
  }
  let info: Partial<ControlInfo>
  try {
    info = JSON.parse(text) as Partial<ControlInfo>
  } catch {
    info = {}
  }
  if (typeof info.url !== 'string' || !/^https?:\/\//.test(info.url) || typeof info.pid !== 'number')
    throw new DaemonNotRunningError(
      `${infoPath} is not what a daemon writes ({ url, pid }); delete it and ${startHint}`,
      'DAEMON_NOT_RUNNING',
    )
  if (!processAlive(info.pid))
    throw new DaemonNotRunningError(
      `no daemon running (${infoPath} names pid ${info.pid}, which has exited); ${startHint}`,
      'DAEMON_NOT_RUNNING',
    )
  const tokenPath = join(dataDir, controlTokenFileName)
  let token: string
  try {
    token = (await readFile(tokenPath, 'utf8')).trim()
  } catch (err) {
    const why = isErrno(err, 'EACCES', 'EPERM')
      ? 'permission denied; run this as the user who runs the daemon'
      : isErrno(err, 'ENOENT')
        ? 'the file is missing; restart the daemon to make a new one'
        : (err as Error).message
    throw new ControlTokenUnreadableError(
      `cannot read the control token ${tokenPath}: ${why}`,
      'CONTROL_TOKEN_UNREADABLE',
    )
  }
  if (token === '')
    throw new ControlTokenUnreadableError(
      `the control token ${tokenPath} is empty; restart the daemon to make a new one`,
      'CONTROL_TOKEN_UNREADABLE',
    )
  return { url: info.url.replace(/\/+$/, ''), token, pid: info.pid }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    // EPERM: it runs, as another user.
    return isErrno(err, 'EPERM')
  }
}

export class ControlClient {
  readonly url: string
  private readonly token: string

  constructor(connection: { url: string; token: string }) {
    this.url = connection.url
    this.token = connection.token
  }

  /** The daemon that keeps its state in dataDir. */
  static async connect(dataDir: string): Promise<ControlClient> {
    return new ControlClient(await findDaemon(dataDir))
  }

  private async request(
    method: string,
    path: string,
    body?: unknown,
    options: { signal?: AbortSignal; timeoutMs?: number | null } = {},
  ): Promise<Response> {
    const signals = [
      options.signal,
      options.timeoutMs === null ? undefined : AbortSignal.timeout(options.timeoutMs ?? requestTimeoutMs),
    ]
    const signal = AbortSignal.any(signals.filter((s): s is AbortSignal => s != null))
    let res: Response
    try {
      res = await fetch(`${this.url}${path}`, {
        method,
        headers: {
          authorization: `Bearer ${this.token}`,
          ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
        },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
        signal,
      })
    } catch (err) {
      if (options.signal?.aborted === true) throw err
      const cause = (err as { cause?: NodeJS.ErrnoException }).cause
      if ((err as Error).name === 'TimeoutError')
        throw new DaemonNotRunningError(
          `the daemon at ${this.url} did not answer ${method} ${path} within ${requestTimeoutMs / 1000} s`,
          'DAEMON_TIMEOUT',
        )
      throw new DaemonNotRunningError(
        `no daemon answers at ${this.url} (${cause?.code ?? (err as Error).message}); ${startHint}`,
        'DAEMON_NOT_RUNNING',
      )
    }
    if (!res.ok) {
      let error: { message?: string; code?: string; field?: string; fields?: Record<string, string> } = {}
      try {
        error = ((await res.json()) as { error?: typeof error }).error ?? {}
      } catch {}
      const hint =
        res.status === 401
          ? ` (the token in ${controlTokenFileName} does not match; is it another daemon's?)`
          : ''
      throw new ControlApiError(`${error.message ?? `${method} ${path} answered ${res.status}`}${hint}`, {
        code: error.code ?? `HTTP_${res.status}`,
        status: res.status,
        field: error.field ?? null,
        fields: error.fields ?? null,
      })
    }
    return res
  }

  private async json<T>(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<T> {
    const res = await this.request(method, path, body, signal != null ? { signal } : {})
    return (await res.json()) as T
  }

  status(options: { signal?: AbortSignal } = {}): Promise<NodeStatus> {
    return this.json('GET', '/status', undefined, options.signal)
  }

  /** Pauses for `minutes`, until a time, or (neither) until resumed; returns the status after. */
  pause(request: { minutes?: number; until?: Date | string } = {}): Promise<NodeStatus> {
    const until = request.until instanceof Date ? request.until.toISOString() : request.until
    return this.json('POST', '/pause', {
      ...(request.minutes != null ? { minutes: request.minutes } : {}),
      ...(until != null ? { until } : {}),
    })
  }

  resume(): Promise<NodeStatus> {
    return this.json('POST', '/resume', {})
  }

  settings(): Promise<NodeSettings> {
    return this.json('GET', '/settings')
  }

  /** A partial patch; a schedule may be text (`mon-fri 18-23`). Returns the settings now in force. */
  updateSettings(patch: Partial<Record<keyof NodeSettings, unknown>>): Promise<NodeSettings> {
    return this.json('PUT', '/settings', patch)
  }

  async logs(lines: number, options: { signal?: AbortSignal } = {}): Promise<string[]> {
    const body = await this.json<{ lines: string[] }>(
      'GET',
      `/logs?lines=${lines}`,
      undefined,
      options.signal,
    )
    return body.lines
  }

  /** The /events stream: the state at once, then every state change and the stats once a second. */
  async *events(options: { signal?: AbortSignal } = {}): AsyncGenerator<ControlEvent> {
    const res = await this.request('GET', '/events', undefined, {
      timeoutMs: null,
      ...(options.signal != null ? { signal: options.signal } : {}),
    })
    if (res.body == null) return
    let buffer = ''
    const decoder = new TextDecoder()
    const reader = res.body.getReader()
    try {
      for (;;) {
        const { value, done } = await reader.read()
        if (done) return
        buffer += decoder.decode(value, { stream: true })
        let end = buffer.indexOf('\n\n')
        while (end >= 0) {
          const event = parseSseBlock(buffer.slice(0, end))
          buffer = buffer.slice(end + 2)
          if (event != null) yield event
          end = buffer.indexOf('\n\n')
        }
      }
    } catch (err) {
      if (options.signal?.aborted === true) return
      throw new DaemonNotRunningError(`the event stream from ${this.url} broke: ${(err as Error).message}`)
    } finally {
      // The consumer stopped early (break, return): close the stream so the server drops it.
      await reader.cancel().catch(() => {})
    }
  }
}

/** One SSE block (`event:` and `data:` lines) → an event; comments and unknown events → null. */
export function parseSseBlock(block: string): ControlEvent | null {
  let type = 'message'
  const data: string[] = []
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue
    const colon = line.indexOf(':')
    const field = colon < 0 ? line : line.slice(0, colon)
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '')
    if (field === 'event') type = value
    else if (field === 'data') data.push(value)
  }
  if (data.length === 0) return null
  if (type === 'state') return { type, status: JSON.parse(data.join('\n')) as NodeStatus }
  if (type === 'stats') return { type, stats: JSON.parse(data.join('\n')) as ControlStats }
  return null
}
