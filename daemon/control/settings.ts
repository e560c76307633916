import { constants } from 'node:fs'
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { GarageError } from '../../core/errors.ts'
import type { NodeSettings } from './types.ts'

/**
 * The user's node settings: validation (the control API checks every field before the daemon sees
 * it), the text forms the CLI and the dashboard use, and persistence as JSON in the data dir.
 */

export const settingsFileName = 'settings.json'

export const settingKeys = [
  'games',
  'schedule',
  'vramCapMiB',
  'maxGpuTemperatureC',
  'pauseOnBattery',
  'idleOnlyMinutes',
  'resumeAfterSeconds',
] as const satisfies ReadonlyArray<keyof NodeSettings>

export type SettingKey = (typeof settingKeys)[number]

export type ScheduleWindow = NodeSettings['schedule'][number]

export const settingsLimits = {
  maxGames: 200,
  maxGameNameLength: 260,
  maxScheduleWindows: 28,
  minVramCapMiB: 256,
  maxVramCapMiB: 1_048_576,
  minGpuTemperatureC: 40,
  maxGpuTemperatureC: 100,
  maxIdleOnlyMinutes: 1_440,
  maxResumeAfterSeconds: 3_600,
} as const

export function defaultSettings(): NodeSettings {
  return {
    games: [],
    schedule: [],
    vramCapMiB: null,
    maxGpuTemperatureC: null,
    pauseOnBattery: true,
    idleOnlyMinutes: null,
    resumeAfterSeconds: 30,
  }
}

export interface SettingsIssue {
  /** The top-level setting (`schedule`), or the name of the unknown field. */
  field: string
  message: string
  /** The field is not a setting at all. */
  unknown?: boolean
}

/** One or more settings are wrong; `issues` names each field (the dashboard shows them inline). */
export class SettingsValidationError extends GarageError {
  readonly issues: SettingsIssue[]

  constructor(issues: SettingsIssue[]) {
    super(issues.map((i) => i.message).join('; '), 'SETTINGS_INVALID')
    this.issues = issues
  }

  get field(): string {
    return this.issues[0]?.field ?? ''
  }
}

export class SettingsFileInvalidError extends GarageError {}

const dayNames = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'] as const

function show(value: unknown): string {
  let text: string | undefined
  try {
    text = JSON.stringify(value)
  } catch {
    // JSON.parse takes any depth; JSON.stringify runs out of stack a few thousand levels down.
    text = Array.isArray(value) ? '[[[...]]]' : '{...}'
  }
  return text === undefined ? String(value) : text.length > 60 ? `${text.slice(0, 57)}...` : text
}

function isWhole(value: unknown): value is number {
  return typeof value === 'number' && Number.isInteger(value)
}

/** Validates one window; returns it normalised (days sorted, no duplicates) or the problem. */
function checkWindow(
  value: unknown,
  where: string,
  sub = (name: string) => `${where}.${name}`,
): ScheduleWindow | string {
  if (value == null || typeof value !== 'object' || Array.isArray(value))
    return `${where} must be an object { days, startHour, endHour }, not ${show(value)}`
  const w = value as Record<string, unknown>
  const extra = Object.keys(w).filter((k) => k !== 'days' && k !== 'startHour' && k !== 'endHour')
  if (extra.length > 0) return `${where} has an unknown field ${show(extra[0])}`
  if (!Array.isArray(w.days) || w.days.length === 0)
    return `${sub('days')} must be a non-empty list of weekdays 0-6 (0 = Sunday), not ${show(w.days)}`
  for (const d of w.days)
    if (!isWhole(d) || d < 0 || d > 6)
      return `${sub('days')} holds ${show(d)}; weekdays are whole numbers 0-6 (0 = Sunday)`
  if (!isWhole(w.startHour) || w.startHour < 0 || w.startHour > 23)
    return `${sub('startHour')} must be a whole hour from 0 to 23, not ${show(w.startHour)}`
  if (!isWhole(w.endHour) || w.endHour < 1 || w.endHour > 24)
    return `${sub('endHour')} must be a whole hour from 1 to 24, not ${show(w.endHour)}`
  if (w.startHour === w.endHour) return `${where} starts and ends at ${w.startHour}: it would be empty`
  const days = [...new Set(w.days as number[])].sort((a, b) => a - b)
  return { days, startHour: w.startHour, endHour: w.endHour }
}

type Checked = { ok: true; value: unknown } | { ok: false; message: string }

const ok = (value: unknown): Checked => ({ ok: true, value })
const bad = (message: string): Checked => ({ ok: false, message })

function nullableWhole(key: string, value: unknown, min: number, max: number, what: string): Checked {
  if (value === null) return ok(null)
  if (!isWhole(value) || value < min || value > max)
    return bad(`${key} must be a whole number ${what} from ${min} to ${max}, or null; got ${show(value)}`)
  return ok(value)
}

const checkers: Record<SettingKey, (value: unknown) => Checked> = {
  games: (value) => {
    if (!Array.isArray(value)) return bad(`games must be a list of process names, not ${show(value)}`)
    if (value.length > settingsLimits.maxGames)
      return bad(`games holds ${value.length} names; at most ${settingsLimits.maxGames}`)
    const seen = new Set<string>()
    const games: string[] = []
    for (const g of value) {
      if (typeof g !== 'string') return bad(`games must hold process names (text), not ${show(g)}`)
      const name = g.trim()
      if (name === '') return bad('games holds an empty name')
      if (name.length > settingsLimits.maxGameNameLength)
        return bad(`games holds a name longer than ${settingsLimits.maxGameNameLength} characters`)
      if (/[\\/]/.test(name) || [...name].some((c) => c.charCodeAt(0) < 0x20))
        return bad(`games holds ${show(name)}: give the process name (like Game.exe), not a path`)
      if (seen.has(name.toLowerCase())) continue
      seen.add(name.toLowerCase())
      games.push(name)
    }
    return ok(games)
  },
  schedule: (value) => {
    if (typeof value === 'string') {
      try {
        return ok(parseSchedule(value))
      } catch (err) {
        return bad((err as Error).message)
      }
    }
    if (!Array.isArray(value))
      return bad(`schedule must be a list of { days, startHour, endHour } windows, not ${show(value)}`)
    if (value.length > settingsLimits.maxScheduleWindows)
      return bad(`schedule holds ${value.length} windows; at most ${settingsLimits.maxScheduleWindows}`)
    const windows: ScheduleWindow[] = []
    for (const [i, w] of value.entries()) {
      const checked = checkWindow(w, `schedule[${i}]`)
      if (typeof checked === 'string') return bad(checked)
      windows.push(checked)
    }
    return ok(windows)
  },
  vramCapMiB: (value) =>
    nullableWhole('vramCapMiB', value, settingsLimits.minVramCapMiB, settingsLimits.maxVramCapMiB, 'of MiB'),
  maxGpuTemperatureC: (value) => {
    if (value === null) return ok(null)
    const { minGpuTemperatureC: min, maxGpuTemperatureC: max } = settingsLimits
    if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max)
      return bad(
        `maxGpuTemperatureC must be a temperature from ${min} to ${max} °C, or null; got ${show(value)}`,
      )
    return ok(value)
  },
  pauseOnBattery: (value) =>
    typeof value === 'boolean' ? ok(value) : bad(`pauseOnBattery must be true or false, not ${show(value)}`),
  idleOnlyMinutes: (value) =>
    nullableWhole('idleOnlyMinutes', value, 1, settingsLimits.maxIdleOnlyMinutes, 'of minutes'),
  resumeAfterSeconds: (value) => {
    if (!isWhole(value) || value < 0 || value > settingsLimits.maxResumeAfterSeconds)
      return bad(
        `resumeAfterSeconds must be a whole number of seconds from 0 to ${settingsLimits.maxResumeAfterSeconds}; got ${show(value)}`,
      )
    return ok(value)
  },
}

function isSettingKey(key: string): key is SettingKey {
  return (settingKeys as readonly string[]).includes(key)
}

/**
 * Checks a partial patch field by field and returns it normalised (games trimmed and deduplicated,
 * schedule days sorted; a schedule may also be given in text form). Throws SettingsValidationError
 * naming every wrong or unknown field.
 */
export function validateSettingsPatch(input: unknown): Partial<NodeSettings> {
  if (input == null || typeof input !== 'object' || Array.isArray(input))
    throw new SettingsValidationError([
      { field: '', message: `settings must be a JSON object of fields to change, not ${show(input)}` },
    ])
  const issues: SettingsIssue[] = []
  const patch: Record<string, unknown> = {}
  for (const [key, value] of Object.entries(input)) {
    if (!isSettingKey(key)) {
      issues.push({
        field: key,
        message: `unknown setting ${show(key)}; settings are ${settingKeys.join(', ')}`,
        unknown: true,
      })
      continue
    }
    const checked = checkers[key](value)
    if (checked.ok) patch[key] = checked.value
    else issues.push({ field: key, message: checked.message })
  }
  if (issues.length > 0) throw new SettingsValidationError(issues)
  return patch as Partial<NodeSettings>
}

// --- Text forms (CLI arguments, the dashboard's schedule field) ---

function parseDay(text: string, whole: string): number {
  const t = text.trim().toLowerCase()
  const i = dayNames.findIndex((d) => t === d || (t.length > 3 && d === t.slice(0, 3) && isDayWord(t)))
  if (i < 0)
    throw new SettingsValidationError([
      {
        field: 'schedule',
        message: `schedule ${show(whole)}: ${show(text)} is not a weekday (mon, tue, wed, thu, fri, sat, sun)`,
      },
    ])
  return i
}

function isDayWord(t: string): boolean {
  return ['sunday', 'monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday'].includes(t)
}

function parseDays(text: string, whole: string): number[] {
  const t = text.trim().toLowerCase()
  if (t === 'daily' || t === '*' || t === 'all' || t === 'every') return [0, 1, 2, 3, 4, 5, 6]
  if (t === 'weekdays') return [1, 2, 3, 4, 5]
  if (t === 'weekends' || t === 'weekend') return [0, 6]
  const days = new Set<number>()
  for (const part of t.split(',')) {
    const [from, to, more] = part.split('-')
    if (more != null)
      throw new SettingsValidationError([
        {
          field: 'schedule',
          message: `schedule ${show(whole)}: ${show(part)} is not a day range like mon-fri`,
        },
      ])
    const a = parseDay(from ?? '', whole)
    const b = to == null ? a : parseDay(to, whole)
    // A range may wrap the week: fri-mon is Friday to Monday.
    for (let d = a; ; d = (d + 1) % 7) {
      days.add(d)
      if (d === b) break
    }
  }
  return [...days].sort((x, y) => x - y)
}

/**
 * `mon-fri 18-23; sat,sun 10-24` → windows. Days are names, ranges (fri-mon wraps) or `daily`;
 * hours are `START-END` whole hours, END exclusive, 24 = midnight; END before START runs past
 * midnight into the next day. `always` or an empty text means no schedule (always work).
 */
export function parseSchedule(text: string): ScheduleWindow[] {
  const trimmed = text.trim()
  if (trimmed === '' || /^(always|none|\[\])$/i.test(trimmed)) return []
  const windows: ScheduleWindow[] = []
  for (const raw of trimmed.split(';')) {
    const part = raw.trim()
    if (part === '') continue
    const m = /^(.+?)\s+(\d{1,2})(?::00)?\s*-\s*(\d{1,2})(?::00)?$/.exec(part)
    if (m == null)
      throw new SettingsValidationError([
        {
          field: 'schedule',
          message: `schedule ${show(part)} is not DAYS HOURS, like "mon-fri 18-23" or "sat,sun 10-24"`,
        },
      ])
    const window = checkWindow(
      { days: parseDays(m[1] as string, part), startHour: Number(m[2]), endHour: Number(m[3]) },
      `schedule ${show(part)}`,
      (name) =>
        `schedule ${show(part)}: ${name === 'days' ? 'the days' : name === 'startHour' ? 'the start' : 'the end'}`,
    )
    if (typeof window === 'string')
      throw new SettingsValidationError([{ field: 'schedule', message: window }])
    windows.push(window)
  }
  if (windows.length > settingsLimits.maxScheduleWindows)
    throw new SettingsValidationError([
      {
        field: 'schedule',
        message: `schedule holds ${windows.length} windows; at most ${settingsLimits.maxScheduleWindows}`,
      },
    ])
  return windows
}

function formatDays(days: number[]): string {
  const sorted = [...new Set(days)].sort((a, b) => a - b)
  if (sorted.length === 7) return 'daily'
  const runs: string[] = []
  let i = 0
  while (i < sorted.length) {
    let j = i
    while (j + 1 < sorted.length && (sorted[j + 1] as number) === (sorted[j] as number) + 1) j++
    const from = dayNames[sorted[i] as number]
    const to = dayNames[sorted[j] as number]
    runs.push(j - i >= 2 ? `${from}-${to}` : j > i ? `${from},${to}` : (from as string))
    i = j + 1
  }
  return runs.join(',')
}

/** Windows → the text parseSchedule reads (`always` for none). */
export function formatSchedule(schedule: ScheduleWindow[]): string {
  if (schedule.length === 0) return 'always'
  return schedule.map((w) => `${formatDays(w.days)} ${w.startHour}-${w.endHour}`).join('; ')
}

/** `vram-cap-mib`, `vram_cap_mib` and `vramCapMiB` all name the same setting. */
export function resolveSettingKey(name: string): SettingKey | null {
  const wanted = name.replace(/[-_]/g, '').toLowerCase()
  return settingKeys.find((k) => k.toLowerCase() === wanted) ?? null
}

const booleanWords: Record<string, boolean> = {
  true: true,
  yes: true,
  on: true,
  '1': true,
  false: false,
  no: false,
  off: false,
  '0': false,
}

/**
 * A setting's value as typed on a command line → its JSON value: lists comma-separated, schedules
 * as parseSchedule reads them, numbers, booleans (true/false, yes/no, on/off), `null`. The range
 * checks stay with validateSettingsPatch.
 */
export function parseSettingText(key: SettingKey, text: string): unknown {
  const t = text.trim()
  const fail = (what: string): never => {
    throw new SettingsValidationError([{ field: key, message: `${key} must be ${what}, not ${show(t)}` }])
  }
  switch (key) {
    case 'games':
      return t === '' || t.toLowerCase() === 'none'
        ? []
        : t
            .split(',')
            .map((g) => g.trim())
            .filter((g) => g !== '')
    case 'schedule':
      return parseSchedule(t)
    case 'pauseOnBattery': {
      const b = booleanWords[t.toLowerCase()]
      return b ?? fail('true or false')
    }
    default: {
      if (t.toLowerCase() === 'null' || t.toLowerCase() === 'none' || t.toLowerCase() === 'off') return null
      const n = Number(t)
      return t === '' || !Number.isFinite(n) ? fail('a number (or null)') : n
    }
  }
}

// --- Persistence ---

/**
 * The settings saved in `<dataDir>/settings.json`, over the defaults; the defaults when there is no
 * file. Fields this version does not know (a newer Garage wrote them) are ignored; a wrong value
 * is an error naming the file and the field.
 */
export async function loadSettings(dataDir: string): Promise<NodeSettings> {
  const path = join(dataDir, settingsFileName)
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return defaultSettings()
    throw new SettingsFileInvalidError(`cannot read ${path}: ${(err as Error).message}`, 'SETTINGS_FILE', {
      cause: err,
    })
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch (err) {
    throw new SettingsFileInvalidError(
      `${path} is not valid JSON (${(err as Error).message}); fix it or delete it to use the defaults`,
      'SETTINGS_FILE',
    )
  }
  if (parsed == null || typeof parsed !== 'object' || Array.isArray(parsed))
    throw new SettingsFileInvalidError(
      `${path} must hold a JSON object; fix it or delete it to use the defaults`,
      'SETTINGS_FILE',
    )
  const known = Object.fromEntries(Object.entries(parsed).filter(([k]) => isSettingKey(k)))
  try {
    return { ...defaultSettings(), ...validateSettingsPatch(known) }
  } catch (err) {
    throw new SettingsFileInvalidError(
      `${path}: ${(err as Error).message}; fix it or delete it to use the defaults`,
      'SETTINGS_FILE',
    )
  }
}

/** Writes `<dataDir>/settings.json` (0600) atomically: a crash leaves the old file or the new one. */
export async function saveSettings(dataDir: string, settings: NodeSettings): Promise<void> {
  const path = join(dataDir, settingsFileName)
  await mkdir(dataDir, { recursive: true, mode: 0o700 })
  const tmp = `${path}.${process.pid}.${Date.now()}.tmp`
  try {
    const handle = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC, 0o600)
    try {
      await handle.writeFile(`${JSON.stringify(settings, null, 2)}\n`)
      await handle.sync()
    } finally {
      await handle.close()
    }
    await rename(tmp, path)
  } catch (err) {
    await rm(tmp, { force: true })
    throw new GarageError(`cannot save settings to ${path}: ${(err as Error).message}`, 'SETTINGS_WRITE', {
      cause: err,
    })
  }
}
