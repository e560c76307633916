import fc from 'fast-check'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { ApiError } from '../../core/errors.ts'
import { errorCodesOf } from '../../core/errors.ts'
import { inferRequestBodyMaxBytes } from '../../mesh/protocols.ts'
import { prepareUpstreamRequest } from '../../openai/request.ts'
import { TestMesh } from '../helpers/mesh.ts'
import { announceFuzz, deepJson, fuzzParams, fuzzTimeoutMs } from './fuzz.ts'
import {
  authArb,
  bodyArb,
  type HttpAnswer,
  type HttpCase,
  headerValueArb,
  jsonMap,
  methodArb,
  openAiError,
  pathArb,
  send,
  sendRaw,
} from './http.ts'
import {
  engineText,
  engineUsage,
  type FuzzRegion,
  fuzzModel,
  fuzzRegion,
  startFuzzRegion,
} from './region-fixture.ts'

const requestTimeoutMs = 10_000
const encoder = new TextEncoder()

/** What the docs say a front answers: a status, and the error code when it is an error. */
interface Expected {
  status: number
  code?: string
}

/** How node:http hands a header value on: leading and trailing spaces and tabs dropped. */
function received(value: string | undefined): string | undefined {
  return value?.replace(/^[ \t]+|[ \t]+$/g, '')
}

/** POST /v1/chat/completions and /v1/completions, as docs/federation.md and docs/errors.md put it. */
function expectedGeneration(c: HttpCase, kind: 'chat' | 'completion'): Expected {
  const bytes = c.body ?? new Uint8Array()
  if (bytes.byteLength > inferRequestBodyMaxBytes) return { status: 413, code: 'request_too_large' }
  let json: unknown
  try {
    json = JSON.parse(Buffer.from(bytes).toString('utf8'))
  } catch {
    return { status: 400, code: 'invalid_json' }
  }
  let prepared: ReturnType<typeof prepareUpstreamRequest>
  try {
    prepared = prepareUpstreamRequest(json, kind)
  } catch (err) {
    return { status: 400, code: (err as ApiError).code ?? '' }
  }
  if (prepared.model !== fuzzModel) return { status: 404, code: 'model_not_found' }
  if (prepared.stream && !prepared.clientWantsUsage) {
    // The body goes on serialised again; too deep to serialise is refused, not a crash.
    try {
      JSON.stringify(prepared.body)
    } catch {
      return { status: 400, code: 'invalid_value' }
    }
  }
  return { status: 200 }
}

function expectedAtGateway(c: HttpCase, apiKey: string, adminToken: string): Expected {
  const path = c.path.split('?')[0]!
  const auth = received(c.headers.authorization)
  if (path === '/health' && c.method === 'GET') return { status: 200 }
  if (path === '/metrics' && c.method === 'GET') return { status: 200 }
  if (path.startsWith('/admin/')) {
    if (auth !== `Bearer ${adminToken}`) return { status: 401, code: 'unauthorized' }
    if (path === '/admin/keys' && c.method === 'GET') return { status: 200 }
    if (path === '/admin/ledger' && c.method === 'GET') return { status: c.path.includes('?') ? -1 : 200 }
    return { status: 404, code: 'not_found' }
  }
  if (auth !== `Bearer ${apiKey}`) return { status: 401, code: 'invalid_api_key' }
  if (path === '/v1/models')
    return c.method === 'GET' ? { status: 200 } : { status: 405, code: 'method_not_allowed' }
  const kind = path === '/v1/chat/completions' ? 'chat' : path === '/v1/completions' ? 'completion' : null
  if (kind == null) return { status: 404, code: 'not_found' }
  if (c.method !== 'POST') return { status: 405, code: 'method_not_allowed' }
  return expectedGeneration(c, kind)
}

function expectedAtHead(c: HttpCase, token: string): Expected {
  const path = c.path.split('?')[0]!
  if ((path === '/health' || path === '/metrics') && c.method === 'GET') return { status: 200 }
  if (received(c.headers.authorization) !== `Bearer ${token}`) return { status: 401, code: 'invalid_api_key' }
  if (path === '/v1/models' && c.method === 'GET') return { status: 200 }
  const kind = path === '/v1/chat/completions' ? 'chat' : path === '/v1/completions' ? 'completion' : null
  if (kind == null) return { status: 404, code: 'not_found' }
  if (c.method !== 'POST') return { status: 405, code: 'method_not_allowed' }
  return expectedGeneration(c, kind)
}

/** The answer as a client sees it: a registered error, or a well-formed OpenAI success. */
function checkAnswer(c: HttpCase, res: HttpAnswer, want: Expected): void {
  expect(res.status).not.toBe(500)
  if (res.headers['x-request-id'] == null) {
    // Node's HTTP parser refused the request line (a byte past ASCII in the path): no handler ran.
    expect(res.status).toBe(400)
    return
  }
  const answer = `${c.method} ${c.path}: ${res.body.toString('utf8').slice(0, 300)}`
  if (want.status !== -1) expect(res.status, answer).toBe(want.status)
  if (c.method === 'HEAD') return
  if (res.status >= 400) {
    const error = openAiError(res.body)
    expect(error, res.body.toString('utf8').slice(0, 200)).not.toBeNull()
    expect([...errorCodesOf('openai').keys()]).toContain(error!.code)
    expect(errorCodesOf('openai').get(error!.code ?? '')?.status).toBe(res.status)
    if (want.code != null) expect(error!.code).toBe(want.code)
    if (error!.param != null) expect(error!.message).toContain(error!.param)
    return
  }
  const path = c.path.split('?')[0]!
  if (path !== '/v1/chat/completions' && path !== '/v1/completions') return
  const request = JSON.parse(Buffer.from(c.body!).toString('utf8')) as {
    stream?: boolean
    stream_options?: { include_usage?: boolean }
  }
  if (request.stream !== true) {
    const answer = JSON.parse(res.body.toString('utf8')) as { usage: unknown; choices: unknown[] }
    expect(answer.usage).toEqual(engineUsage)
    expect(answer.choices).toHaveLength(1)
    return
  }
  expect(res.headers['content-type']).toMatch(/^text\/event-stream/)
  const events = res.body
    .toString('utf8')
    .split('\n\n')
    .filter((e) => e !== '')
    .map((e) => e.replace(/^data: /, ''))
  expect(events.at(-1)).toBe('[DONE]')
  const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as { choices: unknown[]; usage?: unknown })
  expect(chunks.filter((e) => e.choices.length > 0)).toHaveLength(engineText.length)
  // The usage chunk the head forced on reaches the client only when it asked for it.
  const usage = chunks.filter((e) => e.usage != null)
  expect(usage).toHaveLength(request.stream_options?.include_usage === true ? 1 : 0)
}

const chatBody = jsonMap(
  {
    model: fc.oneof(
      { weight: 4, arbitrary: fc.constant(fuzzModel) },
      fc.constantFrom('', 'no-such-model', 'GARAGE-TINY'),
    ),
    messages: fc.constant([{ role: 'user', content: 'Hello' }]),
    prompt: fc.string({ maxLength: 20 }),
    stream: fc.boolean(),
    stream_options: fc.record({ include_usage: fc.boolean() }, { requiredKeys: [] }),
    max_tokens: fc.integer({ min: 1, max: 64 }),
    max_completion_tokens: fc.integer({ min: 1, max: 64 }),
    n: fc.integer({ min: 1, max: 2 }),
    temperature: fc.double({ min: 0, max: 2, noNaN: true }),
  },
  ['model', 'stream'],
)

/** Fields the engine reads and the fronts pass on as they are: where a deep value gets furthest. */
const bodyFields = ['messages', 'prompt', 'tools', 'metadata']

function requestArb(paths: string[], tokens: () => string[]): fc.Arbitrary<HttpCase> {
  return fc
    .record({
      endpoint: fc.constantFrom('/v1/chat/completions', '/v1/completions'),
      generation: fc.boolean(),
      method: methodArb,
      path: pathArb(paths),
      token: fc.nat(),
      region: fc.option(fc.oneof(fc.constant(fuzzRegion), headerValueArb), { nil: undefined }),
      contentType: fc.option(fc.oneof(fc.constant('application/json'), headerValueArb), { nil: undefined }),
      body: bodyArb(chatBody, bodyFields),
    })
    .chain((r) => {
      const all = tokens()
      return authArb(all[r.token % all.length]!).map((auth): HttpCase => {
        const headers: Record<string, string> = {}
        if (auth != null) headers.authorization = auth
        if (r.region != null) headers['x-garage-region'] = r.region
        if (r.contentType != null) headers['content-type'] = r.contentType
        // Half the runs aim at generation with the right method: the body is what is fuzzed.
        return r.generation
          ? { method: 'POST', path: r.endpoint, headers, body: r.body }
          : { method: r.method, path: r.path, headers, body: r.body }
      })
    })
}

describe('fuzz: the HTTP fronts of a region (federation/gateway.ts, bootstrap/head/head.ts)', {
  timeout: fuzzTimeoutMs,
}, () => {
  const mesh = new TestMesh()
  let region: FuzzRegion

  beforeAll(async () => {
    announceFuzz('region HTTP fronts')
    region = await startFuzzRegion(mesh)
  })
  afterAll(() => mesh.cleanup())

  const gatewayPaths = [
    '/v1/chat/completions',
    '/v1/completions',
    '/v1/models',
    '/v1/embeddings',
    '/health',
    '/metrics',
    '/admin/keys',
    '/admin/ledger',
    '/admin/ledger?since=2026-01-01',
    '/admin/nothing',
    '/',
  ]

  async function stillServing(url: string): Promise<void> {
    const health = await send(
      url,
      { method: 'GET', path: '/health', headers: {}, body: null },
      requestTimeoutMs,
    )
    expect(health.status).toBe(200)
  }

  it('the federation gateway answers any request as documented, never with a 500', async () => {
    const { federation, apiKey } = region
    await fc.assert(
      fc.asyncProperty(
        requestArb(gatewayPaths, () => [apiKey, federation.adminToken]),
        async (c) => {
          const res = await send(federation.url, c, requestTimeoutMs)
          checkAnswer(c, res, expectedAtGateway(c, apiKey, federation.adminToken))
          await stillServing(federation.url)
        },
      ),
      fuzzParams(250, requestTimeoutMs * 2),
    )
  })

  it("the regional head's API answers any request as documented, never with a 500", async () => {
    const { head } = region
    await fc.assert(
      fc.asyncProperty(
        requestArb(
          ['/v1/chat/completions', '/v1/completions', '/v1/models', '/health', '/metrics', '/'],
          () => [head.apiToken],
        ),
        async (c) => {
          const res = await send(head.url, c, requestTimeoutMs)
          checkAnswer(c, res, expectedAtHead(c, head.apiToken))
          await stillServing(head.url)
        },
      ),
      fuzzParams(200, requestTimeoutMs * 2),
    )
  })

  it('refuses a body over 4 MiB, declared or streamed, and takes one of exactly 4 MiB', async () => {
    const { federation, apiKey, head } = region
    const sized = (bytes: number): Uint8Array => {
      const prefix = `{"model":"${fuzzModel}","prompt":"`
      const suffix = '"}'
      return encoder.encode(`${prefix}${'x'.repeat(bytes - prefix.length - suffix.length)}${suffix}`)
    }
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom('gateway', 'head'),
        fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 70_000 })),
        fc.boolean(),
        async (front, over, chunked) => {
          const [url, token] = front === 'gateway' ? [federation.url, apiKey] : [head.url, head.apiToken]
          const c: HttpCase = {
            method: 'POST',
            path: '/v1/completions',
            headers: {
              authorization: `Bearer ${token}`,
              ...(chunked ? { 'transfer-encoding': 'chunked' } : {}),
            },
            body: sized(inferRequestBodyMaxBytes + over),
          }
          const res = await send(url, c, requestTimeoutMs)
          if (over === 0) expect(res.status).toBe(200)
          else {
            expect(res.status).toBe(413)
            expect(openAiError(res.body)?.code).toBe('request_too_large')
            expect(openAiError(res.body)?.message).toContain(String(inferRequestBodyMaxBytes))
          }
        },
      ),
      fuzzParams(12, requestTimeoutMs * 2),
    )
  })

  it('regression: a streamed body nested too deep to serialise again is a 400, not a 500', async () => {
    const { federation, apiKey, head } = region
    const body = encoder.encode(`{"model":"${fuzzModel}","stream":true,"messages":${deepJson(10_000)}}`)
    for (const [url, token] of [
      [federation.url, apiKey],
      [head.url, head.apiToken],
    ] as const) {
      const c: HttpCase = {
        method: 'POST',
        path: '/v1/chat/completions',
        headers: { authorization: `Bearer ${token}` },
        body,
      }
      const res = await send(url, c, requestTimeoutMs)
      expect(res.status).toBe(400)
      expect(openAiError(res.body)).toMatchObject({
        code: 'invalid_value',
        message: expect.stringMatching(/nests too deeply/),
      })
    }
  })

  it('regression: a body cut off mid-chunk or mid-length is a client error, not a 500 in the metrics', async () => {
    const { federation, apiKey, head } = region
    for (const [url, token] of [
      [federation.url, apiKey],
      [head.url, head.apiToken],
    ] as const) {
      const start = `POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${token}\r\n`
      await sendRaw(url, Buffer.from(`${start}Transfer-Encoding: chunked\r\n\r\n:E>Q<Z`), requestTimeoutMs)
      await sendRaw(url, Buffer.from(`${start}Content-Length: 100\r\n\r\n{"model"`), requestTimeoutMs)
      const metrics = await send(
        url,
        { method: 'GET', path: '/metrics', headers: {}, body: null },
        requestTimeoutMs,
      )
      expect(metrics.body.toString('utf8')).not.toMatch(/_requests_total\{[^}]*status="500"/)
    }
  })

  it('answers raw bytes, broken HTTP and lying lengths with a status or a close, never a hang', async () => {
    const { federation, apiKey, head } = region
    const raw = fc
      .record({
        front: fc.constantFrom('gateway', 'head'),
        path: fc.constantFrom('/v1/chat/completions', '/v1/models', '/admin/keys', '/health'),
        kind: fc.constantFrom('bytes', 'length', 'badLength', 'chunked', 'mutated'),
        n: fc.nat(10 * 1024 * 1024),
        junk: fc.uint8Array({ maxLength: 120 }),
        text: fc.string({ maxLength: 40 }),
        badLength: fc.constantFrom('-1', '1e3', '0x10', '99999999999999999999', ' 5', '5, 6', ''),
        at: fc.nat(),
      })
      .map((r) => {
        const token = r.front === 'gateway' ? apiKey : head.apiToken
        const head0 = (extra: string): string =>
          `POST ${r.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${token}\r\nContent-Type: application/json\r\n${extra}\r\n`
        const valid = `${head0('Content-Length: 35\r\n')}{"model":"${fuzzModel}","prompt":"hi"}`
        const bytes =
          r.kind === 'bytes'
            ? r.junk
            : r.kind === 'length'
              ? Buffer.from(`${head0(`Content-Length: ${r.n}\r\n`)}${r.text}`)
              : r.kind === 'badLength'
                ? Buffer.from(`${head0(`Content-Length: ${r.badLength}\r\n`)}{}`)
                : r.kind === 'chunked'
                  ? Buffer.from(`${head0('Transfer-Encoding: chunked\r\n')}${r.text}`)
                  : Buffer.concat([
                      Buffer.from(valid.slice(0, r.at % valid.length)),
                      r.junk,
                      Buffer.from(valid.slice(r.at % valid.length)),
                    ])
        return { url: r.front === 'gateway' ? federation.url : head.url, bytes }
      })
    await fc.assert(
      fc.asyncProperty(raw, async ({ url, bytes }) => {
        const answered = await sendRaw(url, bytes, requestTimeoutMs)
        for (const status of answered) {
          expect(status).not.toBe(500)
          expect([200, 400, 401, 404, 405, 413, 431]).toContain(status)
        }
      }),
      fuzzParams(150, requestTimeoutMs * 2),
    )
    await stillServing(federation.url)
    await stillServing(head.url)
    // A client that sends garbage or leaves early is not a server error, in the metrics either.
    for (const url of [federation.url, head.url]) {
      const metrics = await send(
        url,
        { method: 'GET', path: '/metrics', headers: {}, body: null },
        requestTimeoutMs,
      )
      expect(metrics.body.toString('utf8')).not.toMatch(/_requests_total\{[^}]*status="500"/)
    }
  })
})
