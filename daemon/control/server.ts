import { randomUUID } from 'node:crypto'
import { constants } from 'node:fs'
import { open, readdir, readFile, rename, rm } from 'node:fs/promises'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { type AddressInfo, isIP } from 'node:net'
import { extname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ApiError, apiError, controlErrorBody, GarageError, internalError } from '../../core/errors.ts'
import { bearerMatches, listen, parseJson, readBody } from '../../core/http.ts'
import { type Logger, silentLogger } from '../../core/logger.ts'
import { loadOrCreateSecret } from '../../core/secret-file.ts'
import { SettingsValidationError, validateSettingsPatch } from './settings.ts'
import type { ControlEvents, ControlTarget } from './types.ts'

/**
 * The node's local control API: what `garage status/pause/resume/settings/logs`, the tray app and
 * the dashboard talk to. Loopback only unless the user allows otherwise; every endpoint but the
 * dashboard's static files needs the bearer token in `<dataDir>/control.token`. docs/control-api.md.
 */

export const controlTokenFileName = 'control.token'
export const controlInfoFileName = 'control.json'

/** Asked to listen beyond loopback without allowRemote. */
export class ControlServerHostError extends GarageError {}

export interface ControlServerOptions {
  /** Holds control.token and control.json. */
  dataDir: string
  /** Default 127.0.0.1. Anything but loopback needs allowRemote. */
  host?: string
  /** Default 0: a free port (control.json tells clients which). */
  port?: number
  /** Listen on a non-loopback address (anyone who can reach it and has the token controls the node). */
  allowRemote?: boolean
  logger?: Logger
  /** Open /events streams at most; more get 429. */
  maxEventStreams?: number
  /** SSE comment lines keep idle streams (and proxies) alive. */
  heartbeatIntervalMs?: number
  /** How long pause, resume and settings changes may take before the API answers 504. */
  operationTimeoutMs?: number
}

export interface ControlServer {
  /** The URL clients on this machine use (loopback even when listening on 0.0.0.0). */
  url: string
  host: string
  port: number
  /** The bearer token every API call needs. */
  token: string
  tokenPath: string
  infoPath: string
  /** Set when the server listens beyond loopback: the warning the CLI prints. */
  warning: string | null
  /** Stops listening, ends open event streams, removes control.json. */
  close(): Promise<void>
}

/** What `<dataDir>/control.json` holds. */
export interface ControlInfo {
  url: string
  pid: number
}

export const maxBodyBytes = 16 * 1024
export const maxLogLines = 1_000
export const defaultLogLines = 100
/** setTimeout cannot wait past ~24.8 days; a week is plenty for a pause. */
export const maxPauseMinutes = 7 * 24 * 60
const maxIdleSeconds = 366 * 86_400
const defaultMaxEventStreams = 16
const defaultHeartbeatIntervalMs = 15_000
const defaultOperationTimeoutMs = 30_000
/** A stream that stops reading is dropped once this much is queued for it. */
const maxQueuedEventBytes = 1024 * 1024

const dashboardDir = fileURLToPath(new URL('./dashboard/', import.meta.url))
const contentTypes: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
}

/** Headers on every answer; the dashboard's pages also get the CSP. */
const baseHeaders = {
  'x-content-type-options': 'nosniff',
  'cache-control': 'no-store',
  'referrer-policy': 'no-referrer',
}
const pageHeaders = {
  ...baseHeaders,
  'content-security-policy':
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'",
  'x-frame-options': 'DENY',
  'cross-origin-opener-policy': 'same-origin',
  'cross-origin-resource-policy': 'same-origin',
}

export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase()
  if (h === 'localhost' || h.endsWith('.localhost')) return true
  if (h === '::1') return true
  if (isIP(h) === 4) return h.startsWith('127.')
  if (h.startsWith('::ffff:') && isIP(h.slice(7)) === 4) return h.slice(7).startsWith('127.')
  return false
}

/** The Host header's name part: `127.0.0.1:8080` → `127.0.0.1`, `[::1]:80` → `::1`. */
function hostName(header: string | undefined): string {
  const h = (header ?? '').trim()
  const m = /^\[([^\]]+)\](?::\d+)?$/.exec(h)
  if (m != null) return m[1] as string
  return h.replace(/:\d+$/, '')
}

async function loadDashboard(): Promise<Map<string, { body: Buffer; type: string }>> {
  const files = new Map<string, { body: Buffer; type: string }>()
  for (const name of await readdir(dashboardDir)) {
    const type = contentTypes[extname(name)]
    if (type != null) files.set(`/${name}`, { body: await readFile(join(dashboardDir, name)), type })
  }
  const index = files.get('/index.html')
  if (index != null) files.set('/', index)
  return files
}

async function writeInfoFile(path: string, info: ControlInfo): Promise<void> {
  const tmp = `${path}.${process.pid}.tmp`
  const handle = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC, 0o600)
  try {
    await handle.writeFile(`${JSON.stringify(info)}\n`)
  } finally {
    await handle.close()
  }
  await rename(tmp, path)
}

/** Reads a JSON body of at most maxBodyBytes; undefined when there is none. */
async function readJson(req: IncomingMessage): Promise<unknown> {
  const bytes = await readBody(req, maxBodyBytes, {
    noun: 'the body',
    tooLargeHeaders: { connection: 'close' },
  })
  if (bytes.toString('utf8').trim() === '') return undefined
  return parseJson(bytes, 'the body')
}

function objectBody(body: unknown, what: string): Record<string, unknown> {
  if (body === undefined) return {}
  if (body == null || typeof body !== 'object' || Array.isArray(body))
    throw apiError('invalid_json', `${what} takes a JSON object, not ${printJson(body)}`)
  return body as Record<string, unknown>
}

/** A parsed body in a message, cut short; JSON.stringify runs out of stack on deep nesting. */
function printJson(value: unknown): string {
  let text: string | undefined
  try {
    text = JSON.stringify(value)
  } catch {
    return 'JSON nested thousands of levels deep'
  }
  if (text === undefined) return String(value)
  return text.length > 60 ? `${text.slice(0, 57)}...` : text
}

/** `{ minutes }`, `{ until }` or `{}` → what ControlTarget.pause takes. */
export function parsePauseRequest(body: unknown, now = new Date()): { minutes?: number; until?: Date } {
  const b = objectBody(body, 'POST /pause')
  for (const key of Object.keys(b))
    if (key !== 'minutes' && key !== 'until')
      throw apiError(
        'unknown_field',
        `POST /pause takes { minutes } or { until }, not ${JSON.stringify(key)}`,
        { param: key },
      )
  if (b.minutes != null && b.until != null)
    throw apiError('invalid_field', 'give minutes or until, not both', { param: 'until' })
  if (b.minutes != null) {
    const m = b.minutes
    if (typeof m !== 'number' || !Number.isFinite(m) || m <= 0 || m > maxPauseMinutes)
      throw apiError(
        'invalid_field',
        `minutes must be a number above 0 and at most ${maxPauseMinutes} (a week), not ${printJson(m)}`,
        { param: 'minutes' },
      )
    return { minutes: m }
  }
  if (b.until != null) {
    const u = b.until
    const at = typeof u === 'string' ? new Date(u) : null
    if (at == null || Number.isNaN(at.getTime()) || !/^\d{4}-\d{2}-\d{2}T/.test(u as string))
      throw apiError(
        'invalid_field',
        `until must be an ISO 8601 time like 2026-11-24T18:00:00Z, not ${printJson(u)}`,
        { param: 'until' },
      )
    if (at.getTime() <= now.getTime())
      throw apiError('invalid_field', `until ${u} is in the past`, { param: 'until' })
    if (at.getTime() - now.getTime() > maxPauseMinutes * 60_000)
      throw apiError('invalid_field', `until ${u} is more than a week away`, { param: 'until' })
    return { until: at }
  }
  return {}
}

/** `{ seconds }`: how long the user has not touched the machine (the tray app reports it). */
export function parseIdleRequest(body: unknown): number {
  const b = objectBody(body, 'POST /idle')
  for (const key of Object.keys(b))
    if (key !== 'seconds')
      throw apiError('unknown_field', `POST /idle takes { seconds }, not ${JSON.stringify(key)}`, {
        param: key,
      })
  const s = b.seconds
  if (typeof s !== 'number' || !Number.isFinite(s) || s < 0 || s > maxIdleSeconds)
    throw apiError(
      'invalid_field',
      `seconds must be a number from 0 to ${maxIdleSeconds}, not ${printJson(s)}`,
      { param: 'seconds' },
    )
  return s
}

/** The request target as a URL; some targets Node accepts are none (`//`, `//[`): no such endpoint. */
function requestUrl(target: string | undefined): URL {
  try {
    return new URL(target ?? '/', 'http://control.invalid')
  } catch {
    throw apiError('not_found', `no such endpoint: ${JSON.stringify(target)}`)
  }
}

function parseLogLines(url: URL): number {
  const text = url.searchParams.get('lines')
  if (text == null) return defaultLogLines
  const n = Number(text)
  if (!/^\d+$/.test(text) || n < 1 || n > maxLogLines)
    throw apiError(
      'invalid_field',
      `lines must be a whole number from 1 to ${maxLogLines}, not ${JSON.stringify(text)}`,
      { param: 'lines' },
    )
  return n
}

function withTimeout<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(apiError('daemon_timeout', `${what} did not finish within ${ms / 1000} s`)),
      ms,
    )
  })
  return Promise.race([work, timeout]).finally(() => clearTimeout(timer))
}

function sendJson(
  res: ServerResponse,
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  res
    .writeHead(status, { ...baseHeaders, 'content-type': 'application/json; charset=utf-8', ...headers })
    .end(`${JSON.stringify(body)}\n`)
}

type Handler = (req: IncomingMessage, res: ServerResponse, url: URL) => Promise<void> | void

/**
 * Starts the control API for `target` and writes `<dataDir>/control.json`. Refuses a non-loopback
 * host unless allowRemote (and then logs a warning and returns it in `warning`).
 */
export async function startControlServer(
  target: ControlTarget,
  options: ControlServerOptions,
): Promise<ControlServer> {
  const host = options.host ?? '127.0.0.1'
  const loopback = isLoopbackHost(host)
  const log = (options.logger ?? silentLogger).child({ component: 'daemon:control' })
  if (!loopback && options.allowRemote !== true)
    throw new ControlServerHostError(
      `the control API listens on loopback only; ${host} is not loopback (allow it explicitly to expose the node's controls to the network)`,
      'CONTROL_HOST_NOT_LOOPBACK',
    )
  const warning = loopback
    ? null
    : `the control API listens on ${host}: anyone who can reach this address and has the token in control.token controls this node`
  if (warning != null) log.warn({ host }, warning)

  const tokenPath = join(options.dataDir, controlTokenFileName)
  const infoPath = join(options.dataDir, controlInfoFileName)
  const token = await loadOrCreateSecret(tokenPath)
  const dashboard = await loadDashboard()
  const maxEventStreams = options.maxEventStreams ?? defaultMaxEventStreams
  const heartbeatIntervalMs = options.heartbeatIntervalMs ?? defaultHeartbeatIntervalMs
  const operationTimeoutMs = options.operationTimeoutMs ?? defaultOperationTimeoutMs
  const eventStreams = new Set<() => void>()

  const runOperation = async <T>(what: string, work: () => Promise<T>): Promise<T> => {
    try {
      return await withTimeout(work(), operationTimeoutMs, what)
    } catch (err) {
      if (err instanceof ApiError) throw err
      if (err instanceof SettingsValidationError) throw settingsError(err)
      if (err instanceof GarageError) throw apiError('conflict', `${what}: ${err.message}`)
      throw err
    }
  }

  const openEventStream: Handler = (req, res) => {
    if (eventStreams.size >= maxEventStreams)
      throw apiError(
        'too_many_event_streams',
        `${eventStreams.size} event streams are open; the limit is ${maxEventStreams}`,
      )
    res.writeHead(200, {
      ...baseHeaders,
      'content-type': 'text/event-stream; charset=utf-8',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
    })
    res.flushHeaders()
    let closed = false
    const write = (text: string): void => {
      if (closed) return
      res.write(text)
      if (res.writableLength > maxQueuedEventBytes) {
        log.warn('an event stream stopped reading; closing it')
        res.destroy()
      }
    }
    const send = (event: keyof ControlEvents, data: unknown): void =>
      write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`)
    const onState = (evt: ControlEvents['state']): void => send('state', evt.detail)
    const onStats = (evt: ControlEvents['stats']): void => send('stats', evt.detail)
    const heartbeat = setInterval(() => write(': heartbeat\n\n'), heartbeatIntervalMs)
    const cleanup = (): void => {
      if (closed) return
      closed = true
      clearInterval(heartbeat)
      target.removeEventListener('state', onState)
      target.removeEventListener('stats', onStats)
      eventStreams.delete(end)
    }
    const end = (): void => {
      cleanup()
      res.end()
    }
    eventStreams.add(end)
    target.addEventListener('state', onState)
    target.addEventListener('stats', onStats)
    req.on('close', cleanup)
    res.on('close', cleanup)
    send('state', target.status())
  }

  const routes: Record<string, Partial<Record<string, Handler>>> = {
    '/status': { GET: (_req, res) => sendJson(res, 200, target.status()) },
    '/events': { GET: openEventStream },
    '/pause': {
      POST: async (req, res) => {
        const request = parsePauseRequest(await readJson(req))
        await runOperation('pause', () => target.pause(request))
        sendJson(res, 200, target.status())
      },
    },
    '/resume': {
      POST: async (req, res) => {
        const body = objectBody(await readJson(req), 'POST /resume')
        const extra = Object.keys(body)[0]
        if (extra != null)
          throw apiError('unknown_field', `POST /resume takes no fields, not ${JSON.stringify(extra)}`, {
            param: extra,
          })
        await runOperation('resume', () => target.resume())
        sendJson(res, 200, target.status())
      },
    },
    '/idle': {
      POST: async (req, res) => {
        target.reportIdle?.(parseIdleRequest(await readJson(req)))
        res.writeHead(204, baseHeaders).end()
      },
    },
    '/settings': {
      GET: (_req, res) => sendJson(res, 200, target.settings()),
      PUT: async (req, res) => {
        const body = await readJson(req)
        let patch: ReturnType<typeof validateSettingsPatch>
        try {
          patch = validateSettingsPatch(body ?? {})
        } catch (err) {
          if (err instanceof SettingsValidationError) throw settingsError(err)
          throw err
        }
        const settings = await runOperation('changing settings', () => target.updateSettings(patch))
        sendJson(res, 200, settings)
      },
    },
    '/logs': {
      GET: (_req, res, url) => sendJson(res, 200, { lines: target.logs(parseLogLines(url)) }),
    },
  }

  const handle = async (req: IncomingMessage, res: ServerResponse, reqLog: Logger): Promise<void> => {
    // A page on another site that rebinds its name to 127.0.0.1 still sends its own name as Host.
    if (loopback && !isLoopbackHost(hostName(req.headers.host)))
      throw apiError('host_not_allowed', `Host ${JSON.stringify(req.headers.host ?? '')} is not loopback`)
    const url = requestUrl(req.url)
    const file = dashboard.get(url.pathname)
    if (file != null) {
      if (req.method !== 'GET' && req.method !== 'HEAD')
        throw apiError('method_not_allowed', `${url.pathname} takes GET`, {
          headers: { allow: 'GET, HEAD' },
        })
      res.writeHead(200, {
        ...pageHeaders,
        'content-type': file.type,
        'content-length': file.body.byteLength,
      })
      res.end(req.method === 'HEAD' ? undefined : file.body)
      return
    }
    if (!bearerMatches(req.headers.authorization, token))
      throw apiError(
        'unauthorized',
        'the control API needs "Authorization: Bearer <token>" with the token in control.token',
        { headers: { 'www-authenticate': 'Bearer realm="garage-control"' } },
      )
    const route = routes[url.pathname]
    if (route == null) throw apiError('not_found', `no such endpoint: ${url.pathname}`)
    const handler = route[req.method ?? 'GET']
    if (handler == null) {
      const allow = Object.keys(route).join(', ')
      throw apiError('method_not_allowed', `${url.pathname} takes ${allow}`, {
        headers: { allow },
      })
    }
    reqLog.debug({ method: req.method, path: url.pathname }, 'control request')
    await handler(req, res, url)
  }

  const server: Server = createServer((req, res) => {
    const id = randomUUID()
    res.setHeader('x-request-id', id)
    const reqLog = log.child({ reqId: id })
    handle(req, res, reqLog).catch((err: unknown) => {
      const httpErr = err instanceof ApiError ? err : internalError(err)
      if (httpErr.status >= 500) reqLog.error({ err: (err as Error).message }, 'control request failed')
      if (res.headersSent) {
        res.destroy()
        return
      }
      sendJson(res, httpErr.status, controlErrorBody(httpErr), httpErr.headers)
    })
  })
  // Clients on this machine reach a wildcard listener through loopback.
  const url = await listen(server, options.port ?? 0, host, {
    what: 'the control API',
    timeouts: { requestTimeoutMs: 10_000, headersTimeoutMs: 5_000 },
    reachableUrl: true,
  })
  const port = (server.address() as AddressInfo).port
  const info: ControlInfo = { url, pid: process.pid }
  try {
    await writeInfoFile(infoPath, info)
  } catch (err) {
    server.close()
    throw new GarageError(`cannot write ${infoPath}: ${(err as Error).message}`, 'CONTROL_INFO_WRITE', {
      cause: err,
    })
  }
  log.info({ url }, 'control API listening')

  let closing: Promise<void> | null = null
  return {
    url,
    host,
    port,
    token,
    tokenPath,
    infoPath,
    warning,
    close: () => {
      closing ??= (async () => {
        for (const end of [...eventStreams]) end()
        await new Promise<void>((resolve) => {
          server.close(() => resolve())
          server.closeAllConnections()
        })
        // Leave a file a newer daemon wrote alone.
        const current = await readFile(infoPath, 'utf8').catch(() => null)
        if (current != null && current.trim() === JSON.stringify(info)) await rm(infoPath, { force: true })
      })()
      return closing
    },
  }
}

function settingsError(err: SettingsValidationError): ApiError {
  const fields: Record<string, string> = {}
  for (const issue of err.issues) fields[issue.field] ??= issue.message
  return apiError(
    err.issues.every((i) => i.unknown === true) ? 'unknown_field' : 'invalid_field',
    err.message,
    { param: err.field, fields },
  )
}
