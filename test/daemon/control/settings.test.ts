import { describe, expect, it } from 'vitest'
import {
  formatSchedule,
  parseSchedule,
  parseSettingText,
  resolveSettingKey,
  validateSettingsPatch,
} from '../../../daemon/control/settings.ts'

describe('settings text forms', () => {
  it('reads schedules: ranges, lists, wrapping weeks, overnight hours, always', () => {
    expect(parseSchedule('mon-fri 18-23')).toEqual([{ days: [1, 2, 3, 4, 5], startHour: 18, endHour: 23 }])
    expect(parseSchedule('Sat,Sunday 10:00-24; fri-mon 22-2')).toEqual([
      { days: [0, 6], startHour: 10, endHour: 24 },
      { days: [0, 1, 5, 6], startHour: 22, endHour: 2 },
    ])
    expect(parseSchedule('daily 0-24')).toEqual([{ days: [0, 1, 2, 3, 4, 5, 6], startHour: 0, endHour: 24 }])
    expect(parseSchedule('always')).toEqual([])
    expect(parseSchedule('  ')).toEqual([])
    for (const [text, why] of [
      ['mon-fri', 'not DAYS HOURS'],
      ['mon 18-18', 'would be empty'],
      ['mon 25-3', 'the start must be a whole hour'],
      ['mon-tue-wed 1-2', 'not a day range'],
      ['xyz 1-2', 'not a weekday'],
    ] as const)
      expect(() => parseSchedule(text), text).toThrow(why)
  })

  it('writes schedules back in the form it reads', () => {
    for (const text of [
      'always',
      'mon-fri 18-23',
      'sun,sat 10-24',
      'daily 0-24',
      'mon,wed-fri 9-17; sun 22-2',
    ]) {
      expect(formatSchedule(parseSchedule(text))).toBe(text)
    }
  })

  it('parses command-line values by the setting type', () => {
    expect(parseSettingText('games', 'A.exe, B.exe,')).toEqual(['A.exe', 'B.exe'])
    expect(parseSettingText('games', '')).toEqual([])
    expect(parseSettingText('vramCapMiB', '8192')).toBe(8192)
    expect(parseSettingText('vramCapMiB', 'null')).toBeNull()
    expect(parseSettingText('pauseOnBattery', 'off')).toBe(false)
    expect(parseSettingText('pauseOnBattery', 'YES')).toBe(true)
    expect(() => parseSettingText('pauseOnBattery', 'maybe')).toThrow('pauseOnBattery must be true or false')
    expect(() => parseSettingText('idleOnlyMinutes', 'ten')).toThrow('idleOnlyMinutes must be a number')
    expect(resolveSettingKey('vram-cap-mib')).toBe('vramCapMiB')
    expect(resolveSettingKey('PAUSE_ON_BATTERY')).toBe('pauseOnBattery')
    expect(resolveSettingKey('colour')).toBeNull()
  })

  it('validates a patch into its normal form and names every wrong field', () => {
    expect(validateSettingsPatch({ schedule: [{ days: [5, 1, 1], startHour: 9, endHour: 17 }] })).toEqual({
      schedule: [{ days: [1, 5], startHour: 9, endHour: 17 }],
    })
    expect(() => validateSettingsPatch(null)).toThrow('JSON object')
    try {
      validateSettingsPatch({ vramCapMiB: 10, resumeAfterSeconds: -1 })
      expect.unreachable()
    } catch (err) {
      expect((err as Error).name).toBe('SettingsValidationError')
      expect((err as { issues: Array<{ field: string }> }).issues.map((i) => i.field)).toEqual([
        'vramCapMiB',
        'resumeAfterSeconds',
      ])
    }
  })
})
