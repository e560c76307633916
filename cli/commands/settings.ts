import { defaultDataDir } from '../../core/paths.ts'
import { ControlClient } from '../../daemon/control/client.ts'
import {
  formatSchedule,
  parseSettingText,
  resolveSettingKey,
  type SettingKey,
  SettingsValidationError,
  settingKeys,
} from '../../daemon/control/settings.ts'
import type { NodeSettings } from '../../daemon/control/types.ts'
import { type CommandContext, parseOptions, print, UsageError } from '../io.ts'

export const usage = `Usage:
  garage settings get [--json] [--data-dir DIR]
  garage settings set KEY=VALUE... [--data-dir DIR]

Shows or changes the running node's settings. The daemon checks every value, applies it at once
and keeps it in <data dir>/settings.json.

Settings (KEY may also be written vram-cap-mib, vram_cap_mib, ...):
  games=A.exe,B.exe           more game or launcher process names that pause the node (none: games=)
  schedule="mon-fri 18-23; sat,sun 10-24"
                              when the node may work: days (mon-fri, sat,sun, daily) and hours
                              START-END (END exclusive, 24 = midnight, 22-2 runs past midnight);
                              schedule=always removes it
  vramCapMiB=N|null           the most GPU memory Garage may use (null: 90% of the GPU)
  maxGpuTemperatureC=N|null   pause above this GPU temperature (null: no cap)
  pauseOnBattery=true|false   pause on battery power
  idleOnlyMinutes=N|null      work only after N minutes without keyboard or mouse input (null: off)
  resumeAfterSeconds=N        how long the machine must stay clear before an automatic pause ends

Options:
  --json           get: the settings as JSON (the control API's GET /settings)
  --data-dir DIR   the node's data dir (default: $GARAGE_DATA_DIR or the OS's data folder)`

export function formatSettings(s: NodeSettings): string {
  const rows: Array<[SettingKey, string]> = [
    ['games', s.games.length > 0 ? s.games.join(', ') : 'none'],
    ['schedule', formatSchedule(s.schedule)],
    ['vramCapMiB', s.vramCapMiB != null ? `${s.vramCapMiB} MiB` : 'null (90% of the GPU)'],
    ['maxGpuTemperatureC', s.maxGpuTemperatureC != null ? `${s.maxGpuTemperatureC} °C` : 'null (no cap)'],
    ['pauseOnBattery', String(s.pauseOnBattery)],
    ['idleOnlyMinutes', s.idleOnlyMinutes != null ? `${s.idleOnlyMinutes} min` : 'null (off)'],
    ['resumeAfterSeconds', `${s.resumeAfterSeconds} s`],
  ]
  const width = Math.max(...rows.map(([k]) => k.length))
  return rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`).join('\n')
}

/** `key=value` arguments → a settings patch, each value parsed by its setting's type. */
export function parseAssignments(args: string[]): Partial<Record<SettingKey, unknown>> {
  const patch: Partial<Record<SettingKey, unknown>> = {}
  for (const arg of args) {
    const eq = arg.indexOf('=')
    if (eq <= 0) throw new UsageError(`${JSON.stringify(arg)} is not KEY=VALUE`)
    const name = arg.slice(0, eq)
    const key = resolveSettingKey(name)
    if (key == null)
      throw new UsageError(`unknown setting ${JSON.stringify(name)}; settings are ${settingKeys.join(', ')}`)
    try {
      patch[key] = parseSettingText(key, arg.slice(eq + 1))
    } catch (err) {
      if (err instanceof SettingsValidationError) throw new UsageError(err.message)
      throw err
    }
  }
  return patch
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values, positionals } = parseOptions(
    argv,
    { json: { type: 'boolean', default: false }, 'data-dir': { type: 'string' } },
    true,
  )
  const [action, ...args] = positionals
  const dataDir = values['data-dir'] ?? defaultDataDir(ctx.env)
  if (action === 'get') {
    if (args.length > 0) throw new UsageError('settings get takes no arguments')
    const settings = await (await ControlClient.connect(dataDir)).settings()
    print(ctx.stdout, values.json ? JSON.stringify(settings, null, 2) : formatSettings(settings))
    return 0
  }
  if (action === 'set') {
    if (args.length === 0) throw new UsageError('settings set needs at least one KEY=VALUE')
    if (values.json) throw new UsageError('--json goes with settings get')
    const patch = parseAssignments(args)
    const settings = await (await ControlClient.connect(dataDir)).updateSettings(patch)
    print(ctx.stdout, formatSettings(settings))
    return 0
  }
  throw new UsageError(
    action == null ? 'say get or set' : `unknown action ${JSON.stringify(action)}; say get or set`,
  )
}
