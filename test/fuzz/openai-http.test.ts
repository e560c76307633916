import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import fc from 'fast-check'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ApiError } from '../../core/errors.ts'
import { bearerMatches, readJsonBody } from '../../core/http.ts'
import { announceFuzz, deepJson, fuzzParams, fuzzTimeoutMs } from './fuzz.ts'
import { headerValueArb, send } from './http.ts'

const requestTimeoutMs = 5_000
/** Small, so a body past it costs nothing to send. */
const maxBytes = 4096

describe('fuzz: bearer tokens (core/http.ts bearerMatches)', { timeout: fuzzTimeoutMs }, () => {
  beforeAll(() => announceFuzz('bearer tokens'))
  const token = fc.stringMatching(/^[A-Za-z0-9_-]{1,64}$/)

  it('matches exactly "Bearer <key>" for the tokens Garage makes and any header a client sends', () => {
    const header = (key: string) =>
      fc.oneof(
        fc.constant(`Bearer ${key}`),
        headerValueArb,
        headerValueArb.map((v) => `Bearer ${v}`),
        fc.constantFrom(
          `bearer ${key}`,
          `Bearer  ${key}`,
          `Bearer ${key} `,
          `Bearer ${key}\n`,
          `Basic ${key}`,
          key,
        ),
        fc.nat(key.length).map((n) => `Bearer ${key.slice(0, n)}`),
      )
    fc.assert(
      fc.property(
        token.chain((key) => fc.tuple(fc.constant(key), header(key))),
        ([key, h]) => {
          expect(bearerMatches(h, key)).toBe(h === `Bearer ${key}`)
        },
      ),
      fuzzParams(3_000),
    )
    expect(bearerMatches(undefined, 'x')).toBe(false)
  })

  it('never throws, whatever the strings (lone surrogates included)', () => {
    fc.assert(
      fc.property(
        fc.option(fc.string({ unit: 'binary' }), { nil: undefined }),
        fc.string({ unit: 'binary' }),
        (h, key) => {
          expect(typeof bearerMatches(h, key)).toBe('boolean')
        },
      ),
      fuzzParams(2_000),
    )
  })
})

describe('fuzz: request bodies (core/http.ts readJsonBody)', { timeout: fuzzTimeoutMs }, () => {
  let server: Server
  let url: string

  beforeAll(async () => {
    announceFuzz('request bodies')
    // Answers what readJsonBody made of the body: the value, or the ApiError it threw.
    server = createServer((req, res) => {
      readJsonBody(req, maxBytes).then(
        (json) => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ json })),
        (err: unknown) => {
          const e = err as ApiError
          const body = err instanceof ApiError ? e.body() : { unexpected: String(err) }
          res
            .writeHead(err instanceof ApiError ? e.status : 500, { 'content-type': 'application/json' })
            .end(JSON.stringify(body))
        },
      )
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  })
  afterAll(async () => {
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  })

  const encoder = new TextEncoder()
  const bodies = fc.oneof(
    fc.jsonValue({ maxDepth: 4 }).map((v) => encoder.encode(JSON.stringify(v))),
    fc.uint8Array({ maxLength: 300 }),
    fc.string({ unit: 'binary', maxLength: 100 }).map((s) => encoder.encode(JSON.stringify(s))),
    fc.integer({ min: maxBytes - 4, max: maxBytes + 4 }).map((n) => encoder.encode(`"${'x'.repeat(n - 2)}"`)),
    fc.integer({ min: 1, max: 20_000 }).map((d) => encoder.encode(deepJson(d))),
    fc.constant(new Uint8Array()),
  )

  it('returns exactly what JSON.parse reads, or a 400 invalid_json, or a 413 past the limit', async () => {
    await fc.assert(
      fc.asyncProperty(bodies, fc.constantFrom('length', 'chunked'), async (bytes, framing) => {
        const res = await send(
          url,
          {
            method: 'POST',
            path: '/',
            headers: framing === 'chunked' ? { 'transfer-encoding': 'chunked' } : {},
            body: bytes,
          },
          requestTimeoutMs,
        )
        const answer = JSON.parse(res.body.toString('utf8')) as {
          json?: unknown
          error?: { code: string; message: string }
        }
        if (bytes.byteLength > maxBytes) {
          expect(res.status).toBe(413)
          expect(answer.error?.code).toBe('request_too_large')
          expect(answer.error?.message).toContain(String(maxBytes))
          return
        }
        let expected: unknown
        try {
          expected = JSON.parse(Buffer.from(bytes).toString('utf8'))
        } catch {
          expect(res.status).toBe(400)
          expect(answer.error?.code).toBe('invalid_json')
          expect(answer.error?.message).toMatch(/not valid JSON/)
          return
        }
        expect(res.status).toBe(200)
        // Deep values only as far as the test can print them back.
        if (bytes.byteLength < 2_000 || bytes[0] !== 0x5b) expect(answer.json).toEqual(expected)
      }),
      fuzzParams(300, requestTimeoutMs),
    )
  })

  it('refuses a declared length past the limit before reading a byte of it, up to 2^53', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.integer({ min: maxBytes + 1, max: 10 * maxBytes }),
          fc.constant(2 ** 32),
          fc.constant(2 ** 53 - 1),
        ),
        async (declared) => {
          // Only the head and two bytes go out: an answer can only come from the declared length.
          const res = await send(
            url,
            {
              method: 'POST',
              path: '/',
              headers: { 'content-length': String(declared), connection: 'close' },
              body: null,
            },
            requestTimeoutMs,
            { sendHeadOnly: true },
          )
          expect(res.status).toBe(413)
          const error = (JSON.parse(res.body.toString('utf8')) as { error: { message: string } }).error
          expect(error.message).toBe(`the request body is ${declared} bytes; the limit is ${maxBytes}`)
        },
      ),
      fuzzParams(20, requestTimeoutMs),
    )
  })
})
