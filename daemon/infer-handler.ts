import { randomUUID } from 'node:crypto'
import http, { type IncomingMessage, type OutgoingHttpHeaders } from 'node:http'
import https from 'node:https'
import type { PeerId } from '@libp2p/interface'
import { type ApiError, apiError } from '../core/errors.ts'
import { type Logger, silentLogger } from '../core/logger.ts'
import { handleInferProtocol, type InferReply, type InferServerRequest } from '../mesh/infer-protocol.ts'
import type { MeshNode } from '../mesh/node.ts'
import {
  LeaseSlots,
  type TicketClaims,
  TicketError,
  type TicketVerifier,
  ticketHeader,
} from '../mesh/ticket.ts'

/**
 * The node's end of /garage/infer/1.0.0: each request from the head this node joined is passed to the
 * local engine's OpenAI server (with the engine's own key) and its response streamed back.
 */

export interface EngineEndpoint {
  /** e.g. http://127.0.0.1:41234, no trailing slash */
  baseUrl: string
  apiKey: string
}

export type InferOutcome = 'ok' | 'rejected' | 'engine_unavailable' | 'engine_error' | 'cancelled'

export interface InferRequestInfo {
  requestId: string
  /** PeerId of the head that sent it. */
  peer: string
  method: string
  path: string
}

export interface InferRequestEnd extends InferRequestInfo {
  outcome: InferOutcome
  /** The status sent to the head; null when no response head went out. */
  status: number | null
  responseBytes: number
  durationMs: number
}

export interface InferForwardingOptions {
  /** PeerId strings of the heads this node joined; read per stream. */
  allowedHeads: () => ReadonlySet<string>
  /**
   * The direct path's ticket check (mesh/ticket.ts): a peer other than the head may send requests
   * that carry a valid ticket from it. Null (or absent): only the head may.
   */
  tickets?: () => TicketVerifier | null
  /** The engine serving now; null answers ERROR `engine_unavailable`. */
  engine: () => EngineEndpoint | null
  logger?: Logger
  onRequest?: (info: InferRequestInfo) => void
  onResponseEnd?: (info: InferRequestEnd) => void
}

export interface InferMeshServer {
  /** Requests being served now (for drain). */
  activeRequests(): number
  /** Resolves when no request is being served. */
  idle(): Promise<void>
  /** Stops taking streams, resets those still open (the engine's requests are cancelled) and closes idle sockets. */
  stop(): Promise<void>
}

const forwardedMethods = new Set(['GET', 'POST'])
/** RFC 9110 §7.6.1 connection-specific fields, plus what this hop sets itself. */
const hopByHop = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
])
const setByThisHop = new Set(['host', 'authorization', 'content-length', 'expect', ticketHeader])
/** Encoded dots, slashes and backslashes would let `/v1/%2e%2e/admin` leave /v1/ at the engine. */
const escapingPath = /%2e|%2f|%5c|\\/i

/** 404 or 405 for what this node never forwards; null when the engine may see it. */
export function refuseRoute(method: string, path: string): ApiError | null {
  const pathname = path.split('?', 1)[0]!
  const segments = pathname.split('/')
  if (
    !pathname.startsWith('/v1/') ||
    escapingPath.test(pathname) ||
    segments.some((s) => s === '.' || s === '..')
  ) {
    return apiError('not_found', `this node serves only the OpenAI API under /v1/, not ${pathname}`)
  }
  if (!forwardedMethods.has(method)) {
    return apiError('method_not_allowed', `method ${method} is not allowed; use GET or POST`, {
      headers: { allow: 'GET, POST' },
    })
  }
  return null
}

function connectionTokens(headers: Array<[string, string]>): Set<string> {
  const tokens = new Set<string>()
  for (const [name, value] of headers) {
    if (name.toLowerCase() !== 'connection') continue
    for (const t of value.split(',')) tokens.add(t.trim().toLowerCase())
  }
  return tokens
}

/** The head's headers minus hop-by-hop ones, with the engine's key and the body's length. */
export function engineRequestHeaders(
  headers: Array<[string, string]>,
  apiKey: string,
  bodyBytes: number,
): OutgoingHttpHeaders {
  const named = connectionTokens(headers)
  const out: Record<string, string | string[]> = {}
  for (const [name, value] of headers) {
    const lower = name.toLowerCase()
    if (hopByHop.has(lower) || setByThisHop.has(lower) || named.has(lower)) continue
    const prior = out[lower]
    out[lower] = prior == null ? value : Array.isArray(prior) ? [...prior, value] : [prior, value]
  }
  out.authorization = `Bearer ${apiKey}`
  if (bodyBytes > 0) out['content-length'] = String(bodyBytes)
  return out
}

/** The engine's response headers (names as sent, repeats kept) minus hop-by-hop ones. */
export function headResponseHeaders(rawHeaders: string[]): Array<[string, string]> {
  const pairs: Array<[string, string]> = []
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) pairs.push([rawHeaders[i]!, rawHeaders[i + 1]!])
  const named = connectionTokens(pairs)
  return pairs.filter(([name]) => {
    const lower = name.toLowerCase()
    return !hopByHop.has(lower) && !named.has(lower)
  })
}

async function replyApiError(reply: InferReply, err: ApiError): Promise<void> {
  const headers: Array<[string, string]> = [
    ['content-type', 'application/json'],
    ...Object.entries(err.headers),
  ]
  await reply.respond(err.status, headers, Buffer.from(JSON.stringify(err.body())))
}

class EngineUnreachableError extends Error {
  override name = 'EngineUnreachableError'
}

/**
 * Serves /garage/infer/1.0.0 for the heads in `allowedHeads()`, forwarding to `engine()` over a
 * keep-alive agent. Only GET and POST under /v1/ reach the engine.
 */
export async function serveInferOverMesh(
  node: MeshNode,
  options: InferForwardingOptions,
): Promise<InferMeshServer> {
  const log = (options.logger ?? silentLogger).child({ component: 'daemon:infer' })
  // Sockets to the engine stay open between requests: no TCP handshake per request.
  const agentOptions = {
    keepAlive: true,
    keepAliveMsecs: 10_000,
    maxFreeSockets: 64,
    scheduling: 'lifo' as const,
  }
  const httpAgent = new http.Agent(agentOptions)
  const httpsAgent = new https.Agent(agentOptions)
  const urls = new Map<string, URL>()
  const leases = new LeaseSlots()
  let active = 0
  let idleWaiters: Array<() => void> = []

  const engineUrl = (baseUrl: string): URL => {
    let url = urls.get(baseUrl)
    if (url == null) {
      url = new URL(baseUrl)
      if (url.protocol !== 'http:' && url.protocol !== 'https:') {
        throw new EngineUnreachableError(`engine URL ${baseUrl} is not http(s)`)
      }
      if (urls.size > 16) urls.clear()
      urls.set(baseUrl, url)
    }
    return url
  }

  const requestEngine = (
    engine: EngineEndpoint,
    request: InferServerRequest,
    signal: AbortSignal,
  ): Promise<IncomingMessage> => {
    const url = engineUrl(engine.baseUrl)
    const secure = url.protocol === 'https:'
    const prefix = url.pathname.endsWith('/') ? url.pathname.slice(0, -1) : url.pathname
    return new Promise((resolve, reject) => {
      signal.throwIfAborted()
      const req = (secure ? https : http).request({
        protocol: url.protocol,
        hostname: url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname,
        port: url.port === '' ? undefined : Number(url.port),
        method: request.method,
        path: `${prefix}${request.path}`,
        headers: engineRequestHeaders(request.headers, engine.apiKey, request.body.byteLength),
        agent: secure ? httpsAgent : httpAgent,
      })
      // Aborting destroys the socket: the engine sees the client leave and stops generating. (A
      // listener of our own: http's `signal` option costs more than the rest of this request.)
      const onAbort = (): void => {
        req.destroy(signal.reason as Error)
      }
      signal.addEventListener('abort', onAbort, { once: true })
      req.once('close', () => signal.removeEventListener('abort', onAbort))
      req.once('response', resolve)
      req.once('error', reject)
      req.end(request.body.byteLength > 0 ? request.body : undefined)
    })
  }

  const serve = async (
    request: InferServerRequest,
    reply: InferReply,
    signal: AbortSignal,
    peer: PeerId,
  ): Promise<void> => {
    const started = performance.now()
    const requestId = request.headers.find(([k]) => k.toLowerCase() === 'x-request-id')?.[1] ?? randomUUID()
    const info: InferRequestInfo = {
      requestId,
      peer: peer.toString(),
      method: request.method,
      path: request.path,
    }
    let outcome: InferOutcome = 'engine_error'
    let status: number | null = null
    let responseBytes = 0
    let res: IncomingMessage | null = null
    let lease: TicketClaims | null = null
    active++
    options.onRequest?.(info)
    try {
      if (!options.allowedHeads().has(info.peer)) {
        // Not from the head: the head's ticket says it routed this peer here.
        const tickets = options.tickets?.() ?? null
        if (tickets == null) {
          await reply.error('ticket_invalid', 'this node takes requests from its head only right now')
          outcome = 'rejected'
          return
        }
        let claims: TicketClaims
        try {
          claims = tickets.check(
            request.headers.find(([k]) => k.toLowerCase() === ticketHeader)?.[1],
            info.peer,
          )
        } catch (err) {
          if (!(err instanceof TicketError)) throw err
          log.debug({ requestId, peer: info.peer, problem: err.problem }, 'ticket refused')
          await reply.error('ticket_invalid', err.message)
          outcome = 'rejected'
          return
        }
        if (!leases.take(claims)) {
          await reply.error('lease_full', `the lease's ${claims.slots} slots are all in use`)
          outcome = 'rejected'
          return
        }
        lease = claims
      }
      const refusal = refuseRoute(request.method, request.path)
      if (refusal != null) {
        status = refusal.status
        await replyApiError(reply, refusal)
        outcome = 'rejected'
        return
      }
      const engine = options.engine()
      if (engine == null) {
        await reply.error('engine_unavailable', 'no engine is serving on this node right now')
        outcome = 'engine_unavailable'
        return
      }
      try {
        res = await requestEngine(engine, request, signal)
      } catch (err) {
        if (signal.aborted) throw err
        log.warn({ requestId, err: (err as Error).message }, 'engine unreachable')
        await reply.error('engine_unavailable', `the engine did not answer: ${(err as Error).message}`)
        outcome = 'engine_unavailable'
        return
      }
      status = res.statusCode ?? 502
      const headers = headResponseHeaders(res.rawHeaders)
      // What came in with the head leaves with it: a short JSON answer is one write, not three.
      const first = res.read() as Buffer | null
      responseBytes += first?.byteLength ?? 0
      if (res.complete && res.readableLength === 0) {
        res.resume()
        await reply.respond(status, headers, first ?? undefined)
        outcome = 'ok'
        return
      }
      await reply.head(status, headers, first ?? undefined)
      try {
        for await (const chunk of res as AsyncIterable<Buffer>) {
          responseBytes += chunk.byteLength
          await reply.data(chunk)
        }
      } catch (err) {
        if (signal.aborted) throw err
        log.warn({ requestId, err: (err as Error).message, responseBytes }, 'engine response failed mid-body')
        await reply.error('engine_error', `the engine failed mid-response: ${(err as Error).message}`)
        outcome = 'engine_error'
        return
      }
      await reply.end()
      outcome = 'ok'
    } catch (err) {
      if (signal.aborted) {
        outcome = 'cancelled'
        log.debug({ requestId, reason: (signal.reason as Error).message }, 'request cancelled')
        return
      }
      throw err
    } finally {
      // A response left half read would hold its socket; destroying it also tells the engine to stop.
      if (res != null && !res.complete) res.destroy()
      if (lease != null) leases.give(lease)
      active--
      if (active === 0) {
        const waiters = idleWaiters
        idleWaiters = []
        for (const w of waiters) w()
      }
      options.onResponseEnd?.({
        ...info,
        outcome,
        status,
        responseBytes,
        durationMs: performance.now() - started,
      })
    }
  }

  let unhandle: () => Promise<void>
  try {
    unhandle = await handleInferProtocol(node, {
      // Streams from others are taken while the direct path is on; each request's ticket is checked.
      allow: (peer) => options.allowedHeads().has(peer.toString()) || options.tickets?.() != null,
      handle: serve,
      onRejected(peer, reason) {
        log.debug({ peer: peer.toString(), err: reason.message, name: reason.name }, 'infer stream refused')
      },
      onError(peer, err) {
        log.warn({ peer: peer.toString(), err: err.message }, 'infer handler failed')
      },
    })
  } catch (err) {
    httpAgent.destroy()
    httpsAgent.destroy()
    throw err
  }

  const idle = (): Promise<void> =>
    active === 0 ? Promise.resolve() : new Promise<void>((resolve) => idleWaiters.push(resolve))

  let stopped: Promise<void> | null = null
  return {
    activeRequests: () => active,
    idle,
    stop() {
      stopped ??= (async () => {
        await unhandle()
        await idle()
        httpAgent.destroy()
        httpsAgent.destroy()
      })()
      return stopped
    },
  }
}
