import { createServer, type IncomingHttpHeaders, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  type EngineEndpoint,
  type InferMeshServer,
  type InferRequestEnd,
  serveInferOverMesh,
} from '../../daemon/infer-handler.ts'
import { type InferResponse, sendInferRequest } from '../../mesh/infer-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { TestMesh } from '../helpers/mesh.ts'

async function text(body: AsyncIterable<Uint8Array>): Promise<string> {
  const chunks: Uint8Array[] = []
  for await (const c of body) chunks.push(c)
  return Buffer.concat(chunks).toString()
}

function header(res: InferResponse, name: string): string | undefined {
  return res.headers.find(([k]) => k.toLowerCase() === name)?.[1]
}

function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void
  const promise = new Promise<void>((resolve) => {
    open = resolve
  })
  return { promise, open }
}

async function listen(server: Server): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return (server.address() as AddressInfo).port
}

/** A stand-in for the engine's OpenAI server: records what reached it and answers per path. */
class StandInEngine {
  readonly seen: Array<{ method: string; url: string; headers: IncomingHttpHeaders; body: string }> = []
  readonly secondEvent = gate()
  /** Resolves when a /v1/hang response is closed under the engine (the client left). */
  readonly hangClosed = gate()
  readonly hanging = gate()
  readonly server = createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString()
      this.seen.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers, body })
      void this.answer(req.url ?? '', body, req.headers, res)
    })
  })

  private async answer(
    url: string,
    body: string,
    headers: IncomingHttpHeaders,
    res: ServerResponse,
  ): Promise<void> {
    if (url === '/v1/echo') {
      res.writeHead(200, { 'content-type': 'application/json', 'x-engine': 'stand-in' })
      res.end(JSON.stringify({ headers, body }))
      return
    }
    if (url === '/v1/chat/completions') {
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' })
      res.write('data: {"delta":"Hel"}\n\n')
      await this.secondEvent.promise
      res.write('data: {"delta":"lo"}\n\n')
      res.end('data: [DONE]\n\n')
      return
    }
    if (url === '/v1/hang') {
      res.on('close', () => this.hangClosed.open())
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.write('data: {"delta":"forever"}\n\n')
      this.hanging.open()
      return
    }
    if (url === '/v1/dies') {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.write('data: {"delta":"half"}\n\n', () => res.socket?.destroy())
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end('{"object":"list","data":[]}')
  }
}

describe('serveInferOverMesh', () => {
  const mesh = new TestMesh()
  const engine = new StandInEngine()
  let endpoint: EngineEndpoint | null
  let node: MeshNode
  let head: MeshNode
  let infer: InferMeshServer
  const ended: InferRequestEnd[] = []

  beforeAll(async () => {
    const port = await listen(engine.server)
    mesh.track(async () => {
      engine.server.closeAllConnections()
      await new Promise<void>((resolve) => engine.server.close(() => resolve()))
    })
    endpoint = { baseUrl: `http://127.0.0.1:${port}`, apiKey: 'engine-key' }
    node = await mesh.node([])
    head = await mesh.node([])
    infer = await serveInferOverMesh(node, {
      allowedHeads: () => new Set([head.peerId.toString()]),
      engine: () => endpoint,
      onResponseEnd: (info) => ended.push(info),
    })
    mesh.track(() => infer.stop())
    await head.dial(node.getMultiaddrs()[0]!)
  })
  afterAll(() => mesh.cleanup())

  it("replaces the caller's key with the engine's and drops hop-by-hop headers both ways", async () => {
    const body = '{"model":"tiny","messages":[]}'
    const res = await sendInferRequest(head, node.peerId, {
      method: 'POST',
      path: '/v1/echo',
      headers: [
        ['Authorization', 'Bearer client-key'],
        ['content-type', 'application/json'],
        ['connection', 'keep-alive, x-hop'],
        ['x-hop', 'only for the next hop'],
        ['keep-alive', 'timeout=5'],
        ['transfer-encoding', 'chunked'],
        ['proxy-authorization', 'Basic eA=='],
        ['content-length', '999'],
        ['x-request-id', 'req-42'],
      ],
      body: new TextEncoder().encode(body),
    })
    expect(res.status).toBe(200)
    expect(header(res, 'x-engine')).toBe('stand-in')
    // Node's server adds these for its own socket; they must not travel on.
    expect(header(res, 'connection')).toBeUndefined()
    expect(header(res, 'keep-alive')).toBeUndefined()
    const echo = JSON.parse(await text(res.body)) as { headers: IncomingHttpHeaders; body: string }
    expect(echo.body).toBe(body)
    expect(echo.headers.authorization).toBe('Bearer engine-key')
    expect(echo.headers['content-length']).toBe(String(body.length))
    expect(echo.headers['x-request-id']).toBe('req-42')
    expect(echo.headers['content-type']).toBe('application/json')
    for (const h of ['x-hop', 'keep-alive', 'transfer-encoding', 'proxy-authorization']) {
      expect(echo.headers[h], h).toBeUndefined()
    }
    expect(ended.at(-1)).toMatchObject({ outcome: 'ok', status: 200, path: '/v1/echo', requestId: 'req-42' })
  })

  it('answers 404 and 405 itself, OpenAI-shaped, for what is not GET or POST under /v1/', async () => {
    const hits = engine.seen.length
    const cases: Array<[string, string, number, string]> = [
      ['GET', '/admin', 404, 'not_found'],
      ['POST', '/v1', 404, 'not_found'],
      ['GET', '/v1/../admin', 404, 'not_found'],
      ['GET', '/v1/%2e%2e/admin', 404, 'not_found'],
      ['GET', '/v1/models/..%2F..%2Fadmin', 404, 'not_found'],
      ['DELETE', '/v1/models', 405, 'method_not_allowed'],
      ['PUT', '/v1/chat/completions', 405, 'method_not_allowed'],
    ]
    for (const [method, path, status, code] of cases) {
      const res = await sendInferRequest(head, node.peerId, { method, path, headers: [] })
      expect(res.status, `${method} ${path}`).toBe(status)
      expect(header(res, 'content-type')).toBe('application/json')
      const err = JSON.parse(await text(res.body)) as {
        error: { message: string; type: string; code: string }
      }
      expect(err.error).toMatchObject({ type: 'invalid_request_error', code })
      if (status === 405) expect(header(res, 'allow')).toBe('GET, POST')
    }
    expect(engine.seen.length).toBe(hits)
    expect(ended.at(-1)).toMatchObject({ outcome: 'rejected', status: 405 })

    const models = await sendInferRequest(head, node.peerId, {
      method: 'GET',
      path: '/v1/models',
      headers: [],
    })
    expect(JSON.parse(await text(models.body))).toEqual({ object: 'list', data: [] })
  })

  it('passes server-sent events through as the engine writes them', async () => {
    const res = await sendInferRequest(head, node.peerId, {
      method: 'POST',
      path: '/v1/chat/completions',
      headers: [['content-type', 'application/json']],
      body: new TextEncoder().encode('{"stream":true}'),
    })
    expect(header(res, 'content-type')).toBe('text/event-stream')
    let all = ''
    for await (const chunk of res.body) {
      all += Buffer.from(chunk).toString()
      // The engine writes the rest only once the first event has reached the head.
      engine.secondEvent.open()
    }
    expect(all).toBe('data: {"delta":"Hel"}\n\ndata: {"delta":"lo"}\n\ndata: [DONE]\n\n')
  })

  it('closes the request at the engine when the head aborts', async () => {
    const controller = new AbortController()
    const res = await sendInferRequest(
      head,
      node.peerId,
      { method: 'POST', path: '/v1/hang', headers: [] },
      { signal: controller.signal },
    )
    await engine.hanging.promise
    const iterator = res.body[Symbol.asyncIterator]()
    expect(Buffer.from((await iterator.next()).value as Uint8Array).toString()).toContain('forever')
    expect(infer.activeRequests()).toBe(1)
    controller.abort()
    await engine.hangClosed.promise
    await infer.idle()
    expect(infer.activeRequests()).toBe(0)
    expect(ended.at(-1)).toMatchObject({ outcome: 'cancelled', path: '/v1/hang' })
  })

  it('sends ERROR engine_error when the engine dies mid-response', async () => {
    const res = await sendInferRequest(head, node.peerId, { method: 'POST', path: '/v1/dies', headers: [] })
    const got: string[] = []
    await expect(
      (async () => {
        for await (const c of res.body) got.push(Buffer.from(c).toString())
      })(),
    ).rejects.toMatchObject({ name: 'InferStreamError', code: 'engine_error' })
    expect(got.join('')).toContain('half')
  })

  it('answers ERROR engine_unavailable with no engine or an engine that does not answer', async () => {
    const saved = endpoint
    try {
      endpoint = null
      await expect(
        sendInferRequest(head, node.peerId, { method: 'GET', path: '/v1/models', headers: [] }),
      ).rejects.toMatchObject({ name: 'InferRemoteError', code: 'engine_unavailable' })

      const closed = createServer()
      const port = await listen(closed)
      await new Promise<void>((resolve) => closed.close(() => resolve()))
      endpoint = { baseUrl: `http://127.0.0.1:${port}`, apiKey: 'k' }
      await expect(
        sendInferRequest(head, node.peerId, { method: 'GET', path: '/v1/models', headers: [] }),
      ).rejects.toMatchObject({ name: 'InferRemoteError', code: 'engine_unavailable' })
    } finally {
      endpoint = saved
    }
  })

  it('refuses a head it did not join', async () => {
    const stranger = await mesh.node([])
    await stranger.dial(node.getMultiaddrs()[0]!)
    const hits = engine.seen.length
    const err = await sendInferRequest(stranger, node.peerId, {
      method: 'GET',
      path: '/v1/models',
      headers: [],
    }).then(
      () => null,
      (e: Error) => e,
    )
    expect(err?.name).toMatch(/InferStreamError|InferConnectError/)
    expect(engine.seen.length).toBe(hits)
  })

  it('stops: no new streams are taken', async () => {
    await infer.stop()
    expect(infer.activeRequests()).toBe(0)
    await expect(
      sendInferRequest(head, node.peerId, { method: 'GET', path: '/v1/models', headers: [] }),
    ).rejects.toMatchObject({ name: expect.stringMatching(/InferConnectError|InferStreamError/) })
  })
})
