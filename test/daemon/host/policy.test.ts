import { describe, expect, it } from 'vitest'
import { evaluateHost, inSchedule } from '../../../daemon/host/policy.ts'
import { quietHost, settings } from './settings.ts'

// Local time, so the tests hold in any time zone. 2025-01-06 is a Monday (day 1).
const at = (day: number, hour: number, minute = 0): Date => new Date(2025, 0, 5 + day, hour, minute)
const monday10 = at(1, 10)

describe('evaluateHost', () => {
  it('a quiet host with our engine busy on the GPU does not pause', () => {
    const input = quietHost({ gpu: { utilizationPct: 97, temperatureC: 70 } })
    expect(evaluateHost(input, settings(), monday10)).toEqual({ pause: false, reasons: [] })
  })

  it('a listed game pauses, named as the process says', () => {
    const input = quietHost()
    input.processes.push({ pid: 900, name: 'FortniteClient-Win64-Shipping.exe', ppid: 200 })
    expect(evaluateHost(input, settings(), monday10)).toEqual({
      pause: true,
      reasons: ['game: FortniteClient-Win64-Shipping.exe'],
    })
  })

  it("the user's own games pause too", () => {
    const input = quietHost()
    input.processes.push({ pid: 900, name: 'MyIndieGame', ppid: 1 })
    expect(evaluateHost(input, settings(), monday10).pause).toBe(false)
    expect(evaluateHost(input, settings({ games: ['myindiegame.exe'] }), monday10).reasons).toEqual([
      'game: MyIndieGame',
    ])
  })

  it('another heavy compute app on the GPU pauses; our engine, its children and the desktop do not', () => {
    const input = quietHost()
    input.processes.push(
      { pid: 501, name: 'python3', ppid: 500 },
      { pid: 502, name: 'ray::worker', ppid: 501 },
    )
    input.gpuApps.push(
      { pid: 502, name: 'ray::worker', usedMemoryMiB: 12000 },
      { pid: 301, name: '/usr/bin/gnome-shell', usedMemoryMiB: 96 },
      { pid: 302, name: '/usr/bin/firefox', usedMemoryMiB: 120 },
    )
    expect(evaluateHost(input, settings(), monday10).pause).toBe(false)

    input.gpuApps.push({ pid: 700, name: '/opt/blender/blender', usedMemoryMiB: 3000 })
    expect(evaluateHost(input, settings(), monday10).reasons).toEqual(['gpu-busy: blender'])
  })

  it('a foreign compute app of unknown size counts (Windows prints [N/A])', () => {
    const input = quietHost({
      gpuApps: [
        { pid: 700, name: 'C:\\Tools\\ComfyUI\\python.exe', usedMemoryMiB: null },
        { pid: 701, name: '[Insufficient Permissions]', usedMemoryMiB: null },
      ],
    })
    expect(evaluateHost(input, settings(), monday10).reasons).toEqual([
      'gpu-busy: python.exe',
      'gpu-busy: pid 701',
    ])
  })

  it('a game that also holds a compute context is reported once, as a game', () => {
    const input = quietHost()
    input.processes.push({ pid: 900, name: 'cs2', ppid: 1 })
    input.gpuApps.push({ pid: 900, name: '/games/cs2', usedMemoryMiB: 4000 })
    expect(evaluateHost(input, settings(), monday10).reasons).toEqual(['game: cs2'])
  })

  it('GPU utilisation above 30% pauses only while no engine of ours runs', () => {
    // Paused: our engine is stopped, only the desktop holds a context.
    const stopped = (utilizationPct: number) =>
      quietHost({
        ourPids: new Set(),
        gpu: { utilizationPct, temperatureC: 50 },
        gpuApps: [{ pid: 300, name: '/usr/lib/xorg/Xorg', usedMemoryMiB: 412 }],
      })
    expect(evaluateHost(stopped(30), settings(), monday10).pause).toBe(false)
    const busy = stopped(64.4)
    expect(evaluateHost(busy, settings(), monday10).reasons).toEqual(['gpu-busy: 64% utilization'])
    expect(
      evaluateHost(quietHost({ gpu: { utilizationPct: 99, temperatureC: 50 } }), settings(), monday10).pause,
    ).toBe(false)
  })

  it('battery pauses only when the setting says so; unknown does not', () => {
    expect(evaluateHost(quietHost({ onBattery: true }), settings(), monday10).pause).toBe(false)
    expect(
      evaluateHost(quietHost({ onBattery: true }), settings({ pauseOnBattery: true }), monday10).reasons,
    ).toEqual(['battery'])
    expect(
      evaluateHost(quietHost({ onBattery: null }), settings({ pauseOnBattery: true }), monday10).pause,
    ).toBe(false)
  })

  it('temperature above the cap pauses; when paused it clears only 5 °C below', () => {
    const s = settings({ maxGpuTemperatureC: 85 })
    const hot = (t: number) => quietHost({ gpu: { utilizationPct: 90, temperatureC: t } })
    expect(evaluateHost(hot(85), s, monday10).pause).toBe(false)
    expect(evaluateHost(hot(87), s, monday10).reasons).toEqual(['temperature: 87 °C'])
    expect(evaluateHost(hot(82), s, monday10, { paused: true }).reasons).toEqual(['temperature: 82 °C'])
    expect(evaluateHost(hot(80), s, monday10, { paused: true }).pause).toBe(false)
    expect(evaluateHost(hot(120), settings(), monday10).pause).toBe(false)
    expect(evaluateHost(quietHost({ gpu: null }), s, monday10).pause).toBe(false)
  })

  it('idle-only mode pauses until the user has been away long enough; unknown idle time pauses', () => {
    const s = settings({ idleOnlyMinutes: 10 })
    expect(evaluateHost(quietHost({ idleSeconds: 599 }), s, monday10).reasons).toEqual(['not-idle'])
    expect(evaluateHost(quietHost({ idleSeconds: 600 }), s, monday10).pause).toBe(false)
    expect(evaluateHost(quietHost({ idleSeconds: null }), s, monday10).reasons).toEqual([
      'not-idle: idle time unknown',
    ])
    expect(evaluateHost(quietHost({ idleSeconds: null }), settings(), monday10).pause).toBe(false)
  })

  it('outside the schedule pauses, and every reason that holds is listed in order', () => {
    const input = quietHost({
      onBattery: true,
      gpu: { utilizationPct: 10, temperatureC: 90 },
      idleSeconds: 5,
    })
    input.processes.push({ pid: 900, name: 'eldenring.exe', ppid: 1 })
    input.gpuApps.push({ pid: 901, name: 'blender', usedMemoryMiB: 2048 })
    const s = settings({
      schedule: [{ days: [1], startHour: 22, endHour: 6 }],
      pauseOnBattery: true,
      maxGpuTemperatureC: 80,
      idleOnlyMinutes: 5,
    })
    expect(evaluateHost(input, s, monday10).reasons).toEqual([
      'game: eldenring.exe',
      'gpu-busy: blender',
      'battery',
      'schedule',
      'temperature: 90 °C',
      'not-idle',
    ])
  })
})

describe('inSchedule', () => {
  it('an empty schedule always allows', () => {
    expect(inSchedule([], at(0, 0))).toBe(true)
    expect(inSchedule([], at(3, 23, 59))).toBe(true)
  })

  it('start hour inclusive, end hour exclusive, only on the listed days', () => {
    const office = [{ days: [1, 2, 3, 4, 5], startHour: 9, endHour: 17 }]
    expect(inSchedule(office, at(1, 8, 59))).toBe(false)
    expect(inSchedule(office, at(1, 9, 0))).toBe(true)
    expect(inSchedule(office, at(1, 16, 59))).toBe(true)
    expect(inSchedule(office, at(1, 17, 0))).toBe(false)
    expect(inSchedule(office, at(6, 10))).toBe(false)
    expect(inSchedule(office, at(0, 10))).toBe(false)
  })

  it('a window crossing midnight runs from the listed evening into the next morning', () => {
    const nights = [{ days: [5], startHour: 22, endHour: 6 }] // Friday night
    expect(inSchedule(nights, at(5, 21, 59))).toBe(false)
    expect(inSchedule(nights, at(5, 22))).toBe(true)
    expect(inSchedule(nights, at(5, 23, 59))).toBe(true)
    expect(inSchedule(nights, at(6, 0))).toBe(true) // Saturday morning: Friday's window
    expect(inSchedule(nights, at(6, 5, 59))).toBe(true)
    expect(inSchedule(nights, at(6, 6))).toBe(false)
    expect(inSchedule(nights, at(6, 22))).toBe(false) // Saturday evening is not listed
    expect(inSchedule(nights, at(5, 3))).toBe(false) // Friday early morning belongs to Thursday
  })

  it('Saturday night runs into Sunday morning across the week boundary', () => {
    const saturday = [{ days: [6], startHour: 20, endHour: 2 }]
    expect(inSchedule(saturday, at(7, 1, 30))).toBe(true) // 2025-01-12, a Sunday
    expect(inSchedule(saturday, at(0, 1, 30))).toBe(true) // 2025-01-05, a Sunday
    expect(inSchedule(saturday, at(0, 2))).toBe(false)
  })

  it('end hour 24 runs to midnight; 0 to 24 is the whole day; start equal to end is empty', () => {
    expect(inSchedule([{ days: [1], startHour: 18, endHour: 24 }], at(1, 23, 59))).toBe(true)
    expect(inSchedule([{ days: [1], startHour: 18, endHour: 24 }], at(2, 0))).toBe(false)
    const allDay = [{ days: [1], startHour: 0, endHour: 24 }]
    expect(inSchedule(allDay, at(1, 0))).toBe(true)
    expect(inSchedule(allDay, at(1, 23, 59))).toBe(true)
    expect(inSchedule(allDay, at(2, 0))).toBe(false)
    expect(inSchedule(allDay, at(0, 23, 59))).toBe(false)
    const empty = [{ days: [1], startHour: 8, endHour: 8 }]
    expect(inSchedule(empty, at(1, 8))).toBe(false)
    expect(inSchedule(empty, at(2, 7))).toBe(false)
  })

  it('several windows: any one allows', () => {
    const s = [
      { days: [1], startHour: 1, endHour: 3 },
      { days: [1], startHour: 20, endHour: 22 },
    ]
    expect(inSchedule(s, at(1, 2))).toBe(true)
    expect(inSchedule(s, at(1, 21))).toBe(true)
    expect(inSchedule(s, at(1, 12))).toBe(false)
  })
})
