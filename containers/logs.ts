import type { Logger } from '../core/logger.ts'

export type ContainerLogLevel = 'debug' | 'info' | 'warn' | 'error'

const maxLineChars = 8 * 1024

/**
 * The level a container's log line was written at, from the line itself: vLLM prints
 * `(APIServer pid=1) INFO 11-24 04:57:35 [api_server.py:1234] ...`, Ray
 * `2026-11-24 04:57:35,123 WARNING worker.py:...`. Unknown lines are info.
 */
export function containerLogLevel(line: string): ContainerLogLevel {
  const m = /\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL|Traceback)\b/.exec(line.slice(0, 80))
  switch (m?.[1]) {
    case 'DEBUG':
      return 'debug'
    case 'WARNING':
    case 'WARN':
      return 'warn'
    case 'ERROR':
    case 'CRITICAL':
    case 'FATAL':
    case 'Traceback':
      return 'error'
    default:
      return 'info'
  }
}

/** Writes one container line into the engine's child logger, bounded in size. */
export function logContainerLine(logger: Logger, line: string, stream: 'stdout' | 'stderr'): void {
  const text = line.length > maxLineChars ? `${line.slice(0, maxLineChars)}… (${line.length} chars)` : line
  logger[containerLogLevel(line)]({ stream }, text)
}

/** The last `size` lines, for error messages that say what the engine printed before it died. */
export class LineRing {
  private readonly size: number
  private readonly lines: string[] = []

  constructor(size = 50) {
    this.size = size
  }

  push(line: string): void {
    this.lines.push(line.length > 1_000 ? `${line.slice(0, 1_000)}…` : line)
    if (this.lines.length > this.size) this.lines.shift()
  }

  values(): string[] {
    return [...this.lines]
  }
}
