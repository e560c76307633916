import { app } from 'electron'
import type { TrayContext } from '../context.ts'

/**
 * Quitting (the menu, the OS) first runs ctx.shutdown: the event stream and timers stop, the
 * window closes, the node this tray started drains and exits. Then the app really quits.
 */
export function setupQuit(ctx: TrayContext): void {
  let finished = false
  app.on('before-quit', (event) => {
    if (finished) return
    event.preventDefault()
    void ctx.shutdown().finally(() => {
      finished = true
      app.quit()
    })
  })
}
