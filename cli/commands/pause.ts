import { defaultDataDir } from '../../core/paths.ts'
import { ControlClient } from '../../daemon/control/client.ts'
import { maxPauseMinutes } from '../../daemon/control/server.ts'
import { type CommandContext, parseOptions, print, UsageError } from '../io.ts'
import { describeState } from './status.ts'

export const usage = `Usage: garage pause [--minutes N | --until TIME] [--data-dir DIR]

Pauses the running node: its head stops sending it requests at once, requests in flight finish,
then the engine frees the GPU. Without --minutes or --until it stays paused until garage resume.

Options:
  --minutes N      resume by itself after N minutes (at most ${maxPauseMinutes}, a week)
  --until TIME     resume by itself at TIME: an ISO time (2026-11-24T18:00, 2026-11-24T18:00:00Z)
                   or HH:MM (the next time the clock shows it, local time)
  --data-dir DIR   the node's data dir (default: $GARAGE_DATA_DIR or the OS's data folder)`

/** `18:30` → the next 18:30 local time; anything else → an ISO time as Date parses it. */
export function parseUntil(text: string, now = new Date()): Date {
  const clock = /^(\d{1,2}):(\d{2})$/.exec(text.trim())
  if (clock != null) {
    const h = Number(clock[1])
    const m = Number(clock[2])
    if (h > 23 || m > 59) throw new UsageError(`--until ${text} is not a time of day`)
    const at = new Date(now)
    at.setHours(h, m, 0, 0)
    if (at.getTime() <= now.getTime()) at.setDate(at.getDate() + 1)
    return at
  }
  const at = new Date(text)
  if (!/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}/.test(text.trim()) || Number.isNaN(at.getTime()))
    throw new UsageError(
      `--until must be an ISO time like 2026-11-24T18:00 or HH:MM, not ${JSON.stringify(text)}`,
    )
  return at
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    minutes: { type: 'string' },
    until: { type: 'string' },
    'data-dir': { type: 'string' },
  })
  if (values.minutes != null && values.until != null)
    throw new UsageError('give --minutes or --until, not both')
  let minutes: number | undefined
  if (values.minutes != null) {
    minutes = Number(values.minutes)
    if (!/^\d+(\.\d+)?$/.test(values.minutes) || minutes <= 0 || minutes > maxPauseMinutes)
      throw new UsageError(`--minutes must be a number above 0 and at most ${maxPauseMinutes}`)
  }
  const until = values.until != null ? parseUntil(values.until) : undefined
  const client = await ControlClient.connect(values['data-dir'] ?? defaultDataDir(ctx.env))
  const status = await client.pause({
    ...(minutes != null ? { minutes } : {}),
    ...(until != null ? { until } : {}),
  })
  print(ctx.stdout, describeState(status))
  if (minutes == null && until == null) print(ctx.stderr, 'paused until you run garage resume')
  return 0
}
