import { readFileSync } from 'node:fs'
import { beforeEach, describe, expect, it, vi } from 'vitest'
import { crc32, decodePng, drawIcon, encodePng, iconFiles } from '../../tray-app/assets/make-icons.ts'
import { assetsDir, iconPath, setupTray } from '../../tray-app/setup/tray.ts'
import { trayStates } from '../../tray-app/state.ts'
import { resetElectron, Tray } from './electron-fake.ts'
import { statusOf, testContext } from './helpers.ts'

vi.mock('electron', () => import('./electron-fake.ts'))

describe('tray icons', () => {
  it('the PNG encoder writes what a decoder reads back, with valid CRCs', () => {
    expect(crc32(Buffer.from('IEND'))).toBe(0xae426082)
    const rgba = new Uint8Array(3 * 2 * 4).map((_, i) => (i * 37) % 256)
    const png = encodePng(3, 2, rgba)
    expect(png.subarray(0, 8)).toEqual(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))
    expect(decodePng(png)).toEqual({ width: 3, height: 2, rgba })
    const broken = Buffer.from(png)
    broken[20] = (broken[20] as number) ^ 0xff
    expect(() => decodePng(broken)).toThrow(/bad CRC/)
  })

  it('a 16 px and a 32 px icon per state are committed and match make-icons.ts', () => {
    expect(iconFiles().map((f) => f.name)).toHaveLength(trayStates.length * 2)
    for (const { name, state, size } of iconFiles()) {
      const png = decodePng(readFileSync(`${assetsDir}${name}`))
      expect([png.width, png.height], name).toEqual([size, size])
      expect(
        Buffer.from(png.rgba).equals(Buffer.from(drawIcon(state, size))),
        `${name} is stale: run make-icons.ts`,
      ).toBe(true)
      // Not blank, not a full square: a shape on a transparent background.
      const alpha = png.rgba.filter((_, i) => i % 4 === 3)
      expect(alpha.some((a) => a === 0) && alpha.some((a) => a === 255), name).toBe(true)
    }
  })

  describe('setupTray', () => {
    beforeEach(() => resetElectron())

    it('switches the icon with the state and keeps the tooltip current', async () => {
      const ctx = testContext()
      setupTray(ctx)
      const tray = Tray.instances[0] as Tray
      expect(tray.image.path).toBe(iconPath('starting'))
      ctx.store.update({ status: statusOf('serving'), daemon: 'running' })
      expect(tray.image.path).toBe(iconPath('serving'))
      ctx.store.update({ status: statusOf('paused', { reason: 'game: cs2' }) })
      expect(tray.image.path).toBe(iconPath('paused'))
      expect(tray.tooltip).toBe('Garage: paused (cs2)')
      ctx.store.update({ status: null, daemon: 'absent' })
      expect(tray.image.path).toBe(iconPath('stopped'))
      ctx.store.update({ problem: 'broken' })
      expect(tray.image.path).toBe(iconPath('error'))
      await ctx.shutdown()
      expect(tray.destroyed).toBe(true)
      expect(ctx.tray).toBeNull()
    })
  })
})
