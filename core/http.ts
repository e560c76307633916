import { timingSafeEqual } from 'node:crypto'
import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { type ApiError, apiError, GarageError } from './errors.ts'

/**
 * HTTP pieces every server in Garage shares (the embedded engine, the regional head, the federation,
 * the node's control API, the ops endpoints): listening, bounded bodies, constant-time bearer checks.
 */

/** Could not listen (the port is taken, the address is not this machine's...). */
export class HttpListenError extends GarageError {}

/** Timeouts every Garage server sets: a slow client cannot hold a socket forever. */
export interface ServerTimeouts {
  headersTimeoutMs: number
  /** Time to receive the whole request (not to answer it: answers stream as long as they take). */
  requestTimeoutMs: number
  keepAliveTimeoutMs: number
}

export const defaultServerTimeouts: Readonly<ServerTimeouts> = Object.freeze({
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 30_000,
  keepAliveTimeoutMs: 5_000,
})

/**
 * `http://host:port` of a listening server (IPv6 in brackets). `reachable`: a wildcard address
 * (0.0.0.0, ::) is given as loopback, the URL clients on this machine use.
 */
export function serverUrl(server: Server, options: { reachable?: boolean } = {}): string {
  const addr = server.address() as AddressInfo
  let host = addr.address
  if (options.reachable === true && (host === '0.0.0.0' || host === '::'))
    host = host === '::' ? '::1' : '127.0.0.1'
  return `http://${addr.family === 'IPv6' || host.includes(':') ? `[${host}]` : host}:${addr.port}`
}

/**
 * Sets the timeouts and listens; resolves with the URL. A failure to listen rejects with
 * HttpListenError saying `what` could not listen where.
 */
export async function listen(
  server: Server,
  port: number,
  host: string,
  init: { what?: string; timeouts?: Partial<ServerTimeouts>; reachableUrl?: boolean } = {},
): Promise<string> {
  const t = { ...defaultServerTimeouts, ...init.timeouts }
  server.headersTimeout = t.headersTimeoutMs
  server.requestTimeout = t.requestTimeoutMs
  server.keepAliveTimeout = t.keepAliveTimeoutMs
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(port, host, () => {
        server.off('error', reject)
        resolve()
      })
    })
  } catch (err) {
    const why =
      (err as NodeJS.ErrnoException).code === 'EADDRINUSE'
        ? 'the port is in use; pick another or 0 for any free port'
        : (err as Error).message
    throw new HttpListenError(
      `${init.what ?? 'the server'} cannot listen on ${host}:${port}: ${why}`,
      'HTTP_LISTEN',
      {
        cause: err,
      },
    )
  }
  return serverUrl(server, { reachable: init.reachableUrl === true })
}

/** Closes every connection and stops listening. */
export function closeServer(server: Server): Promise<void> {
  server.closeAllConnections()
  return new Promise<void>((resolve) => server.close(() => resolve()))
}

/** A request header's first value. */
export function header(req: IncomingMessage, name: string): string | undefined {
  const v = req.headers[name]
  return Array.isArray(v) ? v[0] : v
}

/** The path of a request target, without its query. */
export function requestPath(req: IncomingMessage): string {
  return (req.url ?? '/').split('?')[0] ?? '/'
}

export interface ReadBodyOptions {
  /** Extra headers on the 413 (the control API closes the connection). */
  tooLargeHeaders?: Record<string, string>
  /** How the messages name the body ("the request body", "the body"). */
  noun?: string
}

/**
 * Reads a request body of at most maxBytes: 413 `request_too_large` past it (declared or actual),
 * 400 `invalid_json` when the client leaves or breaks the framing mid-body. The body is read on the
 * stream's events: an async iterator costs more than the rest of a small request's parsing.
 */
export function readBody(
  req: IncomingMessage,
  maxBytes: number,
  options: ReadBodyOptions = {},
): Promise<Buffer> {
  const noun = options.noun ?? 'the request body'
  const tooLarge = (message: string): ApiError =>
    apiError(
      'request_too_large',
      message,
      options.tooLargeHeaders ? { headers: options.tooLargeHeaders } : {},
    )
  const declared = Number(req.headers['content-length'] ?? 0)
  if (declared > maxBytes)
    return Promise.reject(tooLarge(`${noun} is ${declared} bytes; the limit is ${maxBytes}`))
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let size = 0
    let settled = false
    const settle = (err: Error | null): void => {
      if (settled) return
      settled = true
      req.off('data', onData)
      req.off('end', onEnd)
      req.off('error', onError)
      req.off('close', onClose)
      if (err != null) reject(err)
      else resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size))
    }
    const onData = (chunk: Buffer): void => {
      size += chunk.byteLength
      if (size > maxBytes) {
        // Left paused and unread: the 413 still goes out.
        req.pause()
        settle(tooLarge(`${noun} is over the ${maxBytes}-byte limit`))
        return
      }
      chunks.push(chunk)
    }
    const cutOff = (why: string): ApiError =>
      apiError('invalid_json', `${noun} ended before it was complete: ${why}`)
    const onEnd = (): void => settle(null)
    // A client that leaves or breaks the HTTP framing mid-body made a bad request: a 400, not a 500.
    const onError = (err: Error): void => settle(cutOff(err.message))
    const onClose = (): void => settle(cutOff('the client closed the connection'))
    if (req.readableEnded) return settle(null)
    if (req.destroyed) return onClose()
    req.on('data', onData)
    req.on('end', onEnd)
    req.on('error', onError)
    req.on('close', onClose)
  })
}

/** JSON.parse of UTF-8 bytes; 400 `invalid_json` when they are not JSON. */
export function parseJson(bytes: Uint8Array, noun = 'the request body'): unknown {
  try {
    return JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8'))
  } catch (err) {
    throw apiError('invalid_json', `${noun} is not valid JSON: ${(err as Error).message}`)
  }
}

/** readBody, parsed as JSON, with the bytes it parsed (a proxy can pass them on instead of serialising again). */
export async function readJsonBodyBytes(
  req: IncomingMessage,
  maxBytes: number,
): Promise<{ json: unknown; bytes: Buffer }> {
  const bytes = await readBody(req, maxBytes)
  return { json: parseJson(bytes), bytes }
}

/** Reads a request body of at most maxBytes as JSON: 413 past it, 400 when not JSON. */
export async function readJsonBody(req: IncomingMessage, maxBytes: number): Promise<unknown> {
  return (await readJsonBodyBytes(req, maxBytes)).json
}

/** True when the Authorization header is `Bearer <key>`; compares in constant time. */
export function bearerMatches(value: string | undefined, key: string): boolean {
  const m = /^Bearer (.+)$/.exec(value ?? '')
  if (m?.[1] == null) return false
  const a = Buffer.from(m[1])
  const b = Buffer.from(key)
  return a.length === b.length && timingSafeEqual(a, b)
}

/** Sends an ApiError in OpenAI's shape; past the head of an answer it can only end it. */
export function sendError(res: ServerResponse, err: ApiError): void {
  if (res.headersSent) {
    res.end()
    return
  }
  res
    .writeHead(err.status, { 'content-type': 'application/json', ...err.headers })
    .end(JSON.stringify(err.body()))
}
