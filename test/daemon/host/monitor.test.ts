import { Writable } from 'node:stream'
import { pino } from 'pino'
import { afterEach, describe, expect, it, vi } from 'vitest'
import type { NodeSettings } from '../../../daemon/control/types.ts'
import { HostPolicyMonitor } from '../../../daemon/host/monitor.ts'
import type { HostInput } from '../../../daemon/host/types.ts'
import { quietHost, settings } from './settings.ts'

const gaming = (): HostInput => {
  const input = quietHost()
  input.processes.push({ pid: 900, name: 'Cyberpunk2077.exe', ppid: 1 })
  return input
}

/** A monitor over a scripted host and a clock the test moves. */
function rig(init: { settings?: NodeSettings } = {}) {
  let t = Date.UTC(2025, 0, 6, 12)
  let host: HostInput | Error = quietHost()
  let s = init.settings ?? settings({ resumeAfterSeconds: 60 })
  const lines: Array<{ level: number; msg: string }> = []
  const logger = pino(
    { level: 'debug' },
    new Writable({
      write(chunk, _enc, done) {
        lines.push(JSON.parse(String(chunk)))
        done()
      },
    }),
  )
  const events: string[] = []
  const monitor = new HostPolicyMonitor({
    sample: async () => {
      if (host instanceof Error) throw host
      return host
    },
    settings: () => s,
    now: () => new Date(t),
    logger,
  })
  monitor.addEventListener('pause', (e) => events.push(`pause ${e.detail.reasons.join(', ')}`))
  monitor.addEventListener('resume', (e) => events.push(`resume after ${e.detail.clearForMs / 1000} s`))
  return {
    monitor,
    events,
    lines,
    set host(h: HostInput | Error) {
      host = h
    },
    set settings(v: NodeSettings) {
      s = v
    },
    /** Moves the clock to `seconds` after the start and samples once. */
    async at(seconds: number, h?: HostInput | Error) {
      t = Date.UTC(2025, 0, 6, 12) + seconds * 1000
      if (h != null) host = h
      return monitor.check()
    },
  }
}

describe('HostPolicyMonitor', () => {
  afterEach(() => {
    vi.useRealTimers()
  })

  it('pauses on the first sample that sees a game, without delay', async () => {
    const r = rig()
    expect((await r.at(0)).paused).toBe(false)
    const state = await r.at(0.5, gaming())
    expect(state).toMatchObject({ paused: true, reasons: ['game: Cyberpunk2077.exe'] })
    expect(r.events).toEqual(['pause game: Cyberpunk2077.exe'])
  })

  it('resumes only after the host has been clear for resumeAfterSeconds', async () => {
    const r = rig()
    await r.at(0, gaming())
    await r.at(10, quietHost()) // the game quit: the clear period starts here
    const waiting = await r.at(40)
    expect(waiting.paused).toBe(true)
    expect(waiting.resumeAt?.toISOString()).toBe(new Date(Date.UTC(2025, 0, 6, 12, 1, 10)).toISOString())
    await r.at(69.5)
    expect(r.events).toEqual(['pause game: Cyberpunk2077.exe'])
    expect((await r.at(70)).paused).toBe(false)
    expect(r.events).toEqual(['pause game: Cyberpunk2077.exe', 'resume after 60 s'])
  })

  it('a flicker during the clear period starts it again', async () => {
    const r = rig()
    await r.at(0, gaming())
    await r.at(1, quietHost())
    await r.at(50, quietHost())
    await r.at(50.5, gaming()) // the launcher restarted the game
    expect(r.monitor.current().resumeAt).toBeNull()
    await r.at(51, quietHost())
    expect((await r.at(110)).paused).toBe(true) // 59 s clear
    expect((await r.at(111)).paused).toBe(false)
    expect(r.events).toEqual(['pause game: Cyberpunk2077.exe', 'resume after 60 s'])
  })

  it('while paused the reasons follow the host; no second pause event', async () => {
    const r = rig({ settings: settings({ maxGpuTemperatureC: 80 }) })
    await r.at(0, gaming())
    const hot = quietHost({ gpu: { utilizationPct: 5, temperatureC: 83 } })
    expect((await r.at(1, hot)).reasons).toEqual(['temperature: 83 °C'])
    expect(r.events).toEqual(['pause game: Cyberpunk2077.exe'])
  })

  it('resumeAfterSeconds 0 resumes on the first clear sample', async () => {
    const r = rig({ settings: settings({ resumeAfterSeconds: 0 }) })
    await r.at(0, gaming())
    expect((await r.at(0.5, quietHost())).paused).toBe(false)
  })

  it('reads the settings on every sample: a game added to the list counts at once', async () => {
    const r = rig()
    const host = quietHost()
    host.processes.push({ pid: 901, name: 'MyIndieGame', ppid: 1 })
    expect((await r.at(0, host)).paused).toBe(false)
    r.settings = settings({ games: ['MyIndieGame.exe'] })
    expect((await r.at(0.5)).reasons).toEqual(['game: MyIndieGame'])
  })

  it('a failing sample is logged once and changes nothing, in either state', async () => {
    const r = rig({ settings: settings({ resumeAfterSeconds: 5 }) })
    await r.at(0, new Error('nvidia-smi exploded'))
    await r.at(1)
    expect(r.monitor.current().paused).toBe(false)
    await r.at(2, gaming())
    await r.at(3, quietHost())
    await r.at(10, new Error('still broken'))
    expect(r.monitor.current().paused).toBe(true) // clear for 7 s, but this sample proved nothing
    expect(r.lines.filter((l) => l.level === 40).map((l) => l.msg)).toEqual([
      'host sample failed; retrying every tick',
      'host sample failed; retrying every tick',
    ])
    expect((await r.at(10.5, quietHost())).paused).toBe(false)
    expect(r.lines.some((l) => l.msg === 'host sampling recovered')).toBe(true)
  })

  it('never runs two samples at once', async () => {
    let calls = 0
    let release: (h: HostInput) => void = () => {}
    const monitor = new HostPolicyMonitor({
      sample: () => {
        calls++
        return new Promise<HostInput>((resolve) => {
          release = resolve
        })
      },
      settings: () => settings(),
    })
    const a = monitor.check()
    const b = monitor.check()
    expect(calls).toBe(1)
    release(gaming())
    expect((await a).paused).toBe(true)
    expect(await b).toEqual(await a)
    const c = monitor.check()
    expect(calls).toBe(2)
    release(quietHost())
    await c
  })

  it('start() samples at once and every 500 ms; a game is seen within one interval; stop() ends it', async () => {
    vi.useFakeTimers({ now: Date.UTC(2025, 0, 6, 12) })
    let host = quietHost()
    const sampledAt: number[] = []
    const monitor = new HostPolicyMonitor({
      sample: async () => {
        sampledAt.push(Date.now())
        return host
      },
      settings: () => settings(),
    })
    let pausedAt: number | null = null
    monitor.addEventListener('pause', () => {
      pausedAt = Date.now()
    })
    monitor.start()
    monitor.start() // idempotent
    await vi.advanceTimersByTimeAsync(1_100)
    const t0 = Date.UTC(2025, 0, 6, 12)
    expect(sampledAt.map((t) => t - t0)).toEqual([0, 500, 1000])
    host = gaming()
    const gameStarted = Date.now()
    await vi.advanceTimersByTimeAsync(600)
    expect(pausedAt).not.toBeNull()
    expect(pausedAt! - gameStarted).toBeLessThanOrEqual(500)
    await monitor.stop()
    const count = sampledAt.length
    await vi.advanceTimersByTimeAsync(5_000)
    expect(sampledAt.length).toBe(count)
  })

  it('a slow sample delays the next tick instead of overlapping it', async () => {
    vi.useFakeTimers({ now: 0 })
    const spans: Array<[number, number]> = []
    const monitor = new HostPolicyMonitor({
      sample: async () => {
        const start = Date.now()
        await new Promise((resolve) => setTimeout(resolve, 800)) // slower than the interval
        spans.push([start, Date.now()])
        return quietHost()
      },
      settings: () => settings(),
    })
    monitor.start()
    await vi.advanceTimersByTimeAsync(3_000)
    const stopped = monitor.stop() // waits for the sample in flight
    await vi.advanceTimersByTimeAsync(1_000)
    await stopped
    for (let i = 1; i < spans.length; i++) expect(spans[i]![0]).toBeGreaterThanOrEqual(spans[i - 1]![1])
    expect(spans.length).toBeGreaterThanOrEqual(3)
  })
})
