import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { nativeImage, Tray } from 'electron'
import type { TrayContext } from '../context.ts'
import { type TrayState, tooltip, trayStateOf } from '../state.ts'

export const assetsDir = fileURLToPath(new URL('../assets/', import.meta.url))

/** `tray-<state>.png` (16 px); Electron picks `tray-<state>@2x.png` (32 px) beside it on HiDPI screens. */
export function iconPath(state: TrayState, scale: 1 | 2 = 1): string {
  return join(assetsDir, `tray-${state}${scale === 2 ? '@2x' : ''}.png`)
}

/** The tray icon: its image follows the state, its tooltip the state and tok/s. */
export function setupTray(ctx: TrayContext): void {
  let shownState = trayStateOf(ctx.store.view)
  let shownTooltip = tooltip(ctx.store.view)
  const tray = new Tray(nativeImage.createFromPath(iconPath(shownState)))
  tray.setToolTip(shownTooltip)
  ctx.tray = tray
  // Windows users expect a left click to open the app; elsewhere a click opens the menu.
  if (ctx.platform === 'win32') tray.on('click', () => void ctx.openDashboard())
  const off = ctx.store.subscribe((view) => {
    const state = trayStateOf(view)
    if (state !== shownState) {
      shownState = state
      tray.setImage(nativeImage.createFromPath(iconPath(state)))
    }
    const text = tooltip(view)
    if (text !== shownTooltip) {
      shownTooltip = text
      tray.setToolTip(text)
    }
  })
  ctx.onShutdown(() => {
    off()
    ctx.tray = null
    tray.destroy()
  })
}
