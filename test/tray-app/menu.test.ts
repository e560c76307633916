import { beforeEach, describe, expect, it, vi } from 'vitest'
import { buildMenuTemplate, type MenuActions, nextMorning, type TrayMenuItem } from '../../tray-app/menu.ts'
import { setupMenu } from '../../tray-app/setup/menu.ts'
import { setupTray } from '../../tray-app/setup/tray.ts'
import { initialView, type TrayView } from '../../tray-app/state.ts'
import { app, resetElectron, Tray } from './electron-fake.ts'
import { StandInClient, statusOf, testContext } from './helpers.ts'

vi.mock('electron', () => import('./electron-fake.ts'))

function spyActions(): MenuActions & { calls: string[]; args: unknown[] } {
  const calls: string[] = []
  const args: unknown[] = []
  return {
    calls,
    args,
    pauseFor: (m) => {
      calls.push('pauseFor')
      args.push(m)
    },
    pauseUntil: (d) => {
      calls.push('pauseUntil')
      args.push(d)
    },
    resume: () => calls.push('resume'),
    start: () => calls.push('start'),
    openDashboard: () => calls.push('openDashboard'),
    setStartAtLogin: (on) => {
      calls.push('setStartAtLogin')
      args.push(on)
    },
    quit: () => calls.push('quit'),
  }
}

const view = (patch: Partial<TrayView>): TrayView => ({ ...initialView, daemon: 'running', ...patch })
const now = new Date(2026, 10, 24, 21, 30)

function item(template: TrayMenuItem[], id: string): TrayMenuItem {
  const found = template.find((i) => i.id === id)
  if (found == null) throw new Error(`no item ${id}`)
  return found
}

/** id → [visible, enabled] for the items a user acts on. */
function shape(template: TrayMenuItem[]): Record<string, [boolean, boolean]> {
  const out: Record<string, [boolean, boolean]> = {}
  for (const i of template) if (i.id != null) out[i.id] = [i.visible !== false, i.enabled !== false]
  return out
}

describe('tray menu template', () => {
  const options = { startAtLogin: false, canStart: true, now, locale: 'en-GB' }

  it('serving: a status line, both pauses, no resume', () => {
    const t = buildMenuTemplate(view({ status: statusOf('serving') }), options, spyActions())
    expect(item(t, 'status')).toMatchObject({ label: 'Serving garage-tiny in eu-north', enabled: false })
    expect(item(t, 'pause-tomorrow').label).toBe('Pause until tomorrow 08:00')
    expect(shape(t)).toEqual({
      status: [true, false],
      'pause-hour': [true, true],
      'pause-tomorrow': [true, true],
      resume: [false, true],
      start: [false, true],
      dashboard: [true, true],
      'start-at-login': [true, true],
      quit: [true, true],
    })
    expect(t.map((i) => i.type ?? 'normal')).toContain('separator')
    expect(item(t, 'start-at-login')).toMatchObject({ type: 'checkbox', checked: false })
  })

  it('paused for a game: resume shown, the pauses hidden, the game named', () => {
    const t = buildMenuTemplate(
      view({ status: statusOf('paused', { reason: 'game: eldenring.exe' }) }),
      { ...options, startAtLogin: true },
      spyActions(),
    )
    expect(item(t, 'status').label).toBe('Paused: eldenring.exe is running')
    expect(shape(t)).toMatchObject({
      'pause-hour': [false, false],
      'pause-tomorrow': [false, false],
      resume: [true, true],
      start: [false, true],
      dashboard: [true, true],
    })
    expect(item(t, 'start-at-login').checked).toBe(true)
  })

  it('paused by the user until a time: the time is in the status line', () => {
    const until = new Date(2026, 10, 24, 22, 30)
    const t = buildMenuTemplate(
      view({ status: statusOf('paused', { reason: 'paused by you', pausedUntil: until.toISOString() }) }),
      options,
      spyActions(),
    )
    expect(item(t, 'status').label).toBe('Paused until 22:30')
    const tomorrow = new Date(2026, 10, 25, 8, 0)
    const t2 = buildMenuTemplate(
      view({ status: statusOf('paused', { reason: 'paused by you', pausedUntil: tomorrow.toISOString() }) }),
      options,
      spyActions(),
    )
    expect(item(t2, 'status').label).toBe('Paused until tomorrow 08:00')
  })

  it('starting: pauses allowed once connected, nothing to resume', () => {
    const t = buildMenuTemplate(view({ status: statusOf('starting') }), options, spyActions())
    expect(item(t, 'status').label).toBe('Starting: joining a region…')
    expect(shape(t)).toMatchObject({
      'pause-hour': [true, true],
      resume: [false, true],
      dashboard: [true, true],
    })
    // Not connected yet (the node was just spawned): everything that needs the daemon is disabled.
    const t2 = buildMenuTemplate(view({ daemon: 'starting' }), options, spyActions())
    expect(item(t2, 'status').label).toBe('Starting the Garage node…')
    expect(shape(t2)).toMatchObject({
      'pause-hour': [true, false],
      'pause-tomorrow': [true, false],
      dashboard: [true, false],
    })
  })

  it('error: the problem in the status line, start offered when no daemon answers', () => {
    const t = buildMenuTemplate(
      view({ daemon: 'absent', problem: 'the Garage node exited: no region answered' }),
      options,
      spyActions(),
    )
    expect(item(t, 'status').label).toBe('Error: the Garage node exited: no region answered')
    expect(shape(t)).toMatchObject({
      'pause-hour': [true, false],
      'pause-tomorrow': [true, false],
      resume: [false, false],
      start: [true, true],
      dashboard: [true, false],
      quit: [true, true],
    })
    // The daemon itself reports an error: it still answers, so the dashboard opens and start hides.
    const t2 = buildMenuTemplate(view({ status: statusOf('error') }), options, spyActions())
    expect(shape(t2)).toMatchObject({
      start: [false, true],
      dashboard: [true, true],
      'pause-hour': [true, false],
    })
  })

  it('stopped: start offered (disabled when the tray cannot start one)', () => {
    const t = buildMenuTemplate(view({ daemon: 'absent' }), options, spyActions())
    expect(item(t, 'status').label).toBe('Garage is not running')
    expect(shape(t)).toMatchObject({
      start: [true, true],
      'pause-hour': [true, false],
      resume: [false, false],
      dashboard: [true, false],
    })
    const t2 = buildMenuTemplate(view({ daemon: 'absent' }), { ...options, canStart: false }, spyActions())
    expect(shape(t2).start).toEqual([true, false])
    const draining = buildMenuTemplate(view({ status: statusOf('draining') }), options, spyActions())
    expect(item(draining, 'status').label).toBe('Stopping: finishing requests…')
  })

  it('clicks call the matching action', () => {
    const actions = spyActions()
    const serving = buildMenuTemplate(view({ status: statusOf('serving') }), options, actions)
    item(serving, 'pause-hour').click?.()
    item(serving, 'pause-tomorrow').click?.()
    item(serving, 'dashboard').click?.()
    item(serving, 'start-at-login').click?.()
    item(serving, 'quit').click?.()
    const paused = buildMenuTemplate(view({ status: statusOf('paused') }), options, actions)
    item(paused, 'resume').click?.()
    expect(actions.calls).toEqual([
      'pauseFor',
      'pauseUntil',
      'openDashboard',
      'setStartAtLogin',
      'quit',
      'resume',
    ])
    expect(actions.args[0]).toBe(60)
    expect((actions.args[1] as Date).getHours()).toBe(8)
    expect(actions.args[2]).toBe(true)
  })
})

describe('nextMorning', () => {
  it('is 08:00 the next day, or the coming 08:00 late at night (before 04:00)', () => {
    expect(nextMorning(new Date(2026, 10, 24, 21, 30))).toEqual(new Date(2026, 10, 25, 8, 0))
    expect(nextMorning(new Date(2026, 10, 25, 1, 15))).toEqual(new Date(2026, 10, 25, 8, 0))
    expect(nextMorning(new Date(2026, 10, 25, 3, 59))).toEqual(new Date(2026, 10, 25, 8, 0))
    expect(nextMorning(new Date(2026, 10, 25, 4, 0))).toEqual(new Date(2026, 10, 26, 8, 0))
    expect(nextMorning(new Date(2026, 10, 25, 7, 30))).toEqual(new Date(2026, 10, 26, 8, 0))
    expect(nextMorning(new Date(2026, 10, 25, 9, 0))).toEqual(new Date(2026, 10, 26, 8, 0))
    expect(nextMorning(new Date(2026, 11, 31, 23, 0))).toEqual(new Date(2027, 0, 1, 8, 0))
  })
})

describe('setupMenu', () => {
  beforeEach(() => resetElectron())

  function menuOf(tray: Tray): TrayMenuItem[] {
    return (tray.menu?.template ?? []) as TrayMenuItem[]
  }

  it('is rebuilt on state changes, not on stats; clicks reach the daemon client and the app', async () => {
    const client = new StandInClient()
    const ctx = testContext({ client })
    setupTray(ctx)
    setupMenu(ctx)
    const tray = Tray.instances[0] as Tray
    expect(item(menuOf(tray), 'status').label).toBe('Looking for the Garage node…')

    ctx.store.update({ status: statusOf('serving'), daemon: 'running' })
    const serving = tray.menu
    expect(item(menuOf(tray), 'status').label).toBe('Serving garage-tiny in eu-north')
    ctx.store.setTokensPerSecond(41.5)
    expect(tray.menu).toBe(serving)
    expect(tray.tooltip).toBe('Garage: serving, 41.5 tok/s')

    item(menuOf(tray), 'pause-hour').click?.()
    item(menuOf(tray), 'pause-tomorrow').click?.()
    ctx.store.update({ status: statusOf('paused', { reason: 'paused by you' }) })
    expect(item(menuOf(tray), 'resume').visible).toBe(true)
    item(menuOf(tray), 'resume').click?.()
    await Promise.resolve()
    expect(client.calls.map((c) => c.method)).toEqual(['pause', 'pause', 'resume'])
    expect(client.calls[0]?.args[0]).toEqual({ minutes: 60 })
    const until = (client.calls[1]!.args[0] as { until: Date }).until
    expect(until.getHours()).toBe(8)
    expect(until.getTime()).toBeGreaterThan(Date.now())

    item(menuOf(tray), 'quit').click?.()
    expect(app.quitRequests).toBe(1)
  })

  it('a failed action becomes a notification', async () => {
    const client = new StandInClient()
    client.resume = async () => {
      throw new Error('POST /resume: HTTP 409 the node is stopping')
    }
    const ctx = testContext({ client })
    const notices: string[] = []
    ctx.notify = (n) => notices.push(`${n.title}: ${n.body}`)
    setupTray(ctx)
    setupMenu(ctx)
    ctx.store.update({ status: statusOf('paused'), daemon: 'running' })
    item(menuOf(Tray.instances[0] as Tray), 'resume').click?.()
    await new Promise((r) => setImmediate(r))
    expect(notices).toEqual(['Garage could not resume: POST /resume: HTTP 409 the node is stopping'])
  })
})
