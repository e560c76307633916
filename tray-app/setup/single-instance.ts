import { app } from 'electron'
import type { TrayContext } from '../context.ts'

/**
 * One tray per user. A second launch (the user clicks the app again) quits at once; the first
 * instance hears 'second-instance' and shows the dashboard window. Returns false in the second.
 */
export function setupSingleInstance(ctx: TrayContext): boolean {
  if (!app.requestSingleInstanceLock()) {
    app.quit()
    return false
  }
  app.on('second-instance', () => {
    void ctx.openDashboard().then((opened) => {
      if (!opened) ctx.log.info('second launch: no daemon to show yet')
    })
  })
  return true
}
