import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { closeServer, listen } from '../core/http.ts'

export type Route = (req: IncomingMessage, res: ServerResponse) => Promise<void> | void

export interface OpsServer {
  server: Server
  url: string
  close(): Promise<void>
}

/**
 * A small HTTP server for operational endpoints (GET only, no request bodies), bound to loopback
 * unless the operator says otherwise.
 */
export async function startOpsServer(
  routes: Record<string, Route>,
  host: string,
  port: number,
): Promise<OpsServer> {
  const server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0] ?? '/'
    const route = routes[path]
    if (route == null) {
      res
        .writeHead(404, { 'content-type': 'application/json' })
        .end(JSON.stringify({ error: `no such endpoint: ${path}` }))
      return
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res
        .writeHead(405, { allow: 'GET, HEAD', 'content-type': 'application/json' })
        .end(JSON.stringify({ error: 'method not allowed' }))
      return
    }
    Promise.resolve(route(req, res)).catch((err: Error) => {
      if (!res.headersSent) res.writeHead(500, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ error: err.message }))
    })
  })
  const url = await listen(server, port, host, {
    what: 'the ops server',
    timeouts: { requestTimeoutMs: 10_000, headersTimeoutMs: 5_000 },
  })
  return {
    server,
    url,
    close: () => closeServer(server),
  }
}
