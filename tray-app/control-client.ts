import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { GarageError } from '../core/errors.ts'
import type { ControlState, NodeStatus } from '../daemon/control/types.ts'

/**
 * The tray's own client for the daemon's local control API (daemon/control/server.ts): it only
 * shares the NodeStatus type with the server, so the tray keeps working against any daemon that
 * speaks the same HTTP.
 */

export const controlFileName = 'control.json'
export const controlTokenFileName = 'control.token'

/** Where a running daemon's control API is: `<dataDir>/control.json` plus the token file. */
export interface ControlEndpoint {
  /** `http://127.0.0.1:PORT` (loopback only). */
  url: string
  token: string
  pid: number | null
}

export interface NodeStats {
  tokensPerSecond: number
  tokensToday: number
  creditsToday: number
  at: string
}

export type ControlEvent = { type: 'state'; status: NodeStatus } | { type: 'stats'; stats: NodeStats }

/** The daemon answered with an HTTP error. */
export class ControlApiError extends GarageError {
  readonly status: number

  constructor(message: string, status: number) {
    super(message, 'CONTROL_API')
    this.status = status
  }
}

/** No control.json (or token) in the data dir, or it does not point at a loopback URL. */
export class DaemonNotFoundError extends GarageError {}

/** The event stream carried nothing, not even a heartbeat, for too long. */
export class ControlStreamSilentError extends GarageError {}

const controlStates: ReadonlySet<ControlState> = new Set([
  'stopped',
  'starting',
  'serving',
  'paused',
  'draining',
  'stopping',
  'error',
])
const loopbackHosts = new Set(['127.0.0.1', 'localhost', '[::1]'])
const defaultRequestTimeoutMs = 5_000
/** Three of the daemon's 15 s heartbeats (docs/control-api.md: reconnect after 45 s of nothing). */
const defaultSilenceTimeoutMs = 45_000

/** Reads `<dataDir>/control.json` and `<dataDir>/control.token`; null when either is missing. */
export async function readControlEndpoint(dataDir: string): Promise<ControlEndpoint | null> {
  let raw: string
  let token: string
  try {
    raw = await readFile(join(dataDir, controlFileName), 'utf8')
    token = (await readFile(join(dataDir, controlTokenFileName), 'utf8')).trim()
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null
    throw err
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(raw)
  } catch {
    // The daemon may be writing it right now: treat as absent and look again later.
    return null
  }
  const { url, pid } = (parsed ?? {}) as { url?: unknown; pid?: unknown }
  if (typeof url !== 'string' || token === '') return null
  let parsedUrl: URL
  try {
    parsedUrl = new URL(url)
  } catch {
    throw new DaemonNotFoundError(`${join(dataDir, controlFileName)} has no valid url`)
  }
  // The token goes wherever control.json points: only ever to this machine.
  if (parsedUrl.protocol !== 'http:' || !loopbackHosts.has(parsedUrl.hostname))
    throw new DaemonNotFoundError(`${join(dataDir, controlFileName)} points away from loopback: ${url}`)
  return { url: parsedUrl.origin, token, pid: typeof pid === 'number' && Number.isInteger(pid) ? pid : null }
}

/** True when a process with this id exists (EPERM: it exists but belongs to someone else). */
export function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
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

function isNodeStats(value: unknown): value is NodeStats {
  const v = value as Partial<NodeStats> | null
  return v != null && typeof v === 'object' && typeof v.tokensPerSecond === 'number'
}

export interface SseMessage {
  event: string
  data: string
}

/** Incremental text/event-stream parser (WHATWG rules: CR, LF or CRLF lines; blank line dispatches). */
export class SseParser {
  private buffer = ''
  private event = ''
  private data: string[] = []

  push(chunk: string): SseMessage[] {
    this.buffer += chunk
    const out: SseMessage[] = []
    for (;;) {
      const m = /\r\n|\n|\r/.exec(this.buffer)
      if (m == null) break
      // A CR at the very end may be the first half of a CRLF split across chunks.
      if (m[0] === '\r' && m.index === this.buffer.length - 1) break
      const line = this.buffer.slice(0, m.index)
      this.buffer = this.buffer.slice(m.index + m[0].length)
      const message = this.line(line)
      if (message != null) out.push(message)
    }
    return out
  }

  private line(line: string): SseMessage | null {
    if (line === '') {
      const message =
        this.data.length > 0 ? { event: this.event || 'message', data: this.data.join('\n') } : null
      this.event = ''
      this.data = []
      return message
    }
    if (line.startsWith(':')) return null
    const colon = line.indexOf(':')
    const field = colon === -1 ? line : line.slice(0, colon)
    let value = colon === -1 ? '' : line.slice(colon + 1)
    if (value.startsWith(' ')) value = value.slice(1)
    if (field === 'event') this.event = value
    else if (field === 'data') this.data.push(value)
    return null
  }
}

/** What the tray needs of the control API; tests pass a stand-in. */
export interface TrayControlClient {
  endpoint(): Promise<ControlEndpoint>
  status(options?: { signal?: AbortSignal }): Promise<NodeStatus>
  /** `/events` as a stream; `onOpen` runs once the daemon accepted the subscription. */
  events(options: { signal: AbortSignal; onOpen?: () => Promise<void> }): AsyncIterable<ControlEvent>
  pause(options: { minutes?: number; until?: Date }, opts?: { signal?: AbortSignal }): Promise<void>
  resume(opts?: { signal?: AbortSignal }): Promise<void>
  reportIdle(seconds: number, opts?: { signal?: AbortSignal }): Promise<void>
}

export interface ControlClientOptions {
  /** Re-read at every request: a restarted daemon has a new port and token. */
  endpoint: () => Promise<ControlEndpoint | null>
  requestTimeoutMs?: number
  /** An event stream that says nothing (not even its heartbeat) this long is dead. */
  silenceTimeoutMs?: number
}

export class ControlClient implements TrayControlClient {
  private readonly options: ControlClientOptions

  constructor(options: ControlClientOptions) {
    this.options = options
  }

  /** A client for the daemon whose control.json is in `dataDir`. */
  static forDataDir(dataDir: string, options: Omit<ControlClientOptions, 'endpoint'> = {}): ControlClient {
    return new ControlClient({ ...options, endpoint: () => readControlEndpoint(dataDir) })
  }

  async endpoint(): Promise<ControlEndpoint> {
    const endpoint = await this.options.endpoint()
    if (endpoint == null) throw new DaemonNotFoundError('the Garage node is not running (no control.json)')
    return endpoint
  }

  async status(options: { signal?: AbortSignal } = {}): Promise<NodeStatus> {
    const body = await this.request('GET', '/status', undefined, options.signal)
    if (!isNodeStatus(body))
      throw new ControlApiError('GET /status answered something that is not a status', 502)
    return body
  }

  async pause(
    options: { minutes?: number; until?: Date },
    opts: { signal?: AbortSignal } = {},
  ): Promise<void> {
    const body =
      options.minutes != null
        ? { minutes: options.minutes }
        : options.until != null
          ? { until: options.until.toISOString() }
          : {}
    await this.request('POST', '/pause', body, opts.signal)
  }

  async resume(opts: { signal?: AbortSignal } = {}): Promise<void> {
    await this.request('POST', '/resume', {}, opts.signal)
  }

  async reportIdle(seconds: number, opts: { signal?: AbortSignal } = {}): Promise<void> {
    await this.request('POST', '/idle', { seconds: Math.max(0, Math.round(seconds)) }, opts.signal)
  }

  /**
   * The daemon sends a `: heartbeat` every 15 s; after `silenceTimeoutMs` (45 s) without a byte
   * the stream counts as dead (a hung daemon, a sleeping laptop) and this throws, so the caller
   * reconnects.
   */
  async *events(options: { signal: AbortSignal; onOpen?: () => Promise<void> }): AsyncIterable<ControlEvent> {
    const endpoint = await this.endpoint()
    const silent = new AbortController()
    const silenceMs = this.options.silenceTimeoutMs ?? defaultSilenceTimeoutMs
    let timer: NodeJS.Timeout | undefined
    const heard = (): void => {
      clearTimeout(timer)
      timer = setTimeout(
        () => silent.abort(new ControlStreamSilentError(`no event or heartbeat for ${silenceMs} ms`)),
        silenceMs,
      )
    }
    heard()
    try {
      yield* this.readEvents(
        endpoint,
        AbortSignal.any([options.signal, silent.signal]),
        heard,
        options.onOpen,
      )
    } finally {
      clearTimeout(timer)
    }
  }

  private async *readEvents(
    endpoint: ControlEndpoint,
    signal: AbortSignal,
    heard: () => void,
    onOpen?: () => Promise<void>,
  ): AsyncIterable<ControlEvent> {
    const res = await fetch(new URL('/events', endpoint.url), {
      headers: { authorization: `Bearer ${endpoint.token}`, accept: 'text/event-stream' },
      signal,
    })
    if (!res.ok || res.body == null) {
      await res.body?.cancel()
      throw new ControlApiError(`GET /events: HTTP ${res.status}`, res.status)
    }
    heard()
    await onOpen?.()
    const parser = new SseParser()
    const decoder = new TextDecoder()
    const reader = res.body.getReader()
    try {
      for (;;) {
        const { done, value } = await reader.read()
        if (done) return
        heard()
        for (const message of parser.push(decoder.decode(value, { stream: true }))) {
          const event = toControlEvent(message)
          if (event != null) yield event
        }
      }
    } finally {
      // The consumer stopped early (or the signal fired): close the connection.
      await reader.cancel().catch(() => {})
    }
  }

  private async request(method: string, path: string, body: unknown, signal?: AbortSignal): Promise<unknown> {
    const endpoint = await this.endpoint()
    const timeout = AbortSignal.timeout(this.options.requestTimeoutMs ?? defaultRequestTimeoutMs)
    const res = await fetch(new URL(path, endpoint.url), {
      method,
      headers: {
        authorization: `Bearer ${endpoint.token}`,
        ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
      },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      signal: signal != null ? AbortSignal.any([signal, timeout]) : timeout,
    })
    const text = await res.text()
    if (!res.ok)
      throw new ControlApiError(`${method} ${path}: HTTP ${res.status} ${errorMessage(text)}`, res.status)
    if (text === '') return null
    try {
      return JSON.parse(text)
    } catch {
      return text
    }
  }
}

function toControlEvent(message: SseMessage): ControlEvent | null {
  let data: unknown
  try {
    data = JSON.parse(message.data)
  } catch {
    return null
  }
  if (message.event === 'state' && isNodeStatus(data)) return { type: 'state', status: data }
  if (message.event === 'stats' && isNodeStats(data)) return { type: 'stats', stats: data }
  return null
}

function errorMessage(text: string): string {
  try {
    const body = JSON.parse(text) as { error?: { message?: unknown } | string; message?: unknown }
    if (typeof body.error === 'string') return body.error
    if (typeof body.error?.message === 'string') return body.error.message
    if (typeof body.message === 'string') return body.message
  } catch {}
  return text.slice(0, 200)
}
