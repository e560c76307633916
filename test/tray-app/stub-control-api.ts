import { EventEmitter, once } from 'node:events'
import { writeFile } from 'node:fs/promises'
import { createServer, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import type { NodeStatus } from '../../daemon/control/types.ts'

/**
 * A stand-in for the daemon's control API (daemon/control/server.ts): bearer token, GET /status,
 * GET /events (SSE), POST /pause, /resume, /idle. With a dataDir it writes control.token (0600)
 * and control.json as the daemon does.
 */
export interface StubControlApi {
  url: string
  token: string
  status: NodeStatus
  readonly requests: Array<{ method: string; path: string; authorized: boolean; body: unknown }>
  /** Changes the status and sends `event: state` to every subscriber. */
  pushState(status: NodeStatus): void
  pushStats(tokensPerSecond: number): void
  /** Resolves once `n` /events subscriptions have opened since the start. */
  subscribed(n?: number): Promise<void>
  /** Ends every open /events stream (a daemon restart, as the tray sees it). */
  dropSubscribers(): void
  close(): Promise<void>
}

export async function startStubControlApi(options: {
  status: NodeStatus
  dataDir?: string
  token?: string
  pid?: number
  /** Answer POST /idle (default) or 404 like a daemon without the endpoint. */
  idle?: boolean
}): Promise<StubControlApi> {
  const token = options.token ?? 'stub-token-0123456789'
  const subscribers = new Set<ServerResponse>()
  const events = new EventEmitter()
  let subscriptions = 0
  const send = (event: string, data: unknown): void => {
    for (const res of subscribers) res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`)
  }
  const api: StubControlApi = {
    url: '',
    token,
    status: options.status,
    requests: [],
    pushState(status) {
      api.status = status
      send('state', status)
    },
    pushStats(tokensPerSecond) {
      send('stats', { tokensPerSecond, tokensToday: 10, creditsToday: 5, at: new Date().toISOString() })
    },
    async subscribed(n = 1) {
      while (subscriptions < n) await once(events, 'subscribed')
    },
    dropSubscribers() {
      for (const res of subscribers) res.end()
      subscribers.clear()
    },
    async close() {
      api.dropSubscribers()
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    },
  }
  const server = createServer((req, res) => {
    const path = new URL(req.url ?? '/', 'http://x').pathname
    const authorized = req.headers.authorization === `Bearer ${token}`
    let raw = ''
    req.on('data', (c: Buffer) => {
      raw += c.toString()
    })
    req.on('end', () => {
      let body: unknown = null
      try {
        body = raw === '' ? null : JSON.parse(raw)
      } catch {}
      api.requests.push({ method: req.method ?? '', path, authorized, body })
      if (!authorized) {
        res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":"bad token"}')
        return
      }
      const json = (status: number, value: unknown): void => {
        res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(value))
      }
      if (req.method === 'GET' && path === '/status') return json(200, api.status)
      if (req.method === 'GET' && path === '/events') {
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' })
        res.write(': subscribed\n\n')
        subscribers.add(res)
        res.on('close', () => subscribers.delete(res))
        subscriptions++
        events.emit('subscribed')
        return
      }
      if (req.method === 'POST' && path === '/pause') {
        const b = (body ?? {}) as { minutes?: number; until?: string }
        const until =
          b.until ?? (b.minutes != null ? new Date(Date.now() + b.minutes * 60_000).toISOString() : null)
        api.pushState({ ...api.status, state: 'paused', reason: 'paused by you', pausedUntil: until })
        return json(200, api.status)
      }
      if (req.method === 'POST' && path === '/resume') {
        api.pushState({ ...api.status, state: 'serving', reason: null, pausedUntil: null })
        return json(200, api.status)
      }
      if (req.method === 'POST' && path === '/idle' && options.idle !== false) {
        res.writeHead(204).end()
        return
      }
      json(404, { error: { message: `no ${req.method} ${path}` } })
    })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  api.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  if (options.dataDir != null) {
    await writeFile(join(options.dataDir, 'control.token'), `${token}\n`, { mode: 0o600 })
    await writeFile(
      join(options.dataDir, 'control.json'),
      JSON.stringify({ url: api.url, pid: options.pid ?? process.pid }),
    )
  }
  return api
}
