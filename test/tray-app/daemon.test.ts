import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'
import { ControlClient } from '../../daemon/control/client.ts'
import type { TrayContext } from '../../tray-app/context.ts'
import { garageCommand, isServiceActive, nodeArguments, type RunCommand } from '../../tray-app/daemon.ts'
import type { TrayMenuItem } from '../../tray-app/menu.ts'
import { setupDaemon } from '../../tray-app/setup/daemon.ts'
import { setupMenu } from '../../tray-app/setup/menu.ts'
import { setupNotifications } from '../../tray-app/setup/notifications.ts'
import { setupQuit } from '../../tray-app/setup/quit.ts'
import { setupState } from '../../tray-app/setup/state.ts'
import { iconPath, setupTray } from '../../tray-app/setup/tray.ts'
import { app, Notification, resetElectron, Tray } from './electron-fake.ts'
import { statusOf, testContext, waitForView } from './helpers.ts'
import { type StubControlApi, startStubControlApi } from './stub-control-api.ts'

vi.mock('electron', () => import('./electron-fake.ts'))

const fakeGarage = fileURLToPath(new URL('./fake-garage.ts', import.meta.url))

function menuItem(id: string): TrayMenuItem {
  const template = (Tray.instances[0]?.menu?.template ?? []) as TrayMenuItem[]
  const found = template.find((i) => i.id === id)
  if (found == null) throw new Error(`no menu item ${id}`)
  return found
}

/** systemctl stand-in: answers is-active with `state`, records every call. */
function systemctl(state: string): RunCommand & { calls: string[][] } {
  const calls: string[][] = []
  const run = (async (file: string, args: string[]) => {
    calls.push([file, ...args])
    return { code: state === 'active' ? 0 : 3, stdout: `${state}\n` }
  }) as RunCommand & { calls: string[][] }
  run.calls = calls
  return run
}

function trayContext(dir: string, env: NodeJS.ProcessEnv = {}): TrayContext {
  return testContext({ dataDir: dir, client: ControlClient.forDataDir(dir), platform: 'linux', env })
}

describe('daemon attach: control.json, /status and /events', () => {
  let dir: string
  let api: StubControlApi | null = null
  let ctx: TrayContext | null = null
  beforeEach(async () => {
    resetElectron()
    dir = await mkdtemp(join(tmpdir(), 'garage-tray-daemon-'))
  })
  afterEach(async () => {
    await ctx?.shutdown()
    ctx = null
    await api?.close()
    api = null
    await rm(dir, { recursive: true, force: true })
  })

  it('attaches to a running daemon, shows its status and follows its SSE state events', async () => {
    api = await startStubControlApi({ dataDir: dir, status: statusOf('serving', { tokensPerSecond: 9 }) })
    const run = systemctl('active')
    ctx = trayContext(dir)
    setupNotifications(ctx)
    setupTray(ctx)
    setupMenu(ctx)
    const daemon = await setupDaemon(ctx, { run })
    expect(daemon.mode).toBe('attached')
    // An answering daemon wins: the service is not even asked.
    expect(run.calls).toEqual([])
    setupState(ctx)

    await waitForView(ctx, (c) => c.store.state === 'serving')
    const tray = Tray.instances[0] as Tray
    expect(tray.image.path).toBe(iconPath('serving'))
    expect(tray.tooltip).toBe('Garage: serving, 9.0 tok/s')
    expect(menuItem('status').label).toBe('Serving garage-tiny in eu-north')
    expect(api.requests.slice(0, 3).map((r) => `${r.method} ${r.path} ${r.authorized}`)).toEqual([
      'GET /status true', // setupDaemon's probe
      'GET /events true', // subscribe first ...
      'GET /status true', // ... then read, so no change in between is lost
    ])

    api.pushStats(21.25)
    await waitForView(ctx, (c) => c.store.view.tokensPerSecond === 21.25)
    expect(tray.tooltip).toBe('Garage: serving, 21.3 tok/s')

    api.pushState(statusOf('paused', { reason: 'game: eldenring.exe' }))
    await waitForView(ctx, (c) => c.store.state === 'paused')
    expect(tray.image.path).toBe(iconPath('paused'))
    expect(menuItem('status').label).toBe('Paused: eldenring.exe is running')
    expect(menuItem('resume').visible).toBe(true)
    expect(Notification.shown.map((n) => n.title)).toEqual(['Garage paused for your game'])

    // Resume from the menu goes to the daemon, whose state event flips the tray back.
    menuItem('resume').click?.()
    await waitForView(ctx, (c) => c.store.state === 'serving')
    expect(api.requests.some((r) => r.method === 'POST' && r.path === '/resume')).toBe(true)
    expect(Notification.shown).toHaveLength(1)
  })

  it('reconnects after the daemon drops the stream (restart: new port, new token)', async () => {
    api = await startStubControlApi({ dataDir: dir, status: statusOf('serving') })
    ctx = trayContext(dir)
    await setupDaemon(ctx, { run: systemctl('inactive') })
    setupState(ctx, { initialBackoffMs: 20, maxBackoffMs: 100 })
    await waitForView(ctx, (c) => c.store.state === 'serving')

    const old = api
    await old.close()
    // The process (this test's pid in control.json) lives on: the tray waits for it.
    await waitForView(ctx, (c) => c.store.view.status == null)
    expect(ctx.store.state).toBe('starting')
    api = await startStubControlApi({ dataDir: dir, status: statusOf('paused'), token: 'second-token' })
    await waitForView(ctx, (c) => c.store.state === 'paused')
    expect(api.requests.every((r) => r.authorized)).toBe(true)
  })

  it('the daemon goes away for good: stopped (its pid is gone)', async () => {
    api = await startStubControlApi({ dataDir: dir, status: statusOf('serving') })
    ctx = trayContext(dir)
    await setupDaemon(ctx, { run: systemctl('inactive') })
    setupState(ctx, { initialBackoffMs: 20, maxBackoffMs: 100 })
    await waitForView(ctx, (c) => c.store.state === 'serving')
    await writeFile(join(dir, 'control.json'), JSON.stringify({ url: api.url, pid: 2 ** 22 + 12345 }))
    await api.close()
    api = null
    await waitForView(ctx, (c) => c.store.state === 'stopped')
    expect(ctx.store.view.daemon).toBe('absent')
  })

  it('attaches to the systemd user service when it is active, and never stops it', async () => {
    const run = systemctl('active')
    ctx = trayContext(dir)
    const daemon = await setupDaemon(ctx, { run })
    expect(daemon.mode).toBe('service')
    expect(run.calls).toEqual([['systemctl', '--user', 'is-active', 'garage-node.service']])
    setupState(ctx, { initialBackoffMs: 20, maxBackoffMs: 100 })
    expect(ctx.store.state).toBe('starting')
    // The service comes up and writes control.json: the tray finds it.
    api = await startStubControlApi({ dataDir: dir, status: statusOf('serving') })
    await waitForView(ctx, (c) => c.store.state === 'serving')
    await ctx.shutdown()
    expect(run.calls.filter((c) => c.includes('stop'))).toEqual([])
    expect(existsSync(join(dir, 'argv.json'))).toBe(false)
  })

  it('a live daemon still busy starting is waited for, not doubled; a stale control.json is not', async () => {
    let asked = 0
    const busy = createServer((req, res) => {
      if (req.url === '/status' && ++asked > 2)
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(statusOf('starting')))
      else res.writeHead(503).end()
    })
    busy.listen(0, '127.0.0.1')
    await once(busy, 'listening')
    try {
      const url = `http://127.0.0.1:${(busy.address() as AddressInfo).port}`
      await writeFile(join(dir, 'control.token'), 'tok')
      await writeFile(join(dir, 'control.json'), JSON.stringify({ url, pid: process.pid }))
      ctx = trayContext(dir)
      const daemon = await setupDaemon(ctx, { run: systemctl('inactive'), patienceMs: 5_000 })
      expect(daemon.mode).toBe('attached')
      expect(asked).toBe(3)
    } finally {
      busy.closeAllConnections()
      busy.close()
    }
    // Nothing answers there any more: after its patience the tray treats the file as stale.
    await ctx.shutdown()
    ctx = trayContext(dir)
    const daemon = await setupDaemon(ctx, { run: systemctl('inactive'), patienceMs: 200 })
    expect(daemon.mode).toBe('none')
    expect(ctx.store.view.problem).toMatch(/^Garage is not set up/)
  })

  it('no daemon and no config: error, saying what to write where', async () => {
    ctx = trayContext(dir)
    const daemon = await setupDaemon(ctx, { run: systemctl('inactive') })
    expect(daemon.mode).toBe('none')
    expect(ctx.store.state).toBe('error')
    expect(ctx.store.view.problem).toBe(`Garage is not set up: put "authority" in ${join(dir, 'tray.json')}`)
  })
})

describe('daemon child: garage node started by the tray', () => {
  let dir: string
  let ctx: TrayContext | null = null
  beforeEach(async () => {
    resetElectron()
    dir = await mkdtemp(join(tmpdir(), 'garage-tray-child-'))
  })
  afterEach(async () => {
    await ctx?.shutdown()
    ctx = null
    await rm(dir, { recursive: true, force: true })
  })

  async function writeConfig(extra: Record<string, unknown> = {}): Promise<void> {
    await writeFile(
      join(dir, 'tray.json'),
      JSON.stringify({
        authority: '12D3KooWAuthority',
        bootstrap: ['/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWBoot'],
        region: 'eu-north',
        nodeArgs: ['--threads', '2'],
        command: [process.execPath, fakeGarage],
        ...extra,
      }),
    )
  }

  it('starts `garage node` with the configured authority and bootstrap, attaches, and stops it at quit', async () => {
    await writeConfig()
    const run = systemctl('inactive')
    ctx = trayContext(dir, { ...process.env })
    const daemon = await setupDaemon(ctx, { run })
    expect(daemon.mode).toBe('child')
    expect(ctx.store.view.daemon).toBe('starting')
    setupState(ctx, { initialBackoffMs: 50, maxBackoffMs: 200 })
    await waitForView(ctx, (c) => c.store.state === 'serving')
    expect(JSON.parse(await readFile(join(dir, 'argv.json'), 'utf8'))).toEqual([
      'node',
      '--authority',
      '12D3KooWAuthority',
      '--bootstrap',
      '/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWBoot',
      '--region',
      'eu-north',
      '--data-dir',
      dir,
      '--threads',
      '2',
    ])
    // Quit from the menu: the quit waits for the node to drain and exit, then happens.
    setupQuit(ctx)
    setupTray(ctx)
    setupMenu(ctx)
    menuItem('quit').click?.()
    expect(app.quitted).toBe(false)
    await vi.waitFor(() => expect(app.quitted).toBe(true))
    expect(app.quitRequests).toBe(2)
    expect(existsSync(join(dir, 'sigterm'))).toBe(true)
    expect(ctx.signal.aborted).toBe(true)
    expect(run.calls.filter((c) => c.includes('stop'))).toEqual([])
  })

  it('a node that fails: error with its last log line', async () => {
    await writeConfig()
    ctx = trayContext(dir, { ...process.env, FAKE_GARAGE_FAIL: 'no region answered: check --bootstrap' })
    setupNotifications(ctx)
    await setupDaemon(ctx, { run: systemctl('inactive') })
    await waitForView(ctx, (c) => c.store.state === 'error')
    expect(ctx.store.view.problem).toBe('the Garage node exited: no region answered: check --bootstrap')
    expect(Notification.shown).toMatchObject([
      {
        title: 'Garage has a problem',
        body: 'the Garage node exited: no region answered: check --bootstrap',
      },
    ])
    expect(await readFile(join(dir, 'tray-node.log'), 'utf8')).toContain('no region answered')
  })

  it('"Start Garage" from the menu starts a node after the config is written', async () => {
    ctx = trayContext(dir, { ...process.env })
    setupTray(ctx)
    setupMenu(ctx)
    await setupDaemon(ctx, { run: systemctl('inactive') })
    setupState(ctx, { initialBackoffMs: 50, maxBackoffMs: 200 })
    expect(ctx.store.state).toBe('error')
    expect(menuItem('start')).toMatchObject({ visible: true, enabled: true })
    await writeConfig()
    menuItem('start').click?.()
    await waitForView(ctx, (c) => c.store.state === 'serving')
    expect(ctx.daemon?.mode).toBe('child')
  })
})

describe('daemon helpers', () => {
  it('nodeArguments: config first, then GARAGE_AUTHORITY / GARAGE_BOOTSTRAP', () => {
    expect(nodeArguments({}, '/d', {})).toEqual({ missing: 'authority' })
    expect(nodeArguments({ authority: 'A' }, '/d', {})).toEqual({ missing: 'bootstrap' })
    expect(
      nodeArguments({}, '/d', { GARAGE_AUTHORITY: 'A', GARAGE_BOOTSTRAP: '/ip4/1/tcp/1, /ip4/2/tcp/2' }),
    ).toEqual({
      args: [
        'node',
        '--authority',
        'A',
        '--bootstrap',
        '/ip4/1/tcp/1',
        '--bootstrap',
        '/ip4/2/tcp/2',
        '--data-dir',
        '/d',
      ],
    })
  })

  it('garageCommand: the config, else the bundled code (pinned Node, bundled Node, or Electron as Node), else garage on PATH', () => {
    expect(
      garageCommand({ config: { command: ['/usr/bin/garage', '-x'] }, execPath: '/e', isElectron: true }),
    ).toEqual({ file: '/usr/bin/garage', args: ['-x'], env: {} })
    const pinned = garageCommand({ config: {}, execPath: '/e', isElectron: true })
    expect(pinned.file).toMatch(/node_modules\/node\/bin\/node$/)
    expect(pinned.args[0]).toMatch(/bin\/garage\.js$/)
    expect(pinned.env).toEqual({})
    // A packaged app: no node_modules/node, the Node it bundles in resources/node.
    const packaged = garageCommand({
      config: {},
      execPath: '/e',
      isElectron: true,
      repoNode: null,
      bundledNode: process.execPath,
    })
    expect(packaged).toMatchObject({ file: process.execPath, env: {} })
    const electron = garageCommand({
      config: {},
      execPath: '/e',
      isElectron: true,
      repoNode: null,
      bundledNode: null,
    })
    expect(electron.file).toBe('/e')
    expect(electron.env).toEqual({ ELECTRON_RUN_AS_NODE: '1' })
    expect(garageCommand({ config: {}, execPath: '/e', isElectron: true, repoBin: null })).toEqual({
      file: 'garage',
      args: [],
      env: {},
    })
  })

  it('isServiceActive: active and activating count, inactive and unknown do not', async () => {
    expect(await isServiceActive(systemctl('active'))).toBe(true)
    expect(await isServiceActive(systemctl('activating'))).toBe(true)
    expect(await isServiceActive(systemctl('inactive'))).toBe(false)
    expect(await isServiceActive(async () => ({ code: 127, stdout: '' }))).toBe(false)
  })
})
