import { powerMonitor } from 'electron'
import { ControlApiError } from '../../daemon/control/client.ts'
import type { TrayContext } from '../context.ts'

export const idleReportIntervalMs = 30_000

/**
 * Tells the daemon how long the user has been away (powerMonitor.getSystemIdleTime, seconds)
 * every 30 s and on each connect, as POST /idle { seconds }: the daemon's "work only when idle"
 * setting needs it and cannot see input itself when it runs as a service. A daemon without the
 * endpoint (404/405) gets no more reports until the tray reconnects to a daemon.
 */
export function setupIdle(ctx: TrayContext, options: { intervalMs?: number } = {}): void {
  let unsupported = false
  let sending = false
  const report = async (): Promise<void> => {
    if (sending || unsupported || ctx.store.view.status == null || ctx.signal.aborted) return
    sending = true
    const seconds = powerMonitor.getSystemIdleTime()
    try {
      await ctx.client.reportIdle(seconds, { signal: ctx.signal })
    } catch (err) {
      if (err instanceof ControlApiError && (err.status === 404 || err.status === 405)) {
        unsupported = true
        ctx.log.warn('this daemon has no POST /idle: idle reports stop until it restarts')
        return
      }
      ctx.log.debug({ err: (err as Error).message }, 'idle report not delivered')
    } finally {
      sending = false
    }
  }
  const timer = setInterval(() => void report(), options.intervalMs ?? idleReportIntervalMs)
  const off = ctx.store.subscribe((view, prev) => {
    if (prev.status == null && view.status != null) {
      unsupported = false
      void report()
    }
  })
  ctx.onShutdown(() => {
    clearInterval(timer)
    off()
  })
}
