import { Notification } from 'electron'
import type { TrayContext } from '../context.ts'
import { noticeFor, type TrayNotice } from '../state.ts'
import { iconPath } from './tray.ts'

/**
 * Desktop notifications for the changes that matter (state.ts noticeFor: a pause for a game, an
 * error) and for failed menu actions; clicking one opens the dashboard.
 */
export function setupNotifications(ctx: TrayContext): void {
  // Referenced until closed: a collected Notification loses its click handler.
  const open = new Set<Notification>()
  ctx.notify = (notice: TrayNotice) => {
    ctx.log.info(notice, 'notice')
    if (!Notification.isSupported()) return
    const n = new Notification({ title: notice.title, body: notice.body, icon: iconPath('serving', 2) })
    open.add(n)
    n.on('click', () => void ctx.openDashboard())
    n.on('close', () => open.delete(n))
    n.show()
  }
  const off = ctx.store.subscribe((view, prev, change) => {
    if (change !== 'state') return
    const notice = noticeFor(prev, view)
    if (notice != null) ctx.notify(notice)
  })
  ctx.onShutdown(off)
}
