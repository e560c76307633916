import { type Logger, pino } from 'pino'

/** One root logger per process, JSON to stderr (stdout stays for command output); GARAGE_LOG_LEVEL sets the level. */
export function createLogger(name = 'garage', defaultLevel = 'info'): Logger {
  return pino({ name, level: process.env.GARAGE_LOG_LEVEL ?? defaultLevel }, pino.destination(2))
}

/** For library callers and tests that don't want output. */
export const silentLogger: Logger = pino({ level: 'silent' })

export type { Logger }
