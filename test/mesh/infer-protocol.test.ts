import { createHash, randomBytes } from 'node:crypto'
import type { PeerId, Stream } from '@libp2p/interface'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { encodeCanonical } from '../../core/cbor.ts'
import {
  encodeInferFrame,
  encodeInferFrames,
  handleInferProtocol,
  type InferReply,
  type InferServerRequest,
  sendInferRequest,
  InferFrameType as T,
} from '../../mesh/infer-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import {
  INFER_PROTOCOL,
  inferFrameMaxBytes,
  inferHeadMaxBytes,
  inferRequestBodyMaxBytes,
} from '../../mesh/protocols.ts'
import { TestMesh } from '../helpers/mesh.ts'

type Handler = (req: InferServerRequest, reply: InferReply, signal: AbortSignal) => Promise<void>

const sha256 = (bytes: Uint8Array): string => createHash('sha256').update(bytes).digest('hex')

async function readAll(body: AsyncIterable<Uint8Array>): Promise<Buffer> {
  const chunks: Uint8Array[] = []
  for await (const c of body) chunks.push(c)
  return Buffer.concat(chunks)
}

/** Reads a raw stream until it ends or is reset; returns what arrived and how it ended. */
async function drain(stream: Stream): Promise<{ bytes: number; error: Error | null }> {
  let bytes = 0
  try {
    for await (const chunk of stream) bytes += chunk.byteLength
    return { bytes, error: null }
  } catch (err) {
    return { bytes, error: err as Error }
  }
}

/** Resolves when `signal` aborts, with its reason. */
function aborted(signal: AbortSignal): Promise<Error> {
  return new Promise((resolve) => {
    if (signal.aborted) resolve(signal.reason as Error)
    else signal.addEventListener('abort', () => resolve(signal.reason as Error), { once: true })
  })
}

function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void
  const promise = new Promise<void>((resolve) => {
    open = resolve
  })
  return { promise, open }
}

function inferStreams(node: MeshNode, peer: PeerId): Stream[] {
  return node.getConnections(peer).flatMap((c) => c.streams.filter((s) => s.protocol === INFER_PROTOCOL))
}

describe('/garage/infer/1.0.0', () => {
  const mesh = new TestMesh()
  let server: MeshNode
  let head: MeshNode
  const handlers = new Map<string, Handler>()
  const rejected: Error[] = []
  const handlerErrors: Error[] = []
  let handled = 0

  beforeAll(async () => {
    server = await mesh.node([])
    head = await mesh.node([])
    const unhandle = await handleInferProtocol(server, {
      allow: (peer) => peer.equals(head.peerId),
      async handle(req, reply, signal) {
        handled++
        const h = handlers.get(req.path)
        if (h == null) return reply.respond(404, [], new TextEncoder().encode('no such path'))
        await h(req, reply, signal)
      },
      onRejected: (_peer, reason) => rejected.push(reason),
      onError: (_peer, err) => handlerErrors.push(err),
    })
    mesh.track(unhandle)
    await head.dial(server.getMultiaddrs()[0]!)
  })
  afterAll(() => mesh.cleanup())

  it('carries method, path, headers and body both ways, the response in several chunks', async () => {
    handlers.set('/v1/echo', async (req, reply) => {
      await reply.head(201, [
        ['x-method', req.method],
        ['x-request-header', req.headers.find(([k]) => k === 'x-client')?.[1] ?? ''],
        ['set-cookie', 'a=1'],
        ['set-cookie', 'b=2'],
      ])
      await reply.data(new TextEncoder().encode('got:'))
      await reply.data(req.body)
      await reply.data(new TextEncoder().encode(':done'))
      await reply.end()
    })
    const res = await sendInferRequest(head, server.peerId, {
      method: 'POST',
      path: '/v1/echo',
      headers: [
        ['x-client', 'héllo'],
        ['content-type', 'application/json'],
      ],
      body: new TextEncoder().encode('{"q":1}'),
    })
    expect(res.status).toBe(201)
    expect(res.headers).toEqual([
      ['x-method', 'POST'],
      ['x-request-header', 'héllo'],
      ['set-cookie', 'a=1'],
      ['set-cookie', 'b=2'],
    ])
    expect((await readAll(res.body)).toString()).toBe('got:{"q":1}:done')
  })

  it('moves a 3 MiB request body and a 3 MiB response intact', async () => {
    const response = randomBytes(3 * 1024 * 1024)
    handlers.set('/v1/big', async (req, reply) => {
      await reply.head(200, [['x-body-sha256', sha256(req.body)]])
      // Uneven pieces, some over one frame: the protocol cuts them.
      for (
        let offset = 0, step = 1;
        offset < response.byteLength;
        offset += step, step = (step * 7 + 1) % 200_000
      ) {
        await reply.data(response.subarray(offset, offset + step))
      }
      await reply.end()
    })
    const body = randomBytes(3 * 1024 * 1024)
    const res = await sendInferRequest(head, server.peerId, {
      method: 'POST',
      path: '/v1/big',
      headers: [],
      body,
    })
    expect(res.headers).toEqual([['x-body-sha256', sha256(body)]])
    expect(sha256(await readAll(res.body))).toBe(sha256(response))
  })

  it('streams: the head sees the first chunk before the node ends the response', async () => {
    const firstSeen = gate()
    handlers.set('/v1/stream', async (_req, reply) => {
      await reply.head(200, [['content-type', 'text/event-stream']])
      await reply.data(new TextEncoder().encode('data: one\n\n'))
      await firstSeen.promise
      await reply.data(new TextEncoder().encode('data: two\n\n'))
      await reply.end()
    })
    const res = await sendInferRequest(head, server.peerId, {
      method: 'GET',
      path: '/v1/stream',
      headers: [],
    })
    const seen: string[] = []
    for await (const chunk of res.body) {
      seen.push(Buffer.from(chunk).toString())
      firstSeen.open()
    }
    expect(seen).toEqual(['data: one\n\n', 'data: two\n\n'])
  })

  it('holds a fast node back while the head reads slowly (bounded buffering)', async () => {
    const total = 32 * 1024 * 1024
    const chunk = new Uint8Array(16 * 1024).fill(7)
    let sent = 0
    let read = 0
    let maxAhead = 0
    let waits = 0
    handlers.set('/v1/flood', async (_req, reply) => {
      await reply.head(200, [])
      while (sent < total) {
        const written = reply.data(chunk).then(() => 'written' as const)
        // A write still pending after a whole event-loop turn is one the stream held back.
        const first = await Promise.race([
          written,
          new Promise<'waiting'>((r) => setImmediate(() => r('waiting'))),
        ])
        if (first === 'waiting') waits++
        await written
        sent += chunk.byteLength
        maxAhead = Math.max(maxAhead, sent - read)
      }
      await reply.end()
    })
    const res = await sendInferRequest(head, server.peerId, { method: 'GET', path: '/v1/flood', headers: [] })
    let n = 0
    for await (const c of res.body) {
      read += c.byteLength
      // A slow reader: one timer turn every 16 chunks, far slower than loopback.
      if (++n % 16 === 0) await new Promise((r) => setTimeout(r, 1))
    }
    expect(read).toBe(total)
    expect(waits).toBeGreaterThan(0)
    // Two capped yamux windows (1 MiB each) and the head's 256 KiB queue, with room to spare; no
    // backpressure would let the node run most of the 32 MiB ahead.
    expect(maxAhead).toBeLessThan(4 * 1024 * 1024)
  })

  it('cancels at the node when the head aborts mid-stream', async () => {
    const nodeSignal = gate()
    let nodeReason: Promise<Error> | null = null
    let resolveLate!: (value: unknown) => void
    const lateWrite = new Promise((resolve) => {
      resolveLate = resolve
    })
    handlers.set('/v1/long', async (_req, reply, signal) => {
      nodeReason = aborted(signal)
      nodeSignal.open()
      await reply.head(200, [])
      await reply.data(new TextEncoder().encode('token '))
      await nodeReason
      resolveLate(await reply.data(new TextEncoder().encode('more')).catch((err: Error) => err))
    })
    const controller = new AbortController()
    const res = await sendInferRequest(
      head,
      server.peerId,
      { method: 'POST', path: '/v1/long', headers: [] },
      { signal: controller.signal },
    )
    await nodeSignal.promise
    const iterator = res.body[Symbol.asyncIterator]()
    expect(Buffer.from((await iterator.next()).value as Uint8Array).toString()).toBe('token ')
    controller.abort()
    await expect(iterator.next()).rejects.toMatchObject({ name: 'AbortError' })
    const reason = await nodeReason!
    expect(reason).toMatchObject({ name: 'InferStreamError', code: 'reset' })
    // Writes after the reset fail with the reason, so a handler stops at its next write.
    expect(await lateWrite).toBe(reason)
  })

  it('cancels at the node when the reader leaves the body early', async () => {
    let nodeReason: Promise<Error> | null = null
    handlers.set('/v1/leave', async (_req, reply, signal) => {
      nodeReason = aborted(signal)
      await reply.head(200, [])
      await reply.data(new TextEncoder().encode('a'))
      await nodeReason
    })
    const res = await sendInferRequest(head, server.peerId, { method: 'GET', path: '/v1/leave', headers: [] })
    for await (const _ of res.body) break
    expect(await nodeReason!).toMatchObject({ name: 'InferStreamError', code: 'reset' })
  })

  it('passes a node ERROR mid-body to the reader, and one before the head to the caller', async () => {
    handlers.set('/v1/dies', async (_req, reply) => {
      await reply.head(200, [])
      await reply.data(new TextEncoder().encode('partial'))
      await reply.error('engine_error', 'the engine died')
    })
    const res = await sendInferRequest(head, server.peerId, { method: 'POST', path: '/v1/dies', headers: [] })
    const got: string[] = []
    const err = await (async () => {
      try {
        for await (const c of res.body) got.push(Buffer.from(c).toString())
      } catch (e) {
        return e
      }
    })()
    expect(got).toEqual(['partial'])
    expect(err).toMatchObject({ name: 'InferStreamError', code: 'engine_error', message: 'the engine died' })

    handlers.set('/v1/unavailable', (_req, reply) => reply.error('engine_unavailable', 'no engine'))
    await expect(
      sendInferRequest(head, server.peerId, { method: 'POST', path: '/v1/unavailable', headers: [] }),
    ).rejects.toMatchObject({ name: 'InferRemoteError', code: 'engine_unavailable' })

    handlers.set('/v1/throws', () => Promise.reject(new Error('handler bug')))
    await expect(
      sendInferRequest(head, server.peerId, { method: 'POST', path: '/v1/throws', headers: [] }),
    ).rejects.toMatchObject({ name: 'InferRemoteError', code: 'internal_error' })
    expect(handlerErrors.map((e) => e.message)).toContain('handler bug')
  })

  it('times out waiting for the response head, and between frames, with named errors', async () => {
    let firstByteReason: Promise<Error> | null = null
    handlers.set('/v1/silent', async (_req, _reply, signal) => {
      firstByteReason = aborted(signal)
      await firstByteReason
    })
    const started = Date.now()
    await expect(
      sendInferRequest(
        head,
        server.peerId,
        { method: 'POST', path: '/v1/silent', headers: [] },
        { firstByteTimeoutMs: 200 },
      ),
    ).rejects.toMatchObject({ name: 'InferFirstByteTimeoutError' })
    expect(Date.now() - started).toBeLessThan(3_000)
    expect(await firstByteReason!).toMatchObject({ code: 'reset' })

    let idleReason: Promise<Error> | null = null
    handlers.set('/v1/stalls', async (_req, reply, signal) => {
      idleReason = aborted(signal)
      await reply.head(200, [])
      await reply.data(new TextEncoder().encode('a'))
      await idleReason
    })
    const res = await sendInferRequest(
      head,
      server.peerId,
      { method: 'POST', path: '/v1/stalls', headers: [] },
      { idleTimeoutMs: 200 },
    )
    await expect(readAll(res.body)).rejects.toMatchObject({ name: 'InferStreamError', code: 'idle_timeout' })
    expect(await idleReason!).toMatchObject({ code: 'reset' })
  })

  it('keeps a finished stream for the next request to the same node', async () => {
    handlers.set('/v1/ping', (_req, reply) => reply.respond(200, [], new TextEncoder().encode('pong')))
    const before = new Set(inferStreams(head, server.peerId).map((s) => s.id))
    for (let i = 0; i < 5; i++) {
      const res = await sendInferRequest(head, server.peerId, {
        method: 'GET',
        path: '/v1/ping',
        headers: [],
      })
      expect((await readAll(res.body)).toString()).toBe('pong')
    }
    const opened = inferStreams(head, server.peerId).filter((s) => !before.has(s.id))
    // Either an idle stream from an earlier test carried all five, or the first ping opened one for all.
    expect(opened.length).toBeLessThanOrEqual(1)
    expect(inferStreams(head, server.peerId).length).toBeGreaterThanOrEqual(1)
  })

  it('resets a peer that is not allowed before its handler runs', async () => {
    const stranger = await mesh.node([])
    await stranger.dial(server.getMultiaddrs()[0]!)
    const before = handled
    const err = await sendInferRequest(stranger, server.peerId, {
      method: 'GET',
      path: '/v1/ping',
      headers: [],
    }).then(
      () => null,
      (e: Error) => e,
    )
    expect(err?.name).toMatch(/InferStreamError|InferConnectError/)
    expect(handled).toBe(before)
    expect(rejected.at(-1)?.name).toBe('InferPeerNotAllowedError')
  })

  it('resets streams that break the frame grammar, and keeps serving', async () => {
    const before = handled
    const rejectedBefore = rejected.length
    const validHead = encodeCanonical({ method: 'POST', path: '/v1/ping', headers: [] })
    const cases: Record<string, Uint8Array[]> = {
      garbage: [new Uint8Array([0x05, 0xff, 0xfe, 0xfd, 0xfc, 0xfb])],
      'unknown frame type': [encodeInferFrame(0x09, new Uint8Array([1, 2, 3]))],
      'oversized head': [
        new Uint8Array([...varint(inferHeadMaxBytes + 2), T.RequestHead]),
        new Uint8Array(4096),
      ],
      'oversized frame': [new Uint8Array([0xff, 0xff, 0x7f, T.Data])],
      'length prefix too long': [new Uint8Array([0x80, 0x80, 0x80, 0x80, 0x01])],
      'empty frame': [new Uint8Array([0x00])],
      'DATA before REQUEST_HEAD': [encodeInferFrame(T.Data, new Uint8Array([1]))],
      'END before REQUEST_HEAD': [encodeInferFrame(T.End)],
      'bad CBOR head': [encodeInferFrame(T.RequestHead, new Uint8Array([0xff, 0x00]))],
      'head missing fields': [encodeInferFrame(T.RequestHead, encodeCanonical({ method: 'GET' }))],
      'head with a CRLF in a header': [
        encodeInferFrame(
          T.RequestHead,
          encodeCanonical({ method: 'GET', path: '/v1/ping', headers: [['x', 'a\r\nb: c']] }),
        ),
      ],
      'END with a payload': [
        encodeInferFrames([
          [T.RequestHead, validHead],
          [T.End, new Uint8Array([1])],
        ]),
      ],
      'RESPONSE_HEAD from the head': [
        encodeInferFrame(T.ResponseHead, encodeCanonical({ status: 200, headers: [] })),
      ],
      'a second REQUEST_HEAD': [
        encodeInferFrames([
          [T.RequestHead, validHead],
          [T.RequestHead, validHead],
        ]),
      ],
    }
    for (const [name, frames] of Object.entries(cases)) {
      const stream = await head.dialProtocol(server.peerId, INFER_PROTOCOL)
      for (const f of frames) stream.send(f)
      const result = await drain(stream)
      expect(result.bytes, name).toBe(0)
      expect(stream.status, name).toBe('reset')
    }

    // A body one byte over the limit, in full frames: reset when the frame that crosses it arrives.
    const big = await head.dialProtocol(server.peerId, INFER_PROTOCOL)
    const frame = encodeInferFrame(T.Data, new Uint8Array(inferFrameMaxBytes))
    const overLimit = [
      encodeInferFrame(T.RequestHead, validHead),
      ...Array.from({ length: inferRequestBodyMaxBytes / inferFrameMaxBytes }, () => frame),
      encodeInferFrame(T.Data, new Uint8Array(1)),
    ]
    try {
      for (const f of overLimit) if (!big.send(f)) await big.onDrain()
    } catch {
      // the node reset it while we were still sending: what we want
    }
    expect((await drain(big)).bytes).toBe(0)
    expect(big.status).toBe('reset')

    expect(handled).toBe(before)
    expect(rejected.length - rejectedBefore).toBe(Object.keys(cases).length + 1)
    expect(rejected.slice(rejectedBefore).every((e) => e.name === 'InferProtocolError')).toBe(true)

    const res = await sendInferRequest(head, server.peerId, { method: 'GET', path: '/v1/ping', headers: [] })
    expect((await readAll(res.body)).toString()).toBe('pong')
  })

  it('refuses a request it cannot send before dialling', async () => {
    const bad = [
      { method: 'get', path: '/v1/x', headers: [] },
      { method: 'GET', path: 'v1/x', headers: [] },
      { method: 'GET', path: '/v1/x y', headers: [] },
      { method: 'GET', path: '/v1/x', headers: [['bad name', 'v']] as Array<[string, string]> },
      { method: 'POST', path: '/v1/x', headers: [], body: new Uint8Array(inferRequestBodyMaxBytes + 1) },
    ]
    for (const request of bad) {
      await expect(sendInferRequest(head, server.peerId, request), request.path).rejects.toMatchObject({
        name: 'InferRequestInvalidError',
      })
    }
  })
})

describe('/garage/infer/1.0.0 from a misbehaving node', () => {
  const mesh = new TestMesh()
  let node: MeshNode
  let head: MeshNode
  /** What the fake node answers to each path, as raw frames, then whether it resets or closes. */
  const scripts = new Map<string, { frames: Uint8Array[]; after: 'close' | 'wait' }>()

  beforeAll(async () => {
    node = await mesh.node([])
    head = await mesh.node([])
    await node.handle(
      INFER_PROTOCOL,
      (stream) => {
        let seen = Buffer.alloc(0)
        stream.addEventListener('message', (evt) => {
          seen = Buffer.concat([seen, evt.data.subarray()])
          // The request ends with END (0x01 0x03); the path is in the head's CBOR.
          if (seen.at(-2) !== 0x01 || seen.at(-1) !== T.End) return
          const script = [...scripts.entries()].find(([p]) => seen.includes(p))?.[1]
          if (script == null) return
          for (const f of script.frames) stream.send(f)
          if (script.after === 'close') void stream.close()
        })
      },
      { runOnLimitedConnection: true },
    )
    await head.dial(node.getMultiaddrs()[0]!)
  })
  afterAll(() => mesh.cleanup())

  const responseHead = encodeCanonical({ status: 200, headers: [] })

  it('rejects a response that breaks the grammar before its head', async () => {
    scripts.set('/v1/data-first', { frames: [encodeInferFrame(T.Data, new Uint8Array([1]))], after: 'wait' })
    scripts.set('/v1/bad-head', {
      frames: [encodeInferFrame(T.ResponseHead, new Uint8Array([0xa1]))],
      after: 'wait',
    })
    scripts.set('/v1/bad-status', {
      frames: [encodeInferFrame(T.ResponseHead, encodeCanonical({ status: 99, headers: [] }))],
      after: 'wait',
    })
    for (const path of ['/v1/data-first', '/v1/bad-head', '/v1/bad-status']) {
      await expect(
        sendInferRequest(head, node.peerId, { method: 'GET', path, headers: [] }),
        path,
      ).rejects.toMatchObject({ name: 'InferProtocolError' })
    }
    scripts.set('/v1/closes', { frames: [], after: 'close' })
    await expect(
      sendInferRequest(head, node.peerId, { method: 'GET', path: '/v1/closes', headers: [] }),
    ).rejects.toMatchObject({ name: 'InferStreamError', code: 'truncated' })
  })

  it('fails the body on a bad frame or a close before END', async () => {
    scripts.set('/v1/unknown-mid-body', {
      frames: [encodeInferFrames([[T.ResponseHead, responseHead], [T.Data, new Uint8Array([1])], [0x0a]])],
      after: 'wait',
    })
    scripts.set('/v1/truncated', {
      frames: [
        encodeInferFrames([
          [T.ResponseHead, responseHead],
          [T.Data, new Uint8Array([1])],
        ]),
      ],
      after: 'close',
    })
    for (const [path, code] of [
      ['/v1/unknown-mid-body', 'protocol_error'],
      ['/v1/truncated', 'truncated'],
    ] as const) {
      const res = await sendInferRequest(head, node.peerId, { method: 'GET', path, headers: [] })
      await expect(readAll(res.body), path).rejects.toMatchObject({ name: 'InferStreamError', code })
    }
  })
})

describe('/garage/infer/1.0.0 idle streams at the node', () => {
  const mesh = new TestMesh()
  afterAll(() => mesh.cleanup())

  it('closes a stream that carries no request, and the head then opens a new one', async () => {
    const node = await mesh.node([])
    const head = await mesh.node([])
    const rejected: Error[] = []
    mesh.track(
      await handleInferProtocol(node, {
        allow: () => true,
        handle: (_req, reply) => reply.respond(200, [], new TextEncoder().encode('ok')),
        onRejected: (_p, e) => rejected.push(e),
        idleTimeoutMs: 300,
      }),
    )
    await head.dial(node.getMultiaddrs()[0]!)

    // A peer that opens a stream and never speaks: closed, not left open.
    const silent = await head.dialProtocol(node.peerId, INFER_PROTOCOL)
    const started = Date.now()
    expect(await drain(silent)).toEqual({ bytes: 0, error: null })
    expect(Date.now() - started).toBeLessThan(5_000)
    await silent.close()

    // A stream that stalls in the middle of a request is reset.
    const stalled = await head.dialProtocol(node.peerId, INFER_PROTOCOL)
    stalled.send(new Uint8Array([0x05]))
    await drain(stalled)
    expect(stalled.status).toBe('reset')
    expect(rejected.at(-1)).toMatchObject({ name: 'InferStreamError', code: 'idle_timeout' })

    // A kept-alive stream the node closes leaves the head's pool; the next request opens another.
    const first = await sendInferRequest(head, node.peerId, { method: 'GET', path: '/v1/a', headers: [] })
    expect((await readAll(first.body)).toString()).toBe('ok')
    const [kept] = inferStreams(head, node.peerId)
    expect(kept).toBeDefined()
    await new Promise((resolve) => kept!.addEventListener('close', resolve, { once: true }))
    const second = await sendInferRequest(head, node.peerId, { method: 'GET', path: '/v1/b', headers: [] })
    expect((await readAll(second.body)).toString()).toBe('ok')
  })
})

function varint(n: number): number[] {
  const out: number[] = []
  while (n >= 0x80) {
    out.push((n & 0x7f) | 0x80)
    n >>>= 7
  }
  out.push(n)
  return out
}
