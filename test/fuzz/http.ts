import { request } from 'node:http'
import { connect } from 'node:net'
import fc from 'fast-check'
import { deepJson } from './fuzz.ts'

/** An HTTP request the fuzz suites send: any token method, any path node:http lets through. */
export interface HttpCase {
  method: string
  path: string
  headers: Record<string, string>
  body: Uint8Array | null
}

export interface HttpAnswer {
  status: number
  headers: Record<string, string | string[] | undefined>
  body: Buffer
}

/**
 * Sends one request over a fresh connection and reads the whole answer; with `endlessStreams`, an
 * event stream only up to its head (the control API's /events stays open by design); with
 * `sendHeadOnly`, the request's head alone, its body never (a client that claims a length).
 * Rejects when nothing comes back in `timeoutMs`.
 */
export function send(
  baseUrl: string,
  c: HttpCase,
  timeoutMs: number,
  options: { endlessStreams?: boolean; sendHeadOnly?: boolean } = {},
): Promise<HttpAnswer> {
  const url = new URL(baseUrl)
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: url.hostname,
        port: url.port,
        method: c.method,
        path: c.path,
        headers: c.headers,
        agent: false,
        timeout: timeoutMs,
      },
      (res) => {
        const chunks: Buffer[] = []
        const done = (): void => {
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) })
          if (options.sendHeadOnly === true) req.destroy()
        }
        if (
          options.endlessStreams === true &&
          String(res.headers['content-type']).startsWith('text/event-stream')
        ) {
          done()
          res.destroy()
          return
        }
        res.on('data', (chunk: Buffer) => chunks.push(chunk))
        res.on('end', done)
        res.on('error', reject)
      },
    )
    req.on('timeout', () =>
      req.destroy(new Error(`no answer to ${c.method} ${c.path} within ${timeoutMs} ms`)),
    )
    req.on('error', reject)
    if (options.sendHeadOnly === true) req.flushHeaders()
    else if (c.body != null) req.end(c.body)
    else req.end()
  })
}

/**
 * Writes raw bytes on a new connection, closes our side, and returns every status line the server
 * answered with (pipelined requests get one each; a parser error gets Node's 400 and a close).
 */
export function sendRaw(baseUrl: string, bytes: Uint8Array, timeoutMs: number): Promise<number[]> {
  const url = new URL(baseUrl)
  return new Promise((resolve, reject) => {
    const socket = connect({ host: url.hostname, port: Number(url.port), allowHalfOpen: true })
    const chunks: Buffer[] = []
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error(`the connection did not close within ${timeoutMs} ms`))
    }, timeoutMs)
    socket.on('data', (c: Buffer) => chunks.push(c))
    socket.on('error', () => {
      // a reset after a refusal: what arrived is the answer
    })
    socket.on('close', () => {
      clearTimeout(timer)
      const text = Buffer.concat(chunks).toString('latin1')
      resolve([...text.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((m) => Number(m[1])))
    })
    socket.write(bytes, () => socket.end())
  })
}

/** A JSON error body as the OpenAI API shapes it; null when the body is not one. */
export function openAiError(
  body: Buffer,
): { message: string; type: string; param: string | null; code: string | null } | null {
  try {
    const json = JSON.parse(body.toString('utf8')) as { error?: Record<string, unknown> }
    const e = json.error
    if (
      e != null &&
      typeof e.message === 'string' &&
      e.message.length > 0 &&
      typeof e.type === 'string' &&
      (e.param === null || typeof e.param === 'string') &&
      (e.code === null || typeof e.code === 'string')
    ) {
      return e as { message: string; type: string; param: string | null; code: string | null }
    }
  } catch {
    // not JSON
  }
  return null
}

const visible = fc.integer({ min: 0x21, max: 0x7e }).map((c) => String.fromCharCode(c))

/** Paths: the endpoints, with query strings, doubled slashes, dot segments, escapes and junk. */
export function pathArb(known: string[]): fc.Arbitrary<string> {
  const base = fc.constantFrom(...known)
  return fc.oneof(
    { weight: 4, arbitrary: base },
    fc.tuple(base, fc.string({ unit: visible, maxLength: 20 })).map(([p, q]) => `${p}?${q}`),
    base.map((p) => `/${p}`),
    base.map((p) => `${p}/`),
    base.map((p) => p.replace(/\/[^/]*$/, '/..$&')),
    base.map((p) => p.toUpperCase()),
    base.map((p) => p.replace(/[a-z]/, (c) => `%${c.charCodeAt(0).toString(16)}`)),
    fc.constantFrom('/', '//', '///', '//x/status', '/%', '/%zz', '/..', '*', '/?', '/#', '/%00', '/\u00e9'),
    fc.string({ unit: visible, maxLength: 40 }).map((s) => `/${s}`),
  )
}

export const methodArb: fc.Arbitrary<string> = fc.oneof(
  { weight: 5, arbitrary: fc.constantFrom('GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'HEAD', 'OPTIONS') },
  fc.stringMatching(/^[A-Z]{1,12}$/),
  // node:http upper-cases a method before sending it: lower case is for the raw-socket runs.
  fc.constantFrom('M-SEARCH', 'PROPFIND', 'QUERY'),
)

/** Header values node:http will send: latin1 without CR, LF or NUL. */
export const headerValueArb: fc.Arbitrary<string> = fc
  .array(
    fc.oneof(fc.integer({ min: 0x20, max: 0x7e }), fc.integer({ min: 0xa0, max: 0xff }), fc.constant(9)),
    {
      maxLength: 60,
    },
  )
  .map((cs) => String.fromCharCode(...cs))

/** Authorization headers around a real token: right, wrong, near misses, other schemes. */
export function authArb(token: string): fc.Arbitrary<string | undefined> {
  return fc.oneof(
    { weight: 6, arbitrary: fc.constant(`Bearer ${token}`) },
    fc.constantFrom(
      undefined,
      '',
      'Bearer',
      'Bearer ',
      `bearer ${token}`,
      `Bearer  ${token}`,
      `Bearer ${token} `,
      `Bearer ${token}x`,
      `Bearer ${token.slice(0, -1)}`,
      `Basic ${Buffer.from(`u:${token}`).toString('base64')}`,
      token,
    ),
    headerValueArb.map((v) => `Bearer ${v}`),
    headerValueArb,
  )
}

const encoder = new TextEncoder()

/**
 * Maps of the `good` fields (the `required` ones always there), half of them with one field given
 * any JSON value instead, and now and then a key nobody asked for: mutated valid requests.
 */
export function jsonMap(
  good: Record<string, fc.Arbitrary<unknown>>,
  required: string[] = [],
): fc.Arbitrary<Record<string, unknown>> {
  const anyJson = fc.jsonValue({ maxDepth: 3 })
  return fc
    .tuple(
      fc.record(good, { requiredKeys: required }),
      fc.option(fc.tuple(fc.constantFrom(...Object.keys(good)), anyJson), { freq: 2 }),
      fc.option(fc.dictionary(fc.string({ maxLength: 10 }), anyJson, { maxKeys: 2 }), { freq: 4 }),
    )
    .map(([known, wrong, extra]) => ({
      ...extra,
      ...known,
      ...(wrong != null ? { [wrong[0]]: wrong[1] } : {}),
    }))
}

/**
 * Request bodies: mostly `valid` JSON maps, then any JSON, any bytes, invalid UTF-8, truncated JSON,
 * one of `deepFields` nested thousands deep, bare JSON scalars, nothing.
 */
export function bodyArb(valid: fc.Arbitrary<unknown>, deepFields: string[]): fc.Arbitrary<Uint8Array | null> {
  const json = (v: unknown): Uint8Array => encoder.encode(JSON.stringify(v))
  // A field nested deeper than JSON.stringify goes: fine to parse, fatal to print or re-encode.
  const deepField = fc
    .tuple(valid, fc.constantFrom(...deepFields), fc.integer({ min: 1_000, max: 20_000 }), fc.boolean())
    .map(([v, field, depth, wrapped]) => {
      const deep = wrapped ? `[${deepJson(depth)}]` : deepJson(depth)
      const base = typeof v === 'object' && v !== null && !Array.isArray(v) ? v : {}
      return encoder.encode(
        JSON.stringify({ ...base, [field]: 0 }).replace(`"${field}":0`, `"${field}":${deep}`),
      )
    })
  return fc.oneof(
    { weight: 6, arbitrary: valid.map(json) },
    { weight: 2, arbitrary: deepField },
    fc.jsonValue().map(json),
    valid.map((v) => {
      const text = JSON.stringify(v)
      return encoder.encode(text.slice(0, Math.max(0, text.length - 3)))
    }),
    fc.uint8Array({ maxLength: 200 }),
    valid.map((v) => Uint8Array.from([...json(v), 0xff, 0xfe])),
    fc.integer({ min: 1_000, max: 20_000 }).map((depth) => encoder.encode(deepJson(depth))),
    fc
      .constantFrom('null', 'true', '[]', '"x"', '{}', '0', '1e999', '-0', '[{}]')
      .map((t) => encoder.encode(t)),
    fc.constant(null),
    fc.constant(new Uint8Array()),
  )
}
