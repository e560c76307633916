import { type Logger, pino } from 'pino'

/** One root logger per process, JSON to stderr (stdout stays for command output); GARAGE_LOG_LEVEL sets the level. */
export function createLogger(name = 'garage', defaultLevel = 'info', tail?: LogTail): Logger {
  const level = process.env.GARAGE_LOG_LEVEL ?? defaultLevel
  const options = { name, level }
  if (tail == null) return pino(options, pino.destination(2))
  // A multistream filters each stream at its own level, 'info' unless told: give them the logger's,
  // or GARAGE_LOG_LEVEL=debug reaches neither stderr nor the tail (garage node logs through these).
  return pino(
    options,
    pino.multistream([
      { level, stream: pino.destination(2) },
      { level, stream: tail },
    ]),
  )
}

/** The last lines a process logged, kept in memory for `garage logs` and the dashboard. */
export class LogTail {
  private readonly lines: string[] = []
  private readonly max: number

  constructor(max = 1_000) {
    this.max = max
  }

  write(line: string): void {
    this.lines.push(line.endsWith('\n') ? line.slice(0, -1) : line)
    if (this.lines.length > this.max) this.lines.splice(0, this.lines.length - this.max)
  }

  last(n: number): string[] {
    return this.lines.slice(-Math.max(0, n))
  }
}

/** For library callers and tests that don't want output. */
export const silentLogger: Logger = pino({ level: 'silent' })

export type { Logger }
