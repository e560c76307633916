import { GarageError } from '../../core/errors.ts'
import { runTool } from '../../core/tools.ts'

/** The tray app reported something that is not a number of seconds. */
export class InvalidIdleReportError extends GarageError {}

/** Seconds since the last user input from some other source; null when it cannot tell. */
export type IdleFallback = () => Promise<number | null>

export interface IdleTrackerInit {
  now?: () => number
  /** A tray report older than this is ignored (the tray app quit or hung). */
  reportMaxAgeMs?: number
  /** Asked when there is no fresh tray report. */
  fallback?: IdleFallback | null
  /** The fallback's answer is reused this long (it spawns a tool). */
  fallbackMaxAgeMs?: number
}

export const defaultIdleReportMaxAgeMs = 10_000

/**
 * Seconds since the last user input. The tray app reports Electron's powerMonitor.getSystemIdleTime()
 * about every second (ControlTarget.reportIdle); without a fresh report the fallback answers.
 */
export class IdleTracker {
  private readonly now: () => number
  private readonly reportMaxAgeMs: number
  private readonly fallback: IdleFallback | null
  private readonly fallbackMaxAgeMs: number
  private reported: { seconds: number; at: number } | null = null
  private fallbackLast: { seconds: number | null; at: number } | null = null
  private fallbackPending: Promise<number | null> | null = null

  constructor(init: IdleTrackerInit = {}) {
    this.now = init.now ?? Date.now
    this.reportMaxAgeMs = init.reportMaxAgeMs ?? defaultIdleReportMaxAgeMs
    this.fallback = init.fallback ?? null
    this.fallbackMaxAgeMs = init.fallbackMaxAgeMs ?? 1_000
  }

  report(seconds: number): void {
    if (typeof seconds !== 'number' || !Number.isFinite(seconds) || seconds < 0) {
      throw new InvalidIdleReportError(
        `idle time must be a number of seconds ≥ 0, got ${seconds}`,
        'BAD_IDLE',
      )
    }
    this.reported = { seconds, at: this.now() }
  }

  /** Not extrapolated from the report's age: input since the report would make that an overestimate. */
  async idleSeconds(): Promise<number | null> {
    if (this.reported != null && this.now() - this.reported.at <= this.reportMaxAgeMs)
      return this.reported.seconds
    if (this.fallback == null) return null
    // Only the first answer is waited for: a slow tool must not delay the game check.
    if (this.fallbackLast == null) return this.askFallback(this.fallback)
    if (this.now() - this.fallbackLast.at >= this.fallbackMaxAgeMs) void this.askFallback(this.fallback)
    return this.fallbackLast.seconds
  }

  private askFallback(fallback: IdleFallback): Promise<number | null> {
    this.fallbackPending ??= fallback()
      .catch(() => null)
      .then((seconds) => {
        this.fallbackLast = { seconds, at: this.now() }
        return seconds
      })
      .finally(() => {
        this.fallbackPending = null
      })
    return this.fallbackPending
  }
}

/** `xprintidle` prints milliseconds since the last X input. */
export function parseXprintidle(stdout: string): number | null {
  const ms = Number(stdout.trim())
  return stdout.trim() !== '' && Number.isFinite(ms) && ms >= 0 ? ms / 1000 : null
}

/** gdbus prints `(uint64 12345,)`: milliseconds from GNOME's Mutter IdleMonitor. */
export function parseMutterIdleTime(stdout: string): number | null {
  const m = /\(uint64\s+(\d+),?\)/.exec(stdout)
  return m?.[1] == null ? null : Number(m[1]) / 1000
}

const mutterArgs = [
  'call',
  '--session',
  '--dest',
  'org.gnome.Mutter.IdleMonitor',
  '--object-path',
  '/org/gnome/Mutter/IdleMonitor/Core',
  '--method',
  'org.gnome.Mutter.IdleMonitor.GetIdletime',
]

interface IdleSource {
  file: string
  args: string[]
  /** The session this tool needs, by the variable that locates it. */
  needs: (env: NodeJS.ProcessEnv) => boolean
  parse: (stdout: string) => number | null
}

const linuxIdleSources: IdleSource[] = [
  { file: 'xprintidle', args: [], needs: (env) => env.DISPLAY != null, parse: parseXprintidle },
  {
    file: 'gdbus',
    args: mutterArgs,
    needs: (env) => env.DBUS_SESSION_BUS_ADDRESS != null || env.XDG_RUNTIME_DIR != null,
    parse: parseMutterIdleTime,
  },
]

/**
 * Linux without the tray app: `xprintidle` on X11 (XWayland sees only X clients' input), then
 * GNOME's Mutter IdleMonitor over D-Bus (GNOME on Wayland). A tool that is not installed is not
 * asked again; other desktops answer null.
 */
export function linuxIdleFallback(init: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): IdleFallback {
  const env = init.env ?? process.env
  const timeoutMs = init.timeoutMs ?? 1_000
  const missing = new Set<string>()
  return async () => {
    for (const source of linuxIdleSources) {
      if (missing.has(source.file) || !source.needs(env)) continue
      const r = await runTool(source.file, source.args, { timeoutMs, env })
      if (r.status === 'not-found') missing.add(source.file)
      if (r.status !== 'ok') continue
      const seconds = source.parse(r.stdout)
      if (seconds != null) return seconds
    }
    return null
  }
}
