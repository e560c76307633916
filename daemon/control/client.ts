import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { GarageError } from '../../core/errors.ts'
import { SseSplitter } from '../../core/sse.ts'
import { type ControlInfo, controlInfoFileName, controlTokenFileName } from './server.ts'
import type { ControlEvents, ControlState, NodeSettings, NodeStatus } from './types.ts'

/**
 * The one client of a running daemon's control API (daemon/control/server.ts): the CLI
 * (`garage status`, ...) and the tray app use it. It finds the daemon through `<dataDir>/control.json`
 * and `control.token`, re-read at every request when made with forDataDir() (a restarted daemon has
 * a new port and token).
 */

/** No daemon is running for this data dir, or it does not answer. */
export class DaemonNotRunningError extends GarageError {}
/** control.token cannot be read (another user's daemon, a permissions mistake). */
export class ControlTokenUnreadableError extends GarageError {}
/** The event stream carried nothing, not even a heartbeat, for too long. */
export class ControlStreamSilentError extends GarageError {}
/** The control API answered with an error; `code` is a control code of core/errors.ts. */
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

/** Where a running daemon's control API is. */
export interface ControlEndpoint {
  /** `http://127.0.0.1:PORT` */
  url: string
  token: string
  pid: number | null
}

export type ControlStats = ControlEvents['stats']['detail']
export type ControlEvent = { type: 'state'; status: NodeStatus } | { type: 'stats'; stats: ControlStats }

const defaultRequestTimeoutMs = 10_000
/** Three of the daemon's 15 s heartbeats (docs/control-api.md: reconnect after 45 s of nothing). */
const defaultSilenceTimeoutMs = 45_000
const startHint = 'start it with garage node'
const loopbackHosts = new Set(['127.0.0.1', 'localhost', '[::1]'])
const controlStates: ReadonlySet<ControlState> = new Set([
  'stopped',
  'starting',
  'serving',
  'paused',
  'draining',
  'stopping',
  'error',
])

function isErrno(err: unknown, ...codes: string[]): boolean {
  return codes.includes(String((err as NodeJS.ErrnoException).code))
}

/** True when a process with this id exists (EPERM: it exists but belongs to someone else). */
export function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return isErrno(err, 'EPERM')
  }
}

/**
 * Reads `<dataDir>/control.json` and `control.token`; null when either is missing or control.json is
 * half written (look again later). `loopbackOnly`: refuse a URL off this machine, so the token
 * never leaves it (the tray).
 */
export async function readControlEndpoint(
  dataDir: string,
  options: { loopbackOnly?: boolean } = {},
): Promise<ControlEndpoint | null> {
  const infoPath = join(dataDir, controlInfoFileName)
  let raw: string
  let token: string
  try {
    raw = await readFile(infoPath, 'utf8')
    token = (await readFile(join(dataDir, controlTokenFileName), 'utf8')).trim()
  } catch (err) {
    if (isErrno(err, 'ENOENT', 'ENOTDIR')) return null
    throw err
  }
  let parsed: Partial<ControlInfo>
  try {
    parsed = (JSON.parse(raw) ?? {}) as Partial<ControlInfo>
  } catch {
    return null
  }
  const { url, pid } = parsed
  if (typeof url !== 'string' || token === '') return null
  let parsedUrl: URL
  try {
    parsedUrl = new URL(url)
  } catch {
    throw new DaemonNotRunningError(`${infoPath} has no valid url`, 'DAEMON_NOT_RUNNING')
  }
  if (
    options.loopbackOnly === true &&
    (parsedUrl.protocol !== 'http:' || !loopbackHosts.has(parsedUrl.hostname))
  )
    throw new DaemonNotRunningError(`${infoPath} points away from loopback: ${url}`, 'DAEMON_NOT_RUNNING')
  return {
    url: parsedUrl.origin,
    token,
    pid: typeof pid === 'number' && Number.isInteger(pid) ? pid : null,
  }
}

/**
 * The daemon of `dataDir`, or a one-line DaemonNotRunningError / ControlTokenUnreadableError saying
 * what is missing and what to do (the CLI prints it).
 */
export async function findDaemon(dataDir: string): Promise<ControlEndpoint> {
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
  if (!isProcessAlive(info.pid))
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

/** The daemon's dashboard page with the token in the fragment (never sent over HTTP). */
export function dashboardUrl(endpoint: ControlEndpoint): string {
  return `${new URL('/', endpoint.url).href}#token=${encodeURIComponent(endpoint.token)}`
}

export function isNodeStatus(value: unknown): value is NodeStatus {
  const v = value as Partial<NodeStatus> | null
  return (
    v != null &&
    typeof v === 'object' &&
    typeof v.state === 'string' &&
    controlStates.has(v.state as ControlState) &&
    typeof v.tokensPerSecond === 'number'
  )
}

function isNodeStats(value: unknown): value is ControlStats {
  const v = value as Partial<ControlStats> | null
  return v != null && typeof v === 'object' && typeof v.tokensPerSecond === 'number'
}

/** An SSE event of /events as a ControlEvent; comments, unknown events and bad data → null. */
export function toControlEvent(event: string | null, data: string | null): ControlEvent | null {
  if (data == null) return null
  let value: unknown
  try {
    value = JSON.parse(data)
  } catch {
    return null
  }
  if (event === 'state' && isNodeStatus(value)) return { type: 'state', status: value }
  if (event === 'stats' && isNodeStats(value)) return { type: 'stats', stats: value }
  return null
}

export interface ControlClientOptions {
  /** Where the daemon is; asked at every request. Null: no daemon runs. */
  endpoint: () => Promise<ControlEndpoint | null>
  requestTimeoutMs?: number
  /** An event stream that says nothing (not even its heartbeat) this long is dead. */
  silenceTimeoutMs?: number
}

export class ControlClient {
  private readonly options: ControlClientOptions

  constructor(options: ControlClientOptions) {
    this.options = options
  }

  /** The daemon that keeps its state in dataDir, found once now (a clear error when there is none). */
  static async connect(dataDir: string): Promise<ControlClient> {
    const endpoint = await findDaemon(dataDir)
    return new ControlClient({ endpoint: async () => endpoint })
  }

  /** The daemon of dataDir, looked up again at every request; its URL must be loopback. */
  static forDataDir(dataDir: string, options: Omit<ControlClientOptions, 'endpoint'> = {}): ControlClient {
    return new ControlClient({
      ...options,
      endpoint: () => readControlEndpoint(dataDir, { loopbackOnly: true }),
    })
  }

  async endpoint(): Promise<ControlEndpoint> {
    const endpoint = await this.options.endpoint()
    if (endpoint == null)
      throw new DaemonNotRunningError(
        `the Garage node is not running (no control.json); ${startHint}`,
        'DAEMON_NOT_RUNNING',
      )
    return endpoint
  }

  async status(options: { signal?: AbortSignal } = {}): Promise<NodeStatus> {
    const body = await this.json('GET', '/status', undefined, options.signal)
    if (!isNodeStatus(body))
      throw new ControlApiError('GET /status answered something that is not a status', {
        code: 'HTTP_502',
        status: 502,
      })
    return body
  }

  /** Pauses for `minutes`, until a time, or (neither) until resumed; returns the status after. */
  pause(
    request: { minutes?: number; until?: Date | string } = {},
    options: { signal?: AbortSignal } = {},
  ): Promise<NodeStatus> {
    const until = request.until instanceof Date ? request.until.toISOString() : request.until
    const body = request.minutes != null ? { minutes: request.minutes } : until != null ? { until } : {}
    return this.json('POST', '/pause', body, options.signal) as Promise<NodeStatus>
  }

  resume(options: { signal?: AbortSignal } = {}): Promise<NodeStatus> {
    return this.json('POST', '/resume', {}, options.signal) as Promise<NodeStatus>
  }

  /** Seconds since the user last touched the machine (the tray reports it). */
  async reportIdle(seconds: number, options: { signal?: AbortSignal } = {}): Promise<void> {
    await this.json('POST', '/idle', { seconds: Math.max(0, Math.round(seconds)) }, options.signal)
  }

  settings(): Promise<NodeSettings> {
    return this.json('GET', '/settings') as Promise<NodeSettings>
  }

  /** A partial patch; a schedule may be text (`mon-fri 18-23`). Returns the settings now in force. */
  updateSettings(patch: Partial<Record<keyof NodeSettings, unknown>>): Promise<NodeSettings> {
    return this.json('PUT', '/settings', patch) as Promise<NodeSettings>
  }

  async logs(lines: number, options: { signal?: AbortSignal } = {}): Promise<string[]> {
    const body = (await this.json('GET', `/logs?lines=${lines}`, undefined, options.signal)) as {
      lines: string[]
    }
    return body.lines
  }

  /**
   * The /events stream: the state at once, then every state change and the stats once a second.
   * `onOpen` runs once the daemon accepted the subscription. The daemon sends a `: heartbeat` every
   * 15 s; after `silenceTimeoutMs` (45 s) without a byte the stream counts as dead (a hung daemon, a
   * sleeping laptop) and this throws ControlStreamSilentError, so the caller reconnects.
   */
  async *events(
    options: { signal?: AbortSignal; onOpen?: () => Promise<void> } = {},
  ): AsyncGenerator<ControlEvent> {
    const silent = new AbortController()
    const silenceMs = this.options.silenceTimeoutMs ?? defaultSilenceTimeoutMs
    let timer: NodeJS.Timeout | undefined
    const heard = (): void => {
      clearTimeout(timer)
      timer = setTimeout(
        () =>
          silent.abort(
            new ControlStreamSilentError(
              `no event or heartbeat for ${silenceMs} ms`,
              'CONTROL_STREAM_SILENT',
            ),
          ),
        silenceMs,
      )
    }
    heard()
    const signal = options.signal != null ? AbortSignal.any([options.signal, silent.signal]) : silent.signal
    let reader: ReadableStreamDefaultReader<Uint8Array> | null = null
    try {
      const res = await this.request('GET', '/events', undefined, signal, { timeout: false })
      if (res.body == null) return
      heard()
      await options.onOpen?.()
      reader = res.body.getReader()
      const splitter = new SseSplitter()
      for (;;) {
        const { value, done } = await reader.read()
        if (done) return
        heard()
        for (const e of splitter.push(value)) {
          const event = toControlEvent(e.event, e.data)
          if (event != null) yield event
        }
      }
    } catch (err) {
      if (options.signal?.aborted === true) return
      if (silent.signal.aborted) throw silent.signal.reason
      if (err instanceof GarageError) throw err
      throw new DaemonNotRunningError(
        `the event stream from the daemon broke: ${(err as Error).message}`,
        'DAEMON_NOT_RUNNING',
      )
    } finally {
      clearTimeout(timer)
      // The consumer stopped early (break, return): close the stream so the server drops it.
      await reader?.cancel().catch(() => {})
    }
  }

  private async json(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<unknown> {
    const res = await this.request(method, path, body, signal)
    const text = await res.text()
    if (text === '') return null
    try {
      return JSON.parse(text)
    } catch {
      return text
    }
  }

  private async request(
    method: string,
    path: string,
    body: unknown,
    signal?: AbortSignal,
    options: { timeout?: boolean } = {},
  ): Promise<Response> {
    const endpoint = await this.endpoint()
    const timeoutMs = this.options.requestTimeoutMs ?? defaultRequestTimeoutMs
    const signals = [signal, options.timeout === false ? undefined : AbortSignal.timeout(timeoutMs)]
    let res: Response
    try {
      res = await fetch(new URL(path, endpoint.url), {
        method,
        headers: {
          authorization: `Bearer ${endpoint.token}`,
          ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
        },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
        signal: AbortSignal.any(signals.filter((s): s is AbortSignal => s != null)),
      })
    } catch (err) {
      if (signal?.aborted === true) throw signal.reason ?? err
      const cause = (err as { cause?: NodeJS.ErrnoException }).cause
      if ((err as Error).name === 'TimeoutError')
        throw new DaemonNotRunningError(
          `the daemon at ${endpoint.url} did not answer ${method} ${path} within ${timeoutMs / 1000} s`,
          'DAEMON_TIMEOUT',
        )
      throw new DaemonNotRunningError(
        `no daemon answers at ${endpoint.url} (${cause?.code ?? (err as Error).message}); ${startHint}`,
        'DAEMON_NOT_RUNNING',
      )
    }
    if (!res.ok) {
      let error: { message?: unknown; code?: unknown; field?: unknown; fields?: unknown } = {}
      try {
        const parsed = (await res.json()) as { error?: unknown }
        if (typeof parsed.error === 'string') error = { message: parsed.error }
        else if (parsed.error != null && typeof parsed.error === 'object') error = parsed.error
      } catch {}
      const hint =
        res.status === 401
          ? ` (the token in ${controlTokenFileName} does not match; is it another daemon's?)`
          : ''
      const message =
        typeof error.message === 'string' ? error.message : `${method} ${path} answered ${res.status}`
      throw new ControlApiError(`${message}${hint}`, {
        code: typeof error.code === 'string' ? error.code : `HTTP_${res.status}`,
        status: res.status,
        field: typeof error.field === 'string' ? error.field : null,
        fields:
          error.fields != null && typeof error.fields === 'object'
            ? (error.fields as Record<string, string>)
            : null,
      })
    }
    return res
  }
}
