import { access, mkdir, mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { type Browser, chromium, type Page } from 'playwright-core'
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest'
import { type ControlServer, startControlServer } from '../../../daemon/control/server.ts'
import { StandInTarget } from './stand-in-target.ts'

const chromiumPath = '/usr/bin/chromium'
const artifactsDir = fileURLToPath(new URL('../../../test-artifacts/', import.meta.url))

describe('dashboard in headless Chromium', () => {
  let dir: string
  let server: ControlServer
  let target: StandInTarget
  let browser: Browser
  let page: Page
  const foreignRequests: string[] = []
  const pageErrors: string[] = []

  beforeAll(async () => {
    try {
      await access(chromiumPath)
    } catch {
      throw new Error(
        `Chromium is not at ${chromiumPath}: install it (apt-get install -y chromium) to run the dashboard tests`,
      )
    }
    dir = await mkdtemp(join(tmpdir(), 'garage-dashboard-'))
    target = new StandInTarget()
    server = await startControlServer(target, { dataDir: dir })
    browser = await chromium.launch({
      executablePath: chromiumPath,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    })
    page = await browser.newPage({ viewport: { width: 1100, height: 900 } })
    page.on('request', (req) => {
      if (!req.url().startsWith(`${server.url}/`)) foreignRequests.push(req.url())
    })
    page.on('pageerror', (err) => pageErrors.push(err.message))
    page.on('console', (msg) => {
      // A 400 the page asked for (the settings test) is logged as a failed resource; anything else is a fault.
      if (msg.type() === 'error' && !/status of 400/.test(msg.text())) pageErrors.push(msg.text())
    })
  })

  afterAll(async () => {
    await browser?.close()
    await server?.close()
    if (dir != null) await rm(dir, { recursive: true, force: true })
  })

  it('shows the live state, model, GPU and region; keeps the token out of the address', async () => {
    await page.goto(`${server.url}/#token=${encodeURIComponent(server.token)}`)
    await page.locator('#connection[data-live="yes"]').waitFor()
    await page.locator('#state[data-state="serving"]').waitFor()
    expect(await page.locator('#state').textContent()).toBe('Serving')
    expect(await page.locator('#model').textContent()).toBe('garage-tiny')
    expect(await page.locator('#region').textContent()).toBe('eu-north')
    expect(await page.locator('#gpu').textContent()).toContain('NVIDIA GeForce RTX 4070')
    expect(await page.locator('#tokens-today').textContent()).toBe((1_200).toLocaleString('en-US'))
    expect(new URL(page.url()).hash).toBe('')
    // A change the daemon makes on its own arrives over the event stream.
    target.setState({ state: 'paused', reason: 'game: cs2.exe' })
    await page.locator('#state[data-state="paused"]').waitFor()
    expect(await page.locator('#reason').textContent()).toBe('game: cs2.exe')
    target.setState({ state: 'serving', reason: null })
    await page.locator('#state[data-state="serving"]').waitFor()
    // The head quarantined the node: a banner says so, with the reason, until it is lifted.
    expect(await page.locator('#integrity').isVisible()).toBe(false)
    target.setState({ integrity: { state: 'quarantined', reason: '3 of 5 checked answers were unlikely' } })
    await page.locator('#integrity').waitFor({ state: 'visible' })
    expect(await page.locator('#integrity').textContent()).toBe(
      'Quarantined by the region: 3 of 5 checked answers were unlikely. No requests come and credits are held back; restart Garage to appeal.',
    )
    target.setState({ integrity: null })
    await page.locator('#integrity').waitFor({ state: 'hidden' })
  })

  it('updates tok/s and the chart from stats events', async () => {
    target.emitStats(42.5)
    await page.locator('#tps', { hasText: /^42\.5$/ }).waitFor()
    const now = Date.now()
    for (let i = 150; i >= 0; i--)
      target.emitStats(Math.round(30 + 20 * Math.sin(i / 12)), new Date(now - i * 1_000))
    const last = Math.round(30 + 20 * Math.sin(0))
    await page.waitForFunction(
      (v) => document.getElementById('chart')?.getAttribute('aria-label')?.endsWith(`now ${v}`),
      last,
    )
    expect(await page.locator('#tps').textContent()).toBe(String(last))
    // Something was drawn: the canvas holds non-transparent pixels.
    const painted = await page.evaluate(() => {
      const canvas = document.getElementById('chart') as HTMLCanvasElement
      const data = canvas.getContext('2d')!.getImageData(0, 0, canvas.width, canvas.height).data
      let n = 0
      for (let i = 3; i < data.length; i += 4) if (data[i]! > 0) n++
      return n
    })
    expect(painted).toBeGreaterThan(1_000)
  })

  it('Pause pauses the node for an hour and shows paused; Resume resumes', async () => {
    const before = target.pauseCalls.length
    await page.getByRole('button', { name: 'Pause for 1 hour' }).click()
    await vi.waitFor(() => expect(target.pauseCalls.length).toBe(before + 1))
    expect(target.pauseCalls.at(-1)).toEqual({ minutes: 60 })
    await page.locator('#state[data-state="paused"]').waitFor()
    expect(await page.locator('#state').textContent()).toBe('Paused')
    expect(await page.locator('#reason').textContent()).toMatch(/^paused by you · until /)
    await page.getByRole('button', { name: 'Resume' }).click()
    await page.locator('#state[data-state="serving"]').waitFor()
    expect(target.resumeCalls).toBe(1)
    await page.getByRole('button', { name: 'Pause for 1 hour' }).click()
    await page.locator('#state[data-state="paused"]').waitFor()
  })

  it('shows a bad setting inline, next to its field, and saves good ones', async () => {
    await page.getByLabel('GPU memory cap (MiB)').fill('5')
    await page.getByLabel('Schedule').fill('mon-fri 18-25')
    await page.getByRole('button', { name: 'Save settings' }).click()
    await page.locator('#vramCapMiB-error', { hasText: 'vramCapMiB must be a whole number' }).waitFor()
    expect(await page.locator('#schedule-error').textContent()).toContain('the end must be a whole hour')
    expect(await page.getByLabel('GPU memory cap (MiB)').getAttribute('aria-invalid')).toBe('true')
    expect(await page.locator('#settings-message').textContent()).toContain('Not saved')
    expect(target.settings().vramCapMiB).toBeNull()

    await page.getByLabel('GPU memory cap (MiB)').fill('8192')
    await page.getByLabel('Schedule').fill('mon-fri 18-23; sat,sun 10-24')
    await page.getByLabel('Games that pause the node').fill('cs2.exe\nFortniteClient-Win64-Shipping.exe')
    await page.getByLabel('Pause on battery power').uncheck()
    await page.getByRole('button', { name: 'Save settings' }).click()
    await page.locator('#settings-message', { hasText: 'Saved.' }).waitFor()
    expect(target.settings()).toMatchObject({
      vramCapMiB: 8192,
      games: ['cs2.exe', 'FortniteClient-Win64-Shipping.exe'],
      pauseOnBattery: false,
      schedule: [
        { days: [1, 2, 3, 4, 5], startHour: 18, endHour: 23 },
        { days: [0, 6], startHour: 10, endHour: 24 },
      ],
    })
    expect(await page.locator('#vramCapMiB-error').textContent()).toBe('')
    expect(await page.getByLabel('Schedule').inputValue()).toBe('mon-fri 18-23; sun,sat 10-24')
    // One last bad value, so the screenshot shows an inline error too.
    await page.getByLabel('Pause above GPU temperature (°C)').fill('300')
    await page.getByRole('button', { name: 'Save settings' }).click()
    await page.locator('#maxGpuTemperatureC-error', { hasText: 'maxGpuTemperatureC must be' }).waitFor()
  })

  it('writes a screenshot, made no request off its origin, and logged no errors', async () => {
    await mkdir(artifactsDir, { recursive: true })
    const path = join(artifactsDir, 'dashboard.png')
    await page.screenshot({ path, fullPage: true })
    expect((await stat(path)).size).toBeGreaterThan(10_000)
    expect(foreignRequests).toEqual([])
    expect(pageErrors).toEqual([])
  })

  it('says the token is missing or refused instead of showing stale numbers', async () => {
    const bare = await browser.newPage()
    try {
      await bare.goto(`${server.url}/`)
      await bare.locator('#auth-error', { hasText: 'needs the node’s access token' }).waitFor()
      await bare.goto(`${server.url}/#token=wrong-token-0000000000000000`)
      await bare.reload()
      await bare.locator('#auth-error', { hasText: 'refused' }).waitFor()
    } finally {
      await bare.close()
    }
  })
})
