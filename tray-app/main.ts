import { app, dialog } from 'electron'
import { createLogger } from '../core/logger.ts'
import { defaultDataDir } from '../core/paths.ts'
import { ControlClient } from '../daemon/control/client.ts'
import { createTrayContext } from './context.ts'
import { setupAutoLaunch } from './setup/auto-launch.ts'
import { setupDaemon } from './setup/daemon.ts'
import { setupDashboard } from './setup/dashboard.ts'
import { setupIdle } from './setup/idle.ts'
import { setupMenu } from './setup/menu.ts'
import { setupNotifications } from './setup/notifications.ts'
import { setupQuit } from './setup/quit.ts'
import { setupSingleInstance } from './setup/single-instance.ts'
import { setupState } from './setup/state.ts'
import { setupTray } from './setup/tray.ts'

/**
 * The Garage tray app's main process: small setupX modules sharing one context. The data dir is
 * the CLI's (--data-dir is not taken here: $GARAGE_DATA_DIR, else the OS's place).
 */
async function main(): Promise<void> {
  app.setName('Garage')
  const dataDir = defaultDataDir(process.env)
  const ctx = createTrayContext({
    dataDir,
    log: createLogger('garage-tray'),
    client: ControlClient.forDataDir(dataDir),
  })
  if (!setupSingleInstance(ctx)) return
  // Windows shows notifications only for an app with an AppUserModelID.
  if (process.platform === 'win32') app.setAppUserModelId('net.garage.tray')
  await app.whenReady()
  // A tray app: no dock icon on macOS.
  app.dock?.hide()
  setupQuit(ctx)
  setupNotifications(ctx)
  setupDashboard(ctx)
  setupTray(ctx)
  await setupAutoLaunch(ctx)
  setupMenu(ctx)
  await setupDaemon(ctx)
  setupState(ctx)
  setupIdle(ctx)
  ctx.log.info({ dataDir, mode: ctx.daemon?.mode }, 'tray ready')
}

main().catch((err: Error) => {
  dialog.showErrorBox('Garage could not start', err.stack ?? err.message)
  app.exit(1)
})
