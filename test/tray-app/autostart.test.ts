import { existsSync } from 'node:fs'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'
import {
  autostartFilePath,
  desktopEntry,
  desktopEntryEnabled,
  execArgument,
  launchCommand,
} from '../../tray-app/autostart.ts'
import { setupAutoLaunch } from '../../tray-app/setup/auto-launch.ts'
import { trayActions } from '../../tray-app/setup/menu.ts'
import { app, resetElectron } from './electron-fake.ts'
import { testContext } from './helpers.ts'

vi.mock('electron', () => import('./electron-fake.ts'))

/** The .desktop file's keys (the [Desktop Entry] group only has this one). */
function keys(text: string): Record<string, string> {
  const out: Record<string, string> = {}
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z0-9-]+)=(.*)$/.exec(line)
    if (m != null) out[m[1] as string] = m[2] as string
  }
  return out
}

describe('Linux auto-launch: ~/.config/autostart/garage.desktop', () => {
  let home: string
  beforeEach(async () => {
    resetElectron()
    home = await mkdtemp(join(tmpdir(), 'garage-tray-home-'))
  })
  afterEach(async () => {
    await rm(home, { recursive: true, force: true })
  })

  it('is written with Exec, Name and X-GNOME-Autostart-enabled under XDG_CONFIG_HOME, removed when turned off', async () => {
    const env = { HOME: home, XDG_CONFIG_HOME: join(home, 'xdg') }
    const ctx = testContext({ platform: 'linux', env })
    await setupAutoLaunch(ctx, { path: '/opt/Garage/garage-tray', args: [] })
    const file = join(home, 'xdg', 'autostart', 'garage.desktop')
    expect(ctx.startAtLogin).toBe(false)
    expect(existsSync(file)).toBe(false)

    await ctx.autoLaunch?.setEnabled(true)
    const text = await readFile(file, 'utf8')
    expect(text.split('\n')[0]).toBe('[Desktop Entry]')
    expect(keys(text)).toMatchObject({
      Type: 'Application',
      Name: 'Garage',
      Exec: '/opt/Garage/garage-tray',
      'X-GNOME-Autostart-enabled': 'true',
      Terminal: 'false',
    })
    expect(keys(text).Icon).toMatch(/tray-app\/assets\/tray-serving@2x\.png$/)
    expect(await ctx.autoLaunch?.isEnabled()).toBe(true)
    // Nothing goes through Electron's login items on Linux.
    expect(app.setLoginItemCalls).toEqual([])

    await ctx.autoLaunch?.setEnabled(false)
    expect(existsSync(file)).toBe(false)
    expect(await ctx.autoLaunch?.isEnabled()).toBe(false)
  })

  it('the menu checkbox writes the file and shows what is on disk', async () => {
    const env = { HOME: home }
    const ctx = testContext({ platform: 'linux', env })
    await setupAutoLaunch(ctx, { path: '/usr/bin/electron', args: ['/home/me/garage/tray-app/launch.mjs'] })
    let rebuilt = 0
    ctx.rebuildMenu = () => rebuilt++
    const file = join(home, '.config', 'autostart', 'garage.desktop')
    trayActions(ctx).setStartAtLogin(true)
    await vi.waitFor(() => expect(rebuilt).toBe(1))
    expect(ctx.startAtLogin).toBe(true)
    expect(keys(await readFile(file, 'utf8')).Exec).toBe(
      '/usr/bin/electron /home/me/garage/tray-app/launch.mjs',
    )

    // Read back at start: a second tray run sees the checkbox ticked.
    const again = testContext({ platform: 'linux', env })
    await setupAutoLaunch(again, { path: '/usr/bin/electron', args: [] })
    expect(again.startAtLogin).toBe(true)

    trayActions(ctx).setStartAtLogin(false)
    await vi.waitFor(() => expect(rebuilt).toBe(2))
    expect(ctx.startAtLogin).toBe(false)
    expect(existsSync(file)).toBe(false)
  })

  it('autostartFilePath: a relative XDG_CONFIG_HOME is ignored, as the XDG spec says', () => {
    expect(autostartFilePath({ XDG_CONFIG_HOME: '/x/conf' }, '/home/a')).toBe(
      '/x/conf/autostart/garage.desktop',
    )
    expect(autostartFilePath({ XDG_CONFIG_HOME: 'conf' }, '/home/a')).toBe(
      '/home/a/.config/autostart/garage.desktop',
    )
    expect(autostartFilePath({}, '/home/a')).toBe('/home/a/.config/autostart/garage.desktop')
  })

  it('Exec quotes and escapes per the Desktop Entry spec', () => {
    expect(execArgument('/opt/garage/tray')).toBe('/opt/garage/tray')
    expect(execArgument('/home/a b/Garage')).toBe('"/home/a b/Garage"')
    expect(execArgument('/opt/$HOME/x')).toBe('"/opt/\\\\$HOME/x"')
    expect(execArgument('C:\\x')).toBe('"C:\\\\\\\\x"')
    expect(execArgument('100%')).toBe('100%%')
    expect(execArgument('')).toBe('""')
    expect(() => execArgument('a\nb')).toThrow(/line break/)
    const text = desktopEntry({ path: '/home/a b/Garage.AppImage', args: ['--x'] })
    expect(keys(text).Exec).toBe('"/home/a b/Garage.AppImage" --x')
  })

  it('a file turned off by the desktop (Hidden, X-GNOME-Autostart-enabled=false) reads as off', () => {
    const on = desktopEntry({ path: '/a', args: [] })
    expect(desktopEntryEnabled(on)).toBe(true)
    expect(
      desktopEntryEnabled(on.replace('X-GNOME-Autostart-enabled=true', 'X-GNOME-Autostart-enabled=false')),
    ).toBe(false)
    expect(desktopEntryEnabled(`${on}Hidden=true\n`)).toBe(false)
  })

  it('launchCommand: the AppImage, the packaged executable, or Electron plus the script in development', () => {
    expect(
      launchCommand({
        execPath: '/tmp/.mount_x/garage',
        argv: ['/tmp/.mount_x/garage'],
        defaultApp: false,
        env: { APPIMAGE: '/home/a/Garage.AppImage' },
      }),
    ).toEqual({ path: '/home/a/Garage.AppImage', args: [] })
    expect(
      launchCommand({
        execPath: '/opt/Garage/garage',
        argv: ['/opt/Garage/garage', '--flag'],
        defaultApp: false,
        env: {},
      }),
    ).toEqual({ path: '/opt/Garage/garage', args: [] })
    expect(
      launchCommand({
        execPath: '/r/node_modules/electron/dist/electron',
        argv: ['/r/node_modules/electron/dist/electron', 'tray-app/launch.mjs'],
        defaultApp: true,
        env: {},
        cwd: '/r',
      }),
    ).toEqual({ path: '/r/node_modules/electron/dist/electron', args: ['/r/tray-app/launch.mjs'] })
  })
})

describe('macOS and Windows auto-launch: app.setLoginItemSettings', () => {
  beforeEach(() => resetElectron())

  it('macOS: openAtLogin on and off, read back for the checkbox', async () => {
    app.openAtLogin = true
    const ctx = testContext({ platform: 'darwin', env: {} })
    await setupAutoLaunch(ctx, { path: '/Applications/Garage.app/Contents/MacOS/Garage', args: [] })
    expect(ctx.startAtLogin).toBe(true)
    expect(app.getLoginItemCalls).toEqual([{}])
    await ctx.autoLaunch?.setEnabled(false)
    await ctx.autoLaunch?.setEnabled(true)
    expect(app.setLoginItemCalls).toEqual([{ openAtLogin: false }, { openAtLogin: true }])
  })

  it('Windows: the launch command (quoted args) is registered and compared', async () => {
    const ctx = testContext({ platform: 'win32', env: {} })
    const command = {
      path: 'C:\\Garage\\electron.exe',
      args: ['C:\\Users\\a b\\garage\\tray-app\\launch.mjs'],
    }
    await setupAutoLaunch(ctx, command)
    expect(ctx.startAtLogin).toBe(false)
    await ctx.autoLaunch?.setEnabled(true)
    const expected = {
      path: 'C:\\Garage\\electron.exe',
      args: ['"C:\\Users\\a b\\garage\\tray-app\\launch.mjs"'],
    }
    expect(app.setLoginItemCalls).toEqual([{ ...expected, openAtLogin: true }])
    expect(await ctx.autoLaunch?.isEnabled()).toBe(true)
    expect(app.getLoginItemCalls.at(-1)).toEqual(expected)
  })
})
