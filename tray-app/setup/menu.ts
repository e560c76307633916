import { app, Menu } from 'electron'
import type { TrayContext } from '../context.ts'
import { buildMenuTemplate, type MenuActions } from '../menu.ts'

/** The menu's actions on the real daemon client; a failure becomes a notification. */
export function trayActions(ctx: TrayContext): MenuActions {
  const act = (what: string, work: () => Promise<unknown>): void => {
    work().catch((err: Error) => {
      ctx.log.warn({ err: err.message }, `could not ${what}`)
      ctx.notify({ title: `Garage could not ${what}`, body: err.message })
    })
  }
  return {
    pauseFor: (minutes) => act('pause', () => ctx.client.pause({ minutes })),
    pauseUntil: (until) => act('pause', () => ctx.client.pause({ until })),
    resume: () => act('resume', () => ctx.client.resume()),
    start: () => act('start the node', async () => ctx.daemon?.start()),
    openDashboard: () => act('open the dashboard', () => ctx.openDashboard()),
    setStartAtLogin: (enabled) =>
      act('change start at login', async () => {
        try {
          await ctx.autoLaunch?.setEnabled(enabled)
        } finally {
          ctx.startAtLogin = (await ctx.autoLaunch?.isEnabled().catch(() => enabled)) ?? false
          ctx.rebuildMenu()
        }
      }),
    quit: () => app.quit(),
  }
}

/** The tray's context menu, rebuilt from the view on every state change (not on the 1 Hz stats). */
export function setupMenu(ctx: TrayContext, actions: MenuActions = trayActions(ctx)): void {
  ctx.rebuildMenu = () => {
    if (ctx.tray == null) return
    const template = buildMenuTemplate(
      ctx.store.view,
      { startAtLogin: ctx.startAtLogin, canStart: ctx.daemon != null },
      actions,
    )
    ctx.tray.setContextMenu(Menu.buildFromTemplate(template))
  }
  const off = ctx.store.subscribe((_view, _prev, change) => {
    if (change === 'state') ctx.rebuildMenu()
  })
  ctx.onShutdown(off)
  ctx.rebuildMenu()
}
