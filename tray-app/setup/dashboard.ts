import { fileURLToPath } from 'node:url'
import { app, BrowserWindow, shell } from 'electron'
import { type ControlEndpoint, dashboardUrl } from '../../daemon/control/client.ts'
import type { TrayContext } from '../context.ts'

export const preloadPath = fileURLToPath(new URL('../preload.cjs', import.meta.url))

/** Only the daemon's own origin may be shown in the window. */
export function isAllowedNavigation(target: string, controlUrl: string | null): boolean {
  if (controlUrl == null) return false
  try {
    return new URL(target).origin === new URL(controlUrl).origin
  } catch {
    return false
  }
}

function isWebLink(target: string): boolean {
  try {
    return new URL(target).protocol === 'https:'
  } catch {
    return false
  }
}

/**
 * The dashboard window: the daemon's page at `http://127.0.0.1:PORT/#token=...`, sandboxed with
 * context isolation and no Node, a preload that exposes one frozen object, no permissions, no
 * navigation away from the control URL (https links open in the browser), no popups. Closing it
 * destroys it (a gamer's RAM matters more than a faster reopen); the app lives on in the tray.
 */
export function setupDashboard(ctx: TrayContext): void {
  let window: BrowserWindow | null = null
  let loaded: ControlEndpoint | null = null

  const guard = (event: { preventDefault(): void }, url: string): void => {
    if (isAllowedNavigation(url, loaded?.url ?? null)) return
    event.preventDefault()
    ctx.log.warn({ url }, 'dashboard navigation blocked')
    if (isWebLink(url)) void shell.openExternal(url)
  }

  const load = async (win: BrowserWindow, endpoint: ControlEndpoint): Promise<void> => {
    loaded = endpoint
    await win.loadURL(dashboardUrl(endpoint)).catch((err: Error) => {
      ctx.log.warn({ err: err.message }, 'the dashboard did not load')
    })
  }

  ctx.openDashboard = async () => {
    let endpoint: ControlEndpoint
    try {
      endpoint = await ctx.client.endpoint()
    } catch {
      return false
    }
    if (window != null && !window.isDestroyed()) {
      // A restarted daemon listens on another port with another token.
      if (loaded?.url !== endpoint.url || loaded.token !== endpoint.token) await load(window, endpoint)
      if (window.isMinimized()) window.restore()
      window.show()
      window.focus()
      return true
    }
    const win = new BrowserWindow({
      width: 1100,
      height: 760,
      minWidth: 640,
      minHeight: 480,
      title: 'Garage',
      show: false,
      autoHideMenuBar: true,
      webPreferences: {
        contextIsolation: true,
        nodeIntegration: false,
        sandbox: true,
        webSecurity: true,
        webviewTag: false,
        spellcheck: false,
        preload: preloadPath,
      },
    })
    window = win
    win.once('ready-to-show', () => {
      win.show()
      win.focus()
    })
    win.on('closed', () => {
      if (window === win) window = null
    })
    const contents = win.webContents
    contents.on('will-navigate', (event) => guard(event, event.url))
    contents.on('will-redirect', (event) => guard(event, event.url))
    contents.setWindowOpenHandler(({ url }) => {
      if (isWebLink(url) && !isAllowedNavigation(url, loaded?.url ?? null)) void shell.openExternal(url)
      return { action: 'deny' }
    })
    contents.session.setPermissionRequestHandler((_contents, _permission, callback) => callback(false))
    await load(win, endpoint)
    return true
  }

  // A tray app keeps running when its last window closes (without a listener Electron quits).
  app.on('window-all-closed', () => {})
  ctx.onShutdown(() => {
    if (window != null && !window.isDestroyed()) window.destroy()
    window = null
  })
}
