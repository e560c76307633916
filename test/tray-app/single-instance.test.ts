import { beforeEach, describe, expect, it, vi } from 'vitest'
import { setupDashboard } from '../../tray-app/setup/dashboard.ts'
import { setupSingleInstance } from '../../tray-app/setup/single-instance.ts'
import { app, BrowserWindow, resetElectron } from './electron-fake.ts'
import { StandInClient, testContext } from './helpers.ts'

vi.mock('electron', () => import('./electron-fake.ts'))

describe('single instance', () => {
  beforeEach(() => resetElectron())

  it('a second instance quits at once and sets nothing up', () => {
    app.singleInstanceLock = false
    const ctx = testContext()
    expect(setupSingleInstance(ctx)).toBe(false)
    expect(app.quitRequests).toBe(1)
    expect(app.quitted).toBe(true)
    expect(app.listenerCount('second-instance')).toBe(0)
  })

  it('the first instance shows and focuses the dashboard when another launch happens', async () => {
    const client = new StandInClient()
    const ctx = testContext({ client })
    expect(setupSingleInstance(ctx)).toBe(true)
    expect(app.quitRequests).toBe(0)
    setupDashboard(ctx)

    const opened = new Promise<void>((resolve) => {
      const check = (): void => {
        if (BrowserWindow.instances[0]?.focuses === 1) resolve()
        else setImmediate(check)
      }
      check()
    })
    app.emit('second-instance', {}, ['garage-tray'], '/home/user', {})
    await opened
    const win = BrowserWindow.instances[0] as BrowserWindow
    expect(win.loaded).toEqual(['http://127.0.0.1:7777/#token=tok-1'])

    // Minimised or behind other windows: a further launch brings the same window back.
    win.minimized = true
    await ctx.openDashboard()
    app.emit('second-instance', {}, ['garage-tray'], '/home/user', {})
    await vi.waitFor(() => expect(win.focuses).toBe(3))
    expect(win.minimized).toBe(false)
    expect(BrowserWindow.instances).toHaveLength(1)
    expect(win.loaded).toHaveLength(1)
  })

  it('with no daemon to show, a second launch opens nothing', async () => {
    const client = new StandInClient()
    client.endpointValue = null
    const ctx = testContext({ client })
    setupSingleInstance(ctx)
    setupDashboard(ctx)
    expect(await ctx.openDashboard()).toBe(false)
    app.emit('second-instance', {}, [], '/', {})
    await new Promise((r) => setImmediate(r))
    expect(BrowserWindow.instances).toHaveLength(0)
  })
})
