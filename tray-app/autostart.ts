import { mkdir, readFile, rm, writeFile } from 'node:fs/promises'
import { homedir } from 'node:os'
import { dirname, isAbsolute, join, resolve } from 'node:path'

/** The command that starts this tray app again (at login, or from the .desktop file). */
export interface LaunchCommand {
  path: string
  args: string[]
}

export const autostartFileName = 'garage.desktop'

/**
 * How this process was started, as a command to run at login: a packaged app is its executable
 * (an AppImage is $APPIMAGE: process.execPath lives in a mount that is gone after exit); in
 * development (`electron tray-app/launch.mjs`, process.defaultApp) it is Electron plus the script.
 */
export function launchCommand(p: {
  execPath: string
  argv: readonly string[]
  defaultApp: boolean
  env: NodeJS.ProcessEnv
  cwd?: string
}): LaunchCommand {
  if (p.env.APPIMAGE != null && p.env.APPIMAGE !== '') return { path: p.env.APPIMAGE, args: [] }
  const script = p.argv[1]
  if (p.defaultApp && script != null && !script.startsWith('-'))
    return { path: p.execPath, args: [resolve(p.cwd ?? process.cwd(), script)] }
  return { path: p.execPath, args: [] }
}

/** `$XDG_CONFIG_HOME/autostart/garage.desktop` (an absolute XDG_CONFIG_HOME only, as the spec says), else ~/.config. */
export function autostartFilePath(env: NodeJS.ProcessEnv = process.env, home = homedir()): string {
  const xdg = env.XDG_CONFIG_HOME
  const base = xdg != null && isAbsolute(xdg) ? xdg : join(home, '.config')
  return join(base, 'autostart', autostartFileName)
}

// Characters that make the Desktop Entry spec require a quoted argument.
const reservedExecChars = /[\s"'\\><~|&;$*?#()`]/

/**
 * One Exec argument per the Desktop Entry spec: `%` doubled (field codes), quoted when it holds a
 * reserved character with `"` `` ` `` `$` `\` backslash-escaped inside the quotes; then the string
 * escaping of the whole value doubles every backslash (so a literal `$` is `\\$`).
 */
export function execArgument(arg: string): string {
  if (/[\n\r\0]/.test(arg))
    throw new Error(`cannot put a line break or NUL in a .desktop Exec: ${JSON.stringify(arg)}`)
  let a = arg.replaceAll('%', '%%')
  if (a === '' || reservedExecChars.test(a)) a = `"${a.replace(/["`$\\]/g, (c) => `\\${c}`)}"`
  return a.replace(/\\/g, '\\\\')
}

export function desktopEntry(command: LaunchCommand, options: { icon?: string } = {}): string {
  const lines = [
    '[Desktop Entry]',
    'Type=Application',
    'Version=1.0',
    'Name=Garage',
    'Comment=Serves LLM inference on your idle GPU and pauses when you play',
    `Exec=${[command.path, ...command.args].map(execArgument).join(' ')}`,
    ...(options.icon != null ? [`Icon=${options.icon.replace(/\\/g, '\\\\')}`] : []),
    'Terminal=false',
    'Categories=Utility;',
    'X-GNOME-Autostart-enabled=true',
  ]
  return `${lines.join('\n')}\n`
}

/** Enabled unless the file is missing, `Hidden=true` or `X-GNOME-Autostart-enabled=false`. */
export function desktopEntryEnabled(text: string): boolean {
  const value = (key: string): string | undefined =>
    new RegExp(`^${key}\\s*=\\s*(.*?)\\s*$`, 'm').exec(text)?.[1]?.toLowerCase()
  return value('Hidden') !== 'true' && value('X-GNOME-Autostart-enabled') !== 'false'
}

/** Start at login on Linux: the XDG autostart file, written on enable and removed on disable. */
export class LinuxAutostart {
  readonly file: string
  private readonly command: LaunchCommand
  private readonly icon: string | undefined

  constructor(options: { file: string; command: LaunchCommand; icon?: string }) {
    this.file = options.file
    this.command = options.command
    this.icon = options.icon
  }

  async isEnabled(): Promise<boolean> {
    try {
      return desktopEntryEnabled(await readFile(this.file, 'utf8'))
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false
      throw err
    }
  }

  async setEnabled(enabled: boolean): Promise<void> {
    if (!enabled) {
      await rm(this.file, { force: true })
      return
    }
    await mkdir(dirname(this.file), { recursive: true })
    await writeFile(this.file, desktopEntry(this.command, this.icon != null ? { icon: this.icon } : {}), {
      mode: 0o644,
    })
  }
}

/** The subset of Electron's Settings/LoginItemSettingsOptions this app passes. */
export interface LoginItemOptions {
  openAtLogin?: boolean
  path?: string
  args?: string[]
}

/**
 * app.setLoginItemSettings / getLoginItemSettings options. On Windows the entry is the command
 * (the args quoted, as Electron asks) and reading must pass the same path and args; macOS
 * registers the app bundle itself.
 */
export function loginItemOptions(platform: NodeJS.Platform, command: LaunchCommand): LoginItemOptions {
  if (platform !== 'win32') return {}
  return { path: command.path, args: command.args.map((a) => `"${a}"`) }
}
