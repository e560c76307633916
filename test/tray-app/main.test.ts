import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest'
import type { TrayMenuItem } from '../../tray-app/menu.ts'
import { iconPath } from '../../tray-app/setup/tray.ts'
import { app, resetElectron, Tray } from './electron-fake.ts'
import { statusOf } from './helpers.ts'
import { type StubControlApi, startStubControlApi } from './stub-control-api.ts'

vi.mock('electron', () => import('./electron-fake.ts'))

describe('tray-app/main.ts', () => {
  let dir: string
  let api: StubControlApi
  beforeAll(async () => {
    resetElectron()
    dir = await mkdtemp(join(tmpdir(), 'garage-tray-main-'))
    api = await startStubControlApi({ dataDir: dir, status: statusOf('serving', { tokensPerSecond: 4 }) })
    vi.stubEnv('GARAGE_DATA_DIR', dir)
    vi.stubEnv('GARAGE_LOG_LEVEL', 'silent')
    vi.stubEnv('XDG_CONFIG_HOME', join(dir, 'config'))
  })
  afterAll(async () => {
    vi.unstubAllEnvs()
    await api.close()
    await rm(dir, { recursive: true, force: true })
  })

  it('wires the modules: attaches to the daemon, shows it in the tray, quits cleanly', async () => {
    await import('../../tray-app/main.ts')
    await vi.waitFor(() => expect(Tray.instances[0]?.image.path).toBe(iconPath('serving')))
    const tray = Tray.instances[0] as Tray
    expect(tray.tooltip).toBe('Garage: serving, 4.0 tok/s')
    const template = (tray.menu?.template ?? []) as TrayMenuItem[]
    expect(template.map((i) => i.id).filter((id) => id != null)).toEqual([
      'status',
      'pause-hour',
      'pause-tomorrow',
      'resume',
      'start',
      'dashboard',
      'start-at-login',
      'quit',
    ])
    expect(app.listenerCount('second-instance')).toBe(1)
    expect(app.listenerCount('before-quit')).toBe(1)

    template.find((i) => i.id === 'pause-hour')?.click?.()
    await vi.waitFor(() => expect(tray.image.path).toBe(iconPath('paused')))

    app.quit()
    await vi.waitFor(() => expect(app.quitted).toBe(true))
    expect(tray.destroyed).toBe(true)
    expect(app.exitCode).toBeNull()
  })
})
