import { once } from 'node:events'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'
import {
  ControlApiError,
  ControlClient,
  type ControlEvent,
  DaemonNotRunningError,
  readControlEndpoint,
} from '../../../daemon/control/client.ts'
import { setupIdle } from '../../../tray-app/setup/idle.ts'
import { powerMonitor, resetElectron } from '../../tray-app/electron-fake.ts'
import { statusOf, testContext } from '../../tray-app/helpers.ts'
import { type StubControlApi, startStubControlApi } from '../../tray-app/stub-control-api.ts'

vi.mock('electron', () => import('../../tray-app/electron-fake.ts'))

describe('ControlClient', () => {
  let dir: string
  let api: StubControlApi
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-tray-client-'))
    api = await startStubControlApi({ dataDir: dir, status: statusOf('serving'), idle: false })
  })
  afterEach(async () => {
    await api.close()
    await rm(dir, { recursive: true, force: true })
  })

  it('finds the daemon through control.json and sends the bearer token', async () => {
    const endpoint = await readControlEndpoint(dir)
    expect(endpoint).toEqual({ url: api.url, token: api.token, pid: process.pid })
    const client = ControlClient.forDataDir(dir)
    expect((await client.status()).state).toBe('serving')
    await client.pause({ minutes: 60 })
    const until = new Date('2026-11-25T07:00:00.000Z')
    await client.pause({ until })
    await client.pause({})
    await client.resume()
    expect(api.requests.map((r) => [r.method, r.path, r.authorized, r.body])).toEqual([
      ['GET', '/status', true, null],
      ['POST', '/pause', true, { minutes: 60 }],
      ['POST', '/pause', true, { until: '2026-11-25T07:00:00.000Z' }],
      ['POST', '/pause', true, {}],
      ['POST', '/resume', true, {}],
    ])
  })

  it('HTTP errors are ControlApiError with the status; a wrong token is a 401', async () => {
    const client = ControlClient.forDataDir(dir)
    const idle = await client.reportIdle(5).catch((e: unknown) => e)
    expect(idle).toBeInstanceOf(ControlApiError)
    expect((idle as ControlApiError).status).toBe(404)
    expect((idle as Error).message).toBe('no POST /idle')
    await writeFile(join(dir, 'control.token'), 'wrong')
    const err = await client.status().catch((e: unknown) => e)
    expect(err).toMatchObject({ name: 'ControlApiError', status: 401 })
  })

  it('no control.json: DaemonNotRunningError; a non-loopback url is refused (the token stays home)', async () => {
    const empty = await mkdtemp(join(tmpdir(), 'garage-tray-empty-'))
    try {
      expect(await readControlEndpoint(empty)).toBeNull()
      await expect(ControlClient.forDataDir(empty).status()).rejects.toMatchObject({
        name: 'DaemonNotRunningError',
      })
      await writeFile(join(empty, 'control.token'), 'secret')
      await writeFile(
        join(empty, 'control.json'),
        JSON.stringify({ url: 'http://192.168.1.20:9000', pid: 1 }),
      )
      await expect(readControlEndpoint(empty, { loopbackOnly: true })).rejects.toBeInstanceOf(
        DaemonNotRunningError,
      )
      // Half-written JSON (the daemon is writing it): absent for now.
      await writeFile(join(empty, 'control.json'), '{"url":')
      expect(await readControlEndpoint(empty)).toBeNull()
    } finally {
      await rm(empty, { recursive: true, force: true })
    }
  })

  it('events(): state and stats from the SSE stream, opened before the first status read', async () => {
    const client = ControlClient.forDataDir(dir)
    const controller = new AbortController()
    const got: ControlEvent[] = []
    let open = (): void => {}
    const opened = new Promise<void>((resolve) => {
      open = resolve
    })
    const reading = (async () => {
      for await (const event of client.events({ signal: controller.signal, onOpen: async () => open() })) {
        got.push(event)
        if (got.length === 2) controller.abort()
      }
    })()
    await opened
    api.pushStats(7.5)
    api.pushState(statusOf('paused', { reason: 'game: cs2' }))
    await reading.catch(() => {})
    expect(got).toEqual([
      { type: 'stats', stats: expect.objectContaining({ tokensPerSecond: 7.5 }) },
      { type: 'state', status: expect.objectContaining({ state: 'paused', reason: 'game: cs2' }) },
    ])
  })
})

describe('a silent event stream', () => {
  it('is dropped after the silence timeout, so the tray reconnects', async () => {
    const server = createServer((_req, res) => {
      // Headers, then nothing: a hung daemon.
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.flushHeaders()
    })
    server.listen(0, '127.0.0.1')
    await once(server, 'listening')
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
      const client = new ControlClient({
        endpoint: async () => ({ url, token: 't', pid: null }),
        silenceTimeoutMs: 150,
      })
      const started = Date.now()
      const err = await (async () => {
        for await (const _ of client.events({ signal: new AbortController().signal })) {
        }
      })().catch((e: unknown) => e)
      expect(err).toMatchObject({ name: 'ControlStreamSilentError' })
      expect(Date.now() - started).toBeGreaterThanOrEqual(140)
    } finally {
      server.closeAllConnections()
      server.close()
    }
  })
})

describe('setupIdle', () => {
  let dir: string
  beforeEach(async () => {
    resetElectron()
    dir = await mkdtemp(join(tmpdir(), 'garage-tray-idle-'))
  })
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('sends powerMonitor idle seconds on connect and every interval', async () => {
    const api = await startStubControlApi({ dataDir: dir, status: statusOf('serving') })
    try {
      const ctx = testContext({ client: ControlClient.forDataDir(dir), dataDir: dir })
      powerMonitor.idleSeconds = 42
      setupIdle(ctx, { intervalMs: 20 })
      ctx.store.update({ status: statusOf('serving'), daemon: 'running' })
      await vi.waitFor(() =>
        expect(api.requests.filter((r) => r.path === '/idle').length).toBeGreaterThanOrEqual(2),
      )
      expect(api.requests.find((r) => r.path === '/idle')).toMatchObject({
        method: 'POST',
        body: { seconds: 42 },
      })
      await ctx.shutdown()
    } finally {
      await api.close()
    }
  })

  it('stops reporting to a daemon without POST /idle (404) until it reconnects', async () => {
    const api = await startStubControlApi({ dataDir: dir, status: statusOf('serving'), idle: false })
    try {
      const ctx = testContext({ client: ControlClient.forDataDir(dir), dataDir: dir })
      setupIdle(ctx, { intervalMs: 10 })
      ctx.store.update({ status: statusOf('serving'), daemon: 'running' })
      await vi.waitFor(() => expect(api.requests.filter((r) => r.path === '/idle')).toHaveLength(1))
      await new Promise((r) => setTimeout(r, 100))
      expect(api.requests.filter((r) => r.path === '/idle')).toHaveLength(1)
      ctx.store.update({ status: null, daemon: 'starting' })
      ctx.store.update({ status: statusOf('serving'), daemon: 'running' })
      await vi.waitFor(() => expect(api.requests.filter((r) => r.path === '/idle')).toHaveLength(2))
      await ctx.shutdown()
    } finally {
      await api.close()
    }
  })
})
