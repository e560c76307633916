import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import { SseSplitter } from '../../../core/sse.ts'
import { ControlClient, type ControlEvent, toControlEvent } from '../../../daemon/control/client.ts'
import {
  type ControlServer,
  type ControlServerOptions,
  maxBodyBytes,
  startControlServer,
} from '../../../daemon/control/server.ts'
import { loadSettings, saveSettings } from '../../../daemon/control/settings.ts'
import { StandInTarget } from './stand-in-target.ts'

describe('control server', () => {
  let dir: string
  const servers: ControlServer[] = []

  const start = async (
    target = new StandInTarget(),
    options: Partial<ControlServerOptions> = {},
  ): Promise<{ server: ControlServer; target: StandInTarget; call: typeof fetch }> => {
    const server = await startControlServer(target, { dataDir: options.dataDir ?? dir, ...options })
    servers.push(server)
    const call = (path: string | URL | Request, init: RequestInit = {}) =>
      fetch(`${server.url}${path}`, {
        ...init,
        headers: { authorization: `Bearer ${server.token}`, ...(init.headers as Record<string, string>) },
      })
    return { server, target, call }
  }

  const json = (body: unknown): RequestInit => ({
    method: 'POST',
    body: JSON.stringify(body),
    headers: { 'content-type': 'application/json' },
  })

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-control-'))
  })
  afterEach(async () => {
    for (const s of servers.splice(0)) await s.close()
  })
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('makes a 0600 token once, writes control.json (0600) with url and pid, removes it on close', async () => {
    const { server } = await start()
    const tokenPath = join(dir, 'control.token')
    expect((await stat(tokenPath)).mode & 0o777).toBe(0o600)
    expect((await readFile(tokenPath, 'utf8')).trim()).toBe(server.token)
    expect((await stat(server.infoPath)).mode & 0o777).toBe(0o600)
    expect(JSON.parse(await readFile(server.infoPath, 'utf8'))).toEqual({ url: server.url, pid: process.pid })
    expect(server.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
    expect(server.warning).toBeNull()
    await server.close()
    await expect(stat(server.infoPath)).rejects.toThrow(/ENOENT/)
    const again = await start()
    expect(again.server.token).toBe(server.token)
    expect(again.server.port).not.toBe(0)
  })

  it('answers 401 on every API endpoint without the token or with a wrong one', async () => {
    const { server } = await start()
    const endpoints: Array<[string, string]> = [
      ['GET', '/status'],
      ['GET', '/events'],
      ['POST', '/pause'],
      ['POST', '/resume'],
      ['POST', '/idle'],
      ['GET', '/settings'],
      ['PUT', '/settings'],
      ['GET', '/logs'],
      ['GET', '/logs?lines=5'],
      ['GET', '/no-such-thing'],
    ]
    const wrong = `${server.token.slice(0, -1)}${server.token.endsWith('A') ? 'B' : 'A'}`
    for (const [method, path] of endpoints) {
      for (const authorization of [undefined, `Bearer ${wrong}`, `Bearer ${server.token}x`, server.token]) {
        const res = await fetch(`${server.url}${path}`, {
          method,
          headers: authorization != null ? { authorization } : {},
          ...(method !== 'GET' ? { body: '{}' } : {}),
        })
        expect(res.status, `${method} ${path} with ${authorization}`).toBe(401)
        expect(res.headers.get('www-authenticate')).toContain('Bearer')
        expect(((await res.json()) as { error: { code: string } }).error.code).toBe('unauthorized')
      }
    }
  })

  it('serves the dashboard without the token, with CSP, no framing and nosniff', async () => {
    const { server } = await start()
    for (const path of ['/', '/index.html', '/dashboard.js', '/dashboard.css', '/favicon.svg']) {
      const res = await fetch(`${server.url}${path}`)
      expect(res.status, path).toBe(200)
      expect(res.headers.get('content-security-policy')).toContain("default-src 'self'")
      expect(res.headers.get('content-security-policy')).toContain("frame-ancestors 'none'")
      expect(res.headers.get('x-frame-options')).toBe('DENY')
      expect(res.headers.get('x-content-type-options')).toBe('nosniff')
      await res.arrayBuffer()
    }
    const page = await (await fetch(`${server.url}/`)).text()
    expect(page).toContain('<script type="module" src="dashboard.js">')
    expect(page).not.toMatch(/https?:\/\//)
    expect((await fetch(`${server.url}/`, { method: 'POST' })).status).toBe(405)
    // A page elsewhere that rebinds its name to 127.0.0.1 still sends its own Host.
    const rebound = await new Promise<number>((resolve, reject) => {
      const req = request(`${server.url}/`, { headers: { host: 'evil.example:80' } }, (res) => {
        res.resume()
        resolve(res.statusCode ?? 0)
      })
      req.on('error', reject)
      req.end()
    })
    expect(rebound).toBe(403)
  })

  it('refuses a non-loopback host unless allowed, then warns and tells clients a loopback url', async () => {
    const target = new StandInTarget()
    await expect(startControlServer(target, { dataDir: dir, host: '0.0.0.0' })).rejects.toMatchObject({
      name: 'ControlServerHostError',
    })
    await expect(startControlServer(target, { dataDir: dir, host: '192.168.1.10' })).rejects.toThrow(
      /not loopback/,
    )
    const logged: string[] = []
    const logger = pino({ level: 'info' }, { write: (line: string) => logged.push(line) })
    const { server, call } = await start(target, { host: '0.0.0.0', allowRemote: true, logger })
    expect(server.warning).toMatch(/0\.0\.0\.0/)
    const warnings = logged.map((l) => JSON.parse(l)).filter((l) => l.level === 40)
    expect(warnings).toHaveLength(1)
    expect(warnings[0].msg).toContain('0.0.0.0')
    expect(server.url).toMatch(/^http:\/\/127\.0\.0\.1:/)
    expect((await call('/status')).status).toBe(200)
    const loopback = await start(new StandInTarget(), { host: 'localhost', port: 0 })
    expect(loopback.server.warning).toBeNull()
    await expect(
      startControlServer(new StandInTarget(), {
        dataDir: dir,
        port: loopback.server.port,
        host: '127.0.0.1',
      }),
    ).rejects.toThrow(/port is in use/)
  })

  it('GET /status answers the target status', async () => {
    const { call, target } = await start()
    const res = await call('/status')
    expect(res.status).toBe(200)
    expect(res.headers.get('content-type')).toContain('application/json')
    expect(res.headers.get('x-request-id')).toMatch(/^[0-9a-f-]{36}$/)
    expect(await res.json()).toEqual(target.status())
  })

  it('POST /pause takes minutes, until or nothing, and names the wrong field', async () => {
    const { call, target } = await start()
    const byMinutes = await call('/pause', json({ minutes: 30 }))
    expect(byMinutes.status).toBe(200)
    const paused = (await byMinutes.json()) as { state: string; pausedUntil: string }
    expect(paused.state).toBe('paused')
    expect(Date.parse(paused.pausedUntil) - Date.now()).toBeGreaterThan(29 * 60_000)
    expect(target.pauseCalls.at(-1)).toEqual({ minutes: 30 })

    const until = new Date(Date.now() + 2 * 3_600_000)
    expect((await call('/pause', json({ until: until.toISOString() }))).status).toBe(200)
    expect(target.pauseCalls.at(-1)?.until?.getTime()).toBe(until.getTime())

    expect((await call('/pause', { method: 'POST' })).status).toBe(200)
    expect(target.pauseCalls.at(-1)).toEqual({})
    expect((await call('/pause', json({}))).status).toBe(200)

    const bad: Array<[unknown, string, string]> = [
      [{ minutes: -1 }, 'minutes', 'invalid_field'],
      [{ minutes: 'ten' }, 'minutes', 'invalid_field'],
      [{ minutes: 100_000 }, 'minutes', 'invalid_field'],
      [{ until: 'tomorrow' }, 'until', 'invalid_field'],
      [{ until: '2001-01-01T00:00:00Z' }, 'until', 'invalid_field'],
      [{ minutes: 5, until: until.toISOString() }, 'until', 'invalid_field'],
      [{ hours: 1 }, 'hours', 'unknown_field'],
    ]
    const calls = target.pauseCalls.length
    for (const [body, field, code] of bad) {
      const res = await call('/pause', json(body))
      expect(res.status, JSON.stringify(body)).toBe(400)
      const { error } = (await res.json()) as { error: { message: string; code: string; field: string } }
      expect(error).toMatchObject({ code, field })
      expect(error.message).toContain(field)
    }
    const notJson = await call('/pause', { method: 'POST', body: '{minutes: 5' })
    expect(notJson.status).toBe(400)
    expect(((await notJson.json()) as { error: { code: string } }).error.code).toBe('invalid_json')
    const array = await call('/pause', json([1]))
    expect(array.status).toBe(400)
    expect(target.pauseCalls).toHaveLength(calls)
    expect((await call('/pause')).status).toBe(405)
  })

  it('refuses a body over 16 KiB with 413, declared or streamed', async () => {
    const { call, server, target } = await start()
    const big = JSON.stringify({ games: ['x'.repeat(maxBodyBytes)] })
    const declared = await call('/settings', { method: 'PUT', body: big })
    expect(declared.status).toBe(413)
    expect(((await declared.json()) as { error: { code: string } }).error.code).toBe('request_too_large')
    const streamed = await new Promise<number>((resolve, reject) => {
      const req = request(
        `${server.url}/settings`,
        {
          method: 'PUT',
          headers: { authorization: `Bearer ${server.token}`, 'transfer-encoding': 'chunked' },
        },
        (res) => {
          res.resume()
          resolve(res.statusCode ?? 0)
        },
      )
      req.on('error', reject)
      for (let i = 0; i < 20; i++) req.write('x'.repeat(1024))
      req.end()
    })
    expect(streamed).toBe(413)
    expect(target.settings().games).toEqual([])
  })

  it('POST /resume resumes and answers the status; POST /idle reaches reportIdle', async () => {
    const { call, target } = await start()
    await call('/pause', json({}))
    const res = await call('/resume', json({}))
    expect(res.status).toBe(200)
    expect(((await res.json()) as { state: string }).state).toBe('serving')
    expect(target.resumeCalls).toBe(1)
    expect((await call('/resume', json({ now: true }))).status).toBe(400)
    expect((await call('/idle', json({ seconds: 75 }))).status).toBe(204)
    expect(target.idleReports).toEqual([75])
    const badIdle = await call('/idle', json({ seconds: -3 }))
    expect(badIdle.status).toBe(400)
    expect(((await badIdle.json()) as { error: { field: string } }).error.field).toBe('seconds')
  })

  it('validates settings field by field, applies them, and keeps them across a restart', async () => {
    const dataDir = await mkdtemp(join(dir, 'settings-'))
    const makeTarget = async () =>
      new StandInTarget({
        settings: await loadSettings(dataDir),
        saveSettings: (s) => saveSettings(dataDir, s),
      })
    const { call, server } = await start(await makeTarget(), { dataDir })
    const put = (body: unknown) => call('/settings', { ...json(body), method: 'PUT' })

    const bad = await put({ vramCapMiB: -5, games: 'Game.exe', pauseOnBattery: 'yes', bogus: 1 })
    expect(bad.status).toBe(400)
    const { error } = (await bad.json()) as {
      error: { code: string; field: string; message: string; fields: Record<string, string> }
    }
    expect(error.code).toBe('invalid_field')
    expect(Object.keys(error.fields).sort()).toEqual(['bogus', 'games', 'pauseOnBattery', 'vramCapMiB'])
    expect(error.fields.vramCapMiB).toMatch(/^vramCapMiB must be a whole number of MiB from 256/)
    expect(error.fields.bogus).toMatch(/unknown setting "bogus"/)
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ schedule: [{ days: [1], startHour: 18, endHour: 25 }] }, 'schedule[0].endHour'],
      [{ schedule: 'mon-fri 18' }, 'schedule "mon-fri 18"'],
      [{ schedule: 'funday 1-2' }, '"funday" is not a weekday'],
      [{ maxGpuTemperatureC: 200 }, 'maxGpuTemperatureC'],
      [{ idleOnlyMinutes: 0 }, 'idleOnlyMinutes'],
      [{ resumeAfterSeconds: null }, 'resumeAfterSeconds'],
      [{ games: ['C:\\Games\\x.exe'] }, 'not a path'],
    ]
    for (const [body, text] of cases) {
      const res = await put(body)
      expect(res.status, JSON.stringify(body)).toBe(400)
      const e = ((await res.json()) as { error: { message: string; field: string } }).error
      expect(e.message).toContain(text)
      expect(e.field).toBe(Object.keys(body)[0])
    }
    const unknownOnly = await put({ colour: 'red' })
    expect(((await unknownOnly.json()) as { error: { code: string } }).error.code).toBe('unknown_field')
    expect(await (await call('/settings')).json()).toEqual(await loadSettings(dataDir))

    const good = await put({
      games: [' Game.exe', 'game.EXE', 'Other'],
      schedule: 'mon-fri 18-23; sat,sun 10-24',
      vramCapMiB: 8_192,
      maxGpuTemperatureC: 83.5,
      pauseOnBattery: false,
      idleOnlyMinutes: 10,
    })
    expect(good.status).toBe(200)
    const applied = await good.json()
    expect(applied).toEqual({
      games: ['Game.exe', 'Other'],
      schedule: [
        { days: [1, 2, 3, 4, 5], startHour: 18, endHour: 23 },
        { days: [0, 6], startHour: 10, endHour: 24 },
      ],
      vramCapMiB: 8_192,
      maxGpuTemperatureC: 83.5,
      pauseOnBattery: false,
      idleOnlyMinutes: 10,
      resumeAfterSeconds: 30,
    })
    expect((await stat(join(dataDir, 'settings.json'))).mode & 0o777).toBe(0o600)

    await server.close()
    const restarted = await start(await makeTarget(), { dataDir })
    expect(await (await restarted.call('/settings')).json()).toEqual(applied)
    const cleared = await restarted.call('/settings', { ...json({ vramCapMiB: null }), method: 'PUT' })
    expect(((await cleared.json()) as { vramCapMiB: unknown }).vramCapMiB).toBeNull()
  })

  it('GET /logs tails the target log, at most 1000 lines', async () => {
    const { call, target } = await start()
    for (let i = 0; i < 150; i++) target.log(`line ${i}`)
    const two = (await (await call('/logs?lines=2')).json()) as { lines: string[] }
    expect(two.lines.map((l) => JSON.parse(l).msg)).toEqual(['line 148', 'line 149'])
    expect(((await (await call('/logs')).json()) as { lines: string[] }).lines).toHaveLength(100)
    for (const lines of ['0', '1001', 'abc', '5.5', '']) {
      const res = await call(`/logs?lines=${lines}`)
      expect(res.status, lines).toBe(400)
      expect(((await res.json()) as { error: { field: string } }).error.field).toBe('lines')
    }
  })

  it('streams the state at once, state changes, stats and heartbeats; cleans up on disconnect', async () => {
    const { server, call, target } = await start(new StandInTarget(), { heartbeatIntervalMs: 50 })
    const client = new ControlClient({
      endpoint: async () => ({ url: server.url, token: server.token, pid: null }),
    })
    const controller = new AbortController()
    const events = client.events({ signal: controller.signal })
    const next = async (): Promise<ControlEvent> => (await events.next()).value as ControlEvent
    const first = await next()
    expect(first).toEqual({ type: 'state', status: target.status() })
    expect(target.listenerCount('state')).toBe(1)
    expect(target.listenerCount('stats')).toBe(1)

    await call('/pause', json({ minutes: 60 }))
    const paused = await next()
    expect(paused.type === 'state' && paused.status.state).toBe('paused')
    expect(paused.type === 'state' && paused.status.reason).toBe('paused by you')

    target.emitStats(42.5)
    const stats = await next()
    expect(stats).toMatchObject({ type: 'stats', stats: { tokensPerSecond: 42.5, tokensToday: 1_243 } })
    target.emitStats(7)
    expect(await next()).toMatchObject({ type: 'stats', stats: { tokensPerSecond: 7 } })

    controller.abort()
    await events.return(undefined)
    await vi.waitFor(() => expect(target.listenerCount('state') + target.listenerCount('stats')).toBe(0))

    // The wire format: event and data lines, heartbeat comments.
    const res = await call('/events')
    expect(res.headers.get('content-type')).toContain('text/event-stream')
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader()
    let text = ''
    while (!text.includes(': heartbeat\n\n')) text += (await reader.read()).value ?? ''
    expect(text.startsWith('event: state\ndata: {')).toBe(true)
    const [wire] = new SseSplitter().push(new TextEncoder().encode(text))
    expect(toControlEvent(wire!.event, wire!.data)).toMatchObject({ type: 'state' })
    await reader.cancel()
  })

  it('caps concurrent event streams, and ends them on close', async () => {
    const { server, call } = await start(new StandInTarget(), { maxEventStreams: 2 })
    const a = await call('/events')
    const b = await call('/events')
    const third = await call('/events')
    expect(third.status).toBe(429)
    expect(((await third.json()) as { error: { code: string } }).error.code).toBe('too_many_event_streams')
    const readers = [a, b].map((r) => r.body!.getReader())
    await server.close()
    for (const reader of readers) {
      let done = false
      while (!done) done = (await reader.read().catch(() => ({ done: true }))).done
    }
  })

  it('maps a target error to 409 and a hung target to 504', async () => {
    class Stubborn extends StandInTarget {
      override async pause(): Promise<void> {
        const { GarageError } = await import('../../../core/errors.ts')
        throw new GarageError('the node is stopping')
      }
      override resume(): Promise<void> {
        return new Promise(() => {})
      }
    }
    const { call } = await start(new Stubborn(), { operationTimeoutMs: 100 })
    const conflict = await call('/pause', json({}))
    expect(conflict.status).toBe(409)
    expect(((await conflict.json()) as { error: { message: string } }).error.message).toContain('stopping')
    const hung = await call('/resume', json({}))
    expect(hung.status).toBe(504)
  })

  it('refuses a settings file others wrote wrong, naming the file and field', async () => {
    const dataDir = await mkdtemp(join(dir, 'bad-settings-'))
    await writeFile(join(dataDir, 'settings.json'), JSON.stringify({ vramCapMiB: 'lots', future: 1 }))
    await expect(loadSettings(dataDir)).rejects.toMatchObject({
      name: 'SettingsFileInvalidError',
      message: expect.stringMatching(/settings\.json: vramCapMiB must be/),
    })
    await writeFile(join(dataDir, 'settings.json'), JSON.stringify({ idleOnlyMinutes: 5, future: 1 }))
    expect((await loadSettings(dataDir)).idleOnlyMinutes).toBe(5)
  })
})
