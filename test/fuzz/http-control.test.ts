import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { pino } from 'pino'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { errorCodesOf } from '../../core/errors.ts'
import {
  type ControlServer,
  maxBodyBytes,
  maxPauseMinutes,
  startControlServer,
} from '../../daemon/control/server.ts'
import { settingsLimits } from '../../daemon/control/settings.ts'
import { StandInTarget } from '../daemon/control/stand-in-target.ts'
import { announceFuzz, deepJson, fuzzParams, fuzzTimeoutMs } from './fuzz.ts'
import {
  authArb,
  bodyArb,
  type HttpCase,
  headerValueArb,
  jsonMap,
  methodArb,
  pathArb,
  send,
  sendRaw,
} from './http.ts'

const requestTimeoutMs = 5_000
const dashboardPaths = ['/', '/index.html', '/dashboard.js', '/dashboard.css', '/favicon.svg']
const apiPaths = ['/status', '/events', '/pause', '/resume', '/idle', '/settings', '/logs', '/logs?lines=5']
const routes: Record<string, string[]> = {
  '/status': ['GET'],
  '/events': ['GET'],
  '/pause': ['POST'],
  '/resume': ['POST'],
  '/idle': ['POST'],
  '/settings': ['GET', 'PUT'],
  '/logs': ['GET'],
}
const controlCodes = errorCodesOf('control')
const statuses = new Set([200, 204, ...[...controlCodes.values()].map((c) => c.status)])

const settingsFields = {
  games: fc.array(fc.stringMatching(/^[A-Za-z][A-Za-z0-9 ._-]{0,30}$/), { maxLength: 5 }),
  schedule: fc.constantFrom('mon-fri 18-23', 'daily 0-24', 'always', 'sat,sun 10-24; mon 1-2'),
  vramCapMiB: fc.oneof(fc.constant(null), fc.integer({ min: settingsLimits.minVramCapMiB, max: 65_536 })),
  maxGpuTemperatureC: fc.oneof(fc.constant(null), fc.integer({ min: 40, max: 100 })),
  pauseOnBattery: fc.boolean(),
  idleOnlyMinutes: fc.oneof(fc.constant(null), fc.integer({ min: 1, max: 1_440 })),
  resumeAfterSeconds: fc.integer({ min: 0, max: 3_600 }),
}

/** Bodies each endpoint takes, valid by construction. */
const validBody = {
  '/pause': fc.oneof(
    fc.constant({}),
    fc.record({ minutes: fc.integer({ min: 1, max: maxPauseMinutes }) }),
    fc
      .integer({ min: 60, max: 6 * 86_400 })
      .map((s) => ({ until: new Date(Date.now() + s * 1000).toISOString() })),
  ),
  '/resume': fc.constant({}),
  '/idle': fc.record({ seconds: fc.integer({ min: 0, max: 86_400 }) }),
  '/settings': fc.record(settingsFields, { requiredKeys: [] }),
} as const
const fieldNames = ['minutes', 'until', 'seconds', 'games', 'schedule', 'vramCapMiB', 'pauseOnBattery']

describe('fuzz: the node control API (daemon/control/server.ts)', { timeout: fuzzTimeoutMs }, () => {
  let dir: string
  let server: ControlServer
  const target = new StandInTarget()
  const logged: string[] = []
  /** What the control API logged as its own failures (`garage logs` shows them to the user). */
  const serverErrors = (): string[] => logged.filter((l) => (JSON.parse(l) as { level: number }).level >= 50)

  beforeAll(async () => {
    announceFuzz('control API')
    dir = await mkdtemp(join(tmpdir(), 'garage-fuzz-control-'))
    server = await startControlServer(target, {
      dataDir: dir,
      logger: pino({ level: 'warn' }, { write: (line: string) => logged.push(line) }),
    })
  })
  afterEach(() => {
    // No input a client can send is the server's failure.
    expect(serverErrors()).toEqual([])
  })
  afterAll(async () => {
    await server?.close()
    await rm(dir, { recursive: true, force: true })
  })

  const loopbackHost = fc.constantFrom('127.0.0.1', 'localhost', '[::1]', '127.9.9.9', 'app.localhost')
  const foreignHost = fc.constantFrom(
    'evil.example',
    '192.168.1.10',
    '[::ffff:10.0.0.1]',
    '0.0.0.0',
    'localhost.evil',
  )

  /** A request and what the docs say must come back: `ok` for one valid by construction. */
  const requests: fc.Arbitrary<{ c: HttpCase; expect: 'ok' | 'host' | 'any' }> = fc
    .record({
      kind: fc.constantFrom('valid', 'valid', 'body', 'body', 'body', 'fuzzed', 'fuzzed', 'foreign'),
      route: fc.constantFrom(...(Object.keys(validBody) as Array<keyof typeof validBody>)),
      method: methodArb,
      path: pathArb([...dashboardPaths, ...apiPaths]),
      host: fc.oneof(loopbackHost, foreignHost, headerValueArb),
      contentType: fc.option(fc.oneof(fc.constant('application/json'), headerValueArb), { nil: undefined }),
    })
    .chain((r) =>
      fc
        .tuple(
          validBody[r.route] as fc.Arbitrary<unknown>,
          bodyArb(
            jsonMap({ ...settingsFields, minutes: fc.integer(), until: fc.string(), seconds: fc.double() }),
            fieldNames,
          ),
          authArb(server.token),
          loopbackHost,
        )
        .map(([valid, fuzzedBody, auth, goodHost]) => {
          const port = new URL(server.url).port
          if (r.kind === 'valid') {
            const c: HttpCase = {
              method: routes[r.route]!.at(-1)!,
              path: r.route,
              headers: {
                authorization: `Bearer ${server.token}`,
                host: `${goodHost}:${port}`,
                'content-type': 'application/json',
              },
              body: new TextEncoder().encode(JSON.stringify(valid)),
            }
            return { c, expect: 'ok' as const }
          }
          const headers: Record<string, string> = {
            host: r.kind === 'foreign' ? `${r.host}` : `${goodHost}:${port}`,
          }
          if (auth != null) headers.authorization = auth
          if (r.contentType != null) headers['content-type'] = r.contentType
          // `body`: the right endpoint and method with a fuzzed body; `fuzzed`: anything at all.
          const c: HttpCase =
            r.kind === 'body'
              ? { method: routes[r.route]!.at(-1)!, path: r.route, headers, body: fuzzedBody }
              : { method: r.method, path: r.path, headers, body: fuzzedBody }
          return {
            c,
            expect:
              // node:http puts its own Host in place of an empty one.
              r.kind === 'foreign' &&
              r.host !== '' &&
              !/^(127\.|localhost|\[::1\]|app\.localhost)/.test(r.host)
                ? ('host' as const)
                : ('any' as const),
          }
        }),
    )

  it('answers any request with a documented status and a named error, never a 500, and keeps serving', async () => {
    await fc.assert(
      fc.asyncProperty(requests, async ({ c, expect: want }) => {
        const res = await send(server.url, c, requestTimeoutMs, { endlessStreams: true })
        expect(res.status).not.toBe(500)
        expect(statuses).toContain(res.status)
        if (res.headers['x-request-id'] == null) {
          // Node's HTTP parser refused it (an unknown method): the handler never ran.
          expect([400, 431]).toContain(res.status)
          expect(want).not.toBe('ok')
        } else if (want === 'ok') expect(res.status).toBeLessThan(300)
        else if (want === 'host') expect(res.status).toBe(403)
        if (res.headers['x-request-id'] != null && res.status >= 400 && c.method !== 'HEAD') {
          const body = JSON.parse(res.body.toString('utf8')) as {
            error: { message: string; code: string; field?: string }
          }
          expect([...controlCodes.keys()]).toContain(body.error.code)
          expect(controlCodes.get(body.error.code)?.status).toBe(res.status)
          expect(body.error.message.length).toBeGreaterThan(0)
          if (body.error.code === 'invalid_field' || body.error.code === 'unknown_field') {
            expect(typeof body.error.field).toBe('string')
          }
          if (body.error.code === 'method_not_allowed') expect(res.headers.allow).toBeDefined()
        }
        // Still serving after whatever that was.
        const status = await send(
          server.url,
          {
            method: 'GET',
            path: '/status',
            headers: { authorization: `Bearer ${server.token}` },
            body: null,
          },
          requestTimeoutMs,
        )
        expect(status.status).toBe(200)
      }),
      fuzzParams(300, requestTimeoutMs * 2),
    )
  })

  it('refuses bodies over 16 KiB, declared or not, with request_too_large', async () => {
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 4096 }), fc.boolean(), async (over, chunked) => {
        const body = new TextEncoder().encode(JSON.stringify({ games: ['x'.repeat(maxBodyBytes + over)] }))
        const res = await send(
          server.url,
          {
            method: 'PUT',
            path: '/settings',
            headers: {
              authorization: `Bearer ${server.token}`,
              ...(chunked ? { 'transfer-encoding': 'chunked' } : {}),
            },
            body,
          },
          requestTimeoutMs,
        )
        expect(res.status).toBe(413)
        const error = (JSON.parse(res.body.toString('utf8')) as { error: { code: string; message: string } })
          .error
        expect(error.code).toBe('request_too_large')
        expect(error.message).toContain(String(maxBodyBytes))
      }),
      fuzzParams(20, requestTimeoutMs),
    )
  })

  it('answers raw bytes, broken HTTP and lying lengths with a status or a close, never a hang', async () => {
    const head = (path: string, extra: string): string =>
      `PUT ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${server.token}\r\n${extra}\r\n`
    const raw = fc.oneof(
      fc.uint8Array({ maxLength: 200 }),
      fc
        .tuple(fc.constantFrom(...apiPaths), fc.nat(100_000), fc.string({ maxLength: 40 }))
        .map(([p, n, b]) => Buffer.from(`${head(p, `Content-Length: ${n}\r\n`)}${b}`)),
      fc
        .tuple(
          fc.constantFrom(...apiPaths),
          fc.constantFrom('-1', '1e3', '0x10', '99999999999999999999', ' 5', '5, 6'),
        )
        .map(([p, n]) => Buffer.from(`${head(p, `Content-Length: ${n}\r\n`)}{}`)),
      fc
        .tuple(fc.constantFrom(...apiPaths), fc.string({ maxLength: 30 }))
        .map(([p, junk]) => Buffer.from(`${head(p, 'Transfer-Encoding: chunked\r\n')}${junk}`)),
      fc.constantFrom(...apiPaths).map((p) => Buffer.from(head(p, `X-Big: ${'a'.repeat(20_000)}\r\n`))),
    )
    await fc.assert(
      fc.asyncProperty(raw, async (bytes) => {
        const answered = await sendRaw(server.url, bytes, requestTimeoutMs)
        for (const status of answered) {
          expect(status).not.toBe(500)
          expect([...statuses, 400, 431]).toContain(status)
        }
      }),
      fuzzParams(150, requestTimeoutMs * 2),
    )
    const status = await send(
      server.url,
      { method: 'GET', path: '/status', headers: { authorization: `Bearer ${server.token}` }, body: null },
      requestTimeoutMs,
    )
    expect(status.status).toBe(200)
  })
  it('regressions: the inputs that made 500s, each now a named 4xx', async () => {
    const call = (method: string, path: string, body: string | null) =>
      send(
        server.url,
        {
          method,
          path,
          headers: { authorization: `Bearer ${server.token}` },
          body: body == null ? null : new TextEncoder().encode(body),
        },
        requestTimeoutMs,
      )
    const code = (res: { body: Buffer }) =>
      (JSON.parse(res.body.toString('utf8')) as { error: { code: string } }).error.code
    // `new URL('//', base)` throws: that was an internal error.
    for (const path of ['//', '///', '//[']) {
      const res = await call('GET', path, null)
      expect(res.status, path).toBe(404)
      expect(code(res)).toBe('not_found')
    }
    // Valid JSON too deep for JSON.stringify, which the error messages used to print.
    const deep = deepJson(8_000)
    const cases: Array<[string, string, string, number, string]> = [
      ['POST', '/resume', deep, 400, 'invalid_json'],
      ['POST', '/pause', `{"minutes":${deep}}`, 400, 'invalid_field'],
      ['POST', '/idle', `{"seconds":${deep}}`, 400, 'invalid_field'],
      ['PUT', '/settings', `{"games":[${deep}]}`, 400, 'invalid_field'],
      ['PUT', '/settings', `{"schedule":${deep}}`, 400, 'invalid_field'],
    ]
    for (const [method, path, body, status, errorCode] of cases) {
      const res = await call(method, path, body)
      expect(res.status, `${method} ${path}`).toBe(status)
      expect(code(res)).toBe(errorCode)
    }
    // A body cut off by the client: no "control request failed" in the node's log (afterEach checks).
    await sendRaw(
      server.url,
      Buffer.from(
        `PUT /settings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${server.token}\r\nContent-Length: 50\r\n\r\n{"games"`,
      ),
      requestTimeoutMs,
    )
  })
})
