import { app } from 'electron'
import {
  autostartFilePath,
  type LaunchCommand,
  LinuxAutostart,
  launchCommand,
  loginItemOptions,
} from '../autostart.ts'
import type { TrayContext } from '../context.ts'
import { iconPath } from './tray.ts'

/**
 * "Start at login": app.setLoginItemSettings on macOS and Windows, the XDG autostart file
 * `~/.config/autostart/garage.desktop` on Linux. Reads the current setting for the checkbox.
 */
export async function setupAutoLaunch(ctx: TrayContext, command?: LaunchCommand): Promise<void> {
  const launch =
    command ??
    launchCommand({
      execPath: process.execPath,
      argv: process.argv,
      defaultApp: process.defaultApp === true,
      env: ctx.env,
    })
  if (ctx.platform === 'linux') {
    const file = autostartFilePath(ctx.env, ctx.env.HOME)
    ctx.autoLaunch = new LinuxAutostart({ file, command: launch, icon: iconPath('serving', 2) })
  } else if (ctx.platform === 'darwin' || ctx.platform === 'win32') {
    const options = loginItemOptions(ctx.platform, launch)
    ctx.autoLaunch = {
      isEnabled: async () => app.getLoginItemSettings(options).openAtLogin,
      setEnabled: async (enabled) => app.setLoginItemSettings({ ...options, openAtLogin: enabled }),
    }
  } else {
    ctx.autoLaunch = null
  }
  ctx.startAtLogin = (await ctx.autoLaunch?.isEnabled().catch(() => false)) ?? false
}
