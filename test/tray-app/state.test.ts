import { beforeEach, describe, expect, it, vi } from 'vitest'
import type { ControlState } from '../../daemon/control/types.ts'
import { setupNotifications } from '../../tray-app/setup/notifications.ts'
import {
  gameOf,
  initialView,
  noticeFor,
  TrayState,
  type TrayView,
  tooltip,
  trayStateFromStatus,
  trayStateOf,
  trayStates,
} from '../../tray-app/state.ts'
import { Notification, resetElectron } from './electron-fake.ts'
import { statusOf, testContext } from './helpers.ts'

vi.mock('electron', () => import('./electron-fake.ts'))

const view = (patch: Partial<TrayView>): TrayView => ({ ...initialView, daemon: 'running', ...patch })

describe('tray state', () => {
  it('is one frozen enum of five states', () => {
    expect(Object.isFrozen(TrayState)).toBe(true)
    expect([...trayStates].sort()).toEqual(['error', 'paused', 'serving', 'starting', 'stopped'])
    expect(() => {
      ;(TrayState as Record<string, string>).busy = 'busy'
    }).toThrow()
  })

  it('folds the daemon state into it', () => {
    const expected: Record<ControlState, TrayState> = {
      starting: 'starting',
      serving: 'serving',
      paused: 'paused',
      error: 'error',
      draining: 'stopped',
      stopping: 'stopped',
      stopped: 'stopped',
    }
    for (const [state, tray] of Object.entries(expected))
      expect(trayStateFromStatus(statusOf(state as ControlState)), state).toBe(tray)
  })

  it('without a status: looking or starting is "starting", no daemon is "stopped", a problem is "error"', () => {
    expect(trayStateOf(initialView)).toBe('starting')
    expect(trayStateOf(view({ daemon: 'starting' }))).toBe('starting')
    expect(trayStateOf(view({ daemon: 'absent' }))).toBe('stopped')
    expect(trayStateOf(view({ daemon: 'absent', problem: 'not set up' }))).toBe('error')
    expect(trayStateOf(view({ status: statusOf('serving'), problem: 'x' }))).toBe('error')
  })

  it('reads the game out of a pause reason', () => {
    expect(gameOf('game: FortniteClient-Win64-Shipping.exe')).toBe('FortniteClient-Win64-Shipping.exe')
    expect(gameOf('paused by you, game: cs2')).toBe('cs2')
    expect(gameOf('schedule')).toBeNull()
    expect(gameOf(null)).toBeNull()
  })

  it('tooltip: state and tok/s', () => {
    expect(tooltip(view({ status: statusOf('serving'), tokensPerSecond: 12.34 }))).toBe(
      'Garage: serving, 12.3 tok/s',
    )
    expect(tooltip(view({ status: statusOf('paused', { reason: 'game: cs2' }) }))).toBe(
      'Garage: paused (cs2)',
    )
    expect(tooltip(view({ daemon: 'absent' }))).toBe('Garage: not running')
  })
})

describe('notifications', () => {
  const serving = view({ status: statusOf('serving') })
  const game = view({ status: statusOf('paused', { reason: 'game: eldenring.exe' }) })

  it('paused for a game: notify, once per game', () => {
    expect(noticeFor(serving, game)).toEqual({
      title: 'Garage paused for your game',
      body: 'eldenring.exe is running: Garage stopped serving and freed the GPU. It resumes when the game closes.',
    })
    expect(
      noticeFor(game, view({ status: statusOf('paused', { reason: 'game: eldenring.exe' }) })),
    ).toBeNull()
    expect(noticeFor(game, view({ status: statusOf('paused', { reason: 'game: cs2' }) }))?.body).toMatch(
      /^cs2/,
    )
  })

  it('serving, starting, stopped and the user’s own pause: no notification', () => {
    expect(noticeFor(game, serving)).toBeNull()
    expect(noticeFor(initialView, serving)).toBeNull()
    expect(noticeFor(serving, view({ status: statusOf('starting') }))).toBeNull()
    expect(noticeFor(serving, view({ daemon: 'absent' }))).toBeNull()
    expect(noticeFor(serving, view({ status: statusOf('paused', { reason: 'paused by you' }) }))).toBeNull()
  })

  it('error: notify on entering it, not again while it lasts', () => {
    const failed = view({
      status: null,
      daemon: 'absent',
      problem: 'the Garage node exited: no region answered',
    })
    expect(noticeFor(serving, failed)).toEqual({
      title: 'Garage has a problem',
      body: 'the Garage node exited: no region answered',
    })
    expect(noticeFor(serving, view({ status: statusOf('error') }))?.title).toBe('Garage has a problem')
    expect(noticeFor(failed, { ...failed, problem: 'another' })).toBeNull()
  })

  describe('setupNotifications', () => {
    beforeEach(() => resetElectron())

    it('shows a desktop notification for a game pause and an error, none for serving or stats', () => {
      const ctx = testContext()
      setupNotifications(ctx)
      ctx.store.update({ status: statusOf('serving'), daemon: 'running' })
      ctx.store.setTokensPerSecond(30)
      expect(Notification.shown).toEqual([])
      ctx.store.update({ status: statusOf('paused', { reason: 'game: eldenring.exe' }) })
      expect(Notification.shown.map((n) => n.title)).toEqual(['Garage paused for your game'])
      ctx.store.update({ status: statusOf('serving') })
      ctx.store.update({ status: statusOf('error') })
      expect(Notification.shown.map((n) => n.title)).toEqual([
        'Garage paused for your game',
        'Garage has a problem',
      ])
    })

    it('stays quiet where the desktop has no notifications', () => {
      Notification.supported = false
      const ctx = testContext()
      setupNotifications(ctx)
      ctx.store.update({ status: statusOf('error'), daemon: 'running' })
      expect(Notification.shown).toEqual([])
    })
  })
})
