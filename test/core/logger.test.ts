import { afterEach, describe, expect, it, vi } from 'vitest'
import { createLogger, LogTail } from '../../core/logger.ts'

describe('createLogger', () => {
  afterEach(() => vi.unstubAllEnvs())

  it('GARAGE_LOG_LEVEL=debug reaches the tail garage node logs through (a multistream)', () => {
    vi.stubEnv('GARAGE_LOG_LEVEL', 'debug')
    const tail = new LogTail()
    const logger = createLogger('garage-test', 'info', tail)
    expect(logger.level).toBe('debug')
    logger.debug('a debug line')
    logger.trace('a trace line')
    const lines = tail.last(10).map((l) => JSON.parse(l) as { level: number; msg: string })
    expect(lines).toEqual([expect.objectContaining({ level: 20, msg: 'a debug line' })])
  })

  it('without it, the default level holds: info in, debug out', () => {
    vi.stubEnv('GARAGE_LOG_LEVEL', undefined)
    const tail = new LogTail()
    const logger = createLogger('garage-test', 'info', tail)
    logger.debug('hidden')
    logger.info('shown')
    expect(tail.last(10).map((l) => (JSON.parse(l) as { msg: string }).msg)).toEqual(['shown'])
  })
})
