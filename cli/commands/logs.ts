import { defaultDataDir } from '../../core/paths.ts'
import { ControlClient } from '../../daemon/control/client.ts'
import { maxLogLines } from '../../daemon/control/server.ts'
import { type CommandContext, parseOptions, print, UsageError } from '../io.ts'

export const usage = `Usage: garage logs [--lines N] [--follow] [--json] [--data-dir DIR]

Prints the running node's last log lines (the daemon keeps the last ${maxLogLines} in memory).

Options:
  --lines N        how many lines (default 50, at most ${maxLogLines})
  --follow, -f     keep printing new lines as the daemon logs them, until Ctrl-C
  --json           the lines as the daemon wrote them (JSON, one per line)
  --data-dir DIR   the node's data dir (default: $GARAGE_DATA_DIR or the OS's data folder)`

/** How often --follow asks the daemon for new lines. */
export const followIntervalMs = 1_000

const levelNames: Record<number, string> = {
  10: 'TRACE',
  20: 'DEBUG',
  30: 'INFO',
  40: 'WARN',
  50: 'ERROR',
  60: 'FATAL',
}
const pinoFields = new Set(['level', 'time', 'pid', 'hostname', 'name', 'msg', 'component', 'v'])

/** A pino JSON line → `12:00:01 INFO  daemon:engine  message key=value`; other lines unchanged. */
export function formatLogLine(line: string): string {
  let entry: Record<string, unknown>
  try {
    entry = JSON.parse(line) as Record<string, unknown>
  } catch {
    return line
  }
  if (entry == null || typeof entry !== 'object') return line
  const time = typeof entry.time === 'number' ? new Date(entry.time).toLocaleTimeString() : ''
  const level = (levelNames[entry.level as number] ?? String(entry.level ?? '')).padEnd(5)
  const extra = Object.entries(entry)
    .filter(([k]) => !pinoFields.has(k))
    .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
  return [
    time,
    level,
    entry.component != null ? `${entry.component} ` : '',
    String(entry.msg ?? ''),
    ...extra,
  ]
    .filter((x) => x !== '')
    .join(' ')
}

/** The lines of `next` that come after the last line already printed (`seen`). */
export function newLines(seen: string | null, next: string[]): { lines: string[]; gap: boolean } {
  if (seen == null) return { lines: next, gap: false }
  const at = next.lastIndexOf(seen)
  return at >= 0 ? { lines: next.slice(at + 1), gap: false } : { lines: next, gap: next.length > 0 }
}

/** Waits one follow interval; false when the user stopped the command. */
function tick(signal: AbortSignal): Promise<boolean> {
  return new Promise((resolve) => {
    const onAbort = (): void => {
      clearTimeout(timer)
      resolve(false)
    }
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort)
      resolve(true)
    }, followIntervalMs)
    signal.addEventListener('abort', onAbort, { once: true })
  })
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    lines: { type: 'string' },
    follow: { type: 'boolean', short: 'f', default: false },
    json: { type: 'boolean', default: false },
    'data-dir': { type: 'string' },
  })
  const count = values.lines != null ? Number(values.lines) : 50
  if (values.lines != null && (!/^\d+$/.test(values.lines) || count < 1 || count > maxLogLines))
    throw new UsageError(`--lines must be a whole number from 1 to ${maxLogLines}`)
  const client = await ControlClient.connect(values['data-dir'] ?? defaultDataDir(ctx.env))
  const show = (line: string): void => print(ctx.stdout, values.json ? line : formatLogLine(line))
  const first = await client.logs(count, { signal: ctx.shutdown })
  for (const line of first) show(line)
  if (!values.follow) return 0
  let seen = first.at(-1) ?? null
  while (!ctx.shutdown.aborted) {
    if (!(await tick(ctx.shutdown))) break
    let next: string[]
    try {
      next = await client.logs(200, { signal: ctx.shutdown })
      // More than 200 new lines since the last look: ask for all the daemon keeps.
      if (seen != null && !next.includes(seen))
        next = await client.logs(maxLogLines, { signal: ctx.shutdown })
    } catch (err) {
      if (ctx.shutdown.aborted) break
      throw err
    }
    const { lines, gap } = newLines(seen, next)
    if (gap) print(ctx.stderr, 'garage logs: some lines went by too fast to show')
    for (const line of lines) show(line)
    seen = lines.at(-1) ?? seen
  }
  return 0
}
