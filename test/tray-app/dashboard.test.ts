import { existsSync, readFileSync } from 'node:fs'
import { runInNewContext } from 'node:vm'
import { beforeEach, describe, expect, it, vi } from 'vitest'
import { isAllowedNavigation, preloadPath, setupDashboard } from '../../tray-app/setup/dashboard.ts'
import { app, BrowserWindow, preventable, resetElectron, shell } from './electron-fake.ts'
import { StandInClient, testContext } from './helpers.ts'

vi.mock('electron', () => import('./electron-fake.ts'))

describe('dashboard window', () => {
  beforeEach(() => resetElectron())

  it('loads the control URL with the token in the fragment, locked down', async () => {
    const client = new StandInClient()
    client.endpointValue = { url: 'http://127.0.0.1:45123', token: 'a b/c', pid: 1 }
    const ctx = testContext({ client })
    setupDashboard(ctx)
    expect(await ctx.openDashboard()).toBe(true)
    const win = BrowserWindow.instances[0] as BrowserWindow
    expect(win.loaded).toEqual(['http://127.0.0.1:45123/#token=a%20b%2Fc'])
    expect(win.options.webPreferences).toMatchObject({
      contextIsolation: true,
      nodeIntegration: false,
      sandbox: true,
      webviewTag: false,
      preload: preloadPath,
    })
    expect(win.shows).toBeGreaterThan(0)
    // A tray app does not quit when its last window closes.
    expect(app.listenerCount('window-all-closed')).toBe(1)

    // The preload exposes one frozen object through contextBridge and nothing else.
    expect(existsSync(preloadPath)).toBe(true)
    const exposed: Record<string, unknown> = {}
    const required: string[] = []
    const fakeRequire = (name: string): unknown => {
      required.push(name)
      return { contextBridge: { exposeInMainWorld: (key: string, value: unknown) => (exposed[key] = value) } }
    }
    runInNewContext(readFileSync(preloadPath, 'utf8'), { require: fakeRequire, Object })
    expect(required).toEqual(['electron'])
    expect(exposed).toEqual({ garageTray: { embedded: true } })
    expect(Object.isFrozen(exposed.garageTray)).toBe(true)

    const contents = win.webContents
    const inside = preventable({ url: 'http://127.0.0.1:45123/settings' })
    contents.emit('will-navigate', inside)
    expect(inside.defaultPrevented).toBe(false)
    for (const url of ['http://127.0.0.1:9999/', 'file:///etc/passwd', 'http://evil.example/']) {
      const away = preventable({ url })
      contents.emit('will-navigate', away)
      expect(away.defaultPrevented, url).toBe(true)
    }
    const redirect = preventable({ url: 'http://192.168.1.1/' })
    contents.emit('will-redirect', redirect)
    expect(redirect.defaultPrevented).toBe(true)
    // An https link leaves for the browser instead of replacing the dashboard.
    const docs = preventable({ url: 'https://garage.example/docs' })
    contents.emit('will-navigate', docs)
    expect(docs.defaultPrevented).toBe(true)
    expect(shell.opened).toEqual(['https://garage.example/docs'])

    expect(contents.windowOpenHandler?.({ url: 'https://garage.example/help' })).toEqual({ action: 'deny' })
    expect(contents.windowOpenHandler?.({ url: 'http://127.0.0.1:45123/x' })).toEqual({ action: 'deny' })
    expect(shell.opened).toEqual(['https://garage.example/docs', 'https://garage.example/help'])

    let granted: boolean | null = null
    contents.permissionHandler?.(contents, 'media', (g) => {
      granted = g
    })
    expect(granted).toBe(false)
  })

  it('reloads when the daemon restarted on another port, and is made anew after it was closed', async () => {
    const client = new StandInClient()
    const ctx = testContext({ client })
    setupDashboard(ctx)
    await ctx.openDashboard()
    const win = BrowserWindow.instances[0] as BrowserWindow
    client.endpointValue = { url: 'http://127.0.0.1:8888', token: 'tok-2', pid: null }
    await ctx.openDashboard()
    expect(win.loaded).toEqual(['http://127.0.0.1:7777/#token=tok-1', 'http://127.0.0.1:8888/#token=tok-2'])
    const moved = preventable({ url: 'http://127.0.0.1:7777/' })
    win.webContents.emit('will-navigate', moved)
    expect(moved.defaultPrevented).toBe(true)

    win.close()
    await ctx.openDashboard()
    expect(BrowserWindow.instances).toHaveLength(2)
    await ctx.shutdown()
    expect(BrowserWindow.instances[1]?.destroyed).toBe(true)
  })

  it('isAllowedNavigation compares origins', () => {
    expect(isAllowedNavigation('http://127.0.0.1:1/a#b', 'http://127.0.0.1:1')).toBe(true)
    expect(isAllowedNavigation('http://localhost:1/', 'http://127.0.0.1:1')).toBe(false)
    expect(isAllowedNavigation('https://127.0.0.1:1/', 'http://127.0.0.1:1')).toBe(false)
    expect(isAllowedNavigation('not a url', 'http://127.0.0.1:1')).toBe(false)
    expect(isAllowedNavigation('http://127.0.0.1:1/', null)).toBe(false)
  })
})
