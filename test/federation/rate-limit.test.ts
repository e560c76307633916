import { describe, expect, it } from 'vitest'
import type { KeyLimits } from '../../federation/keys.ts'
import { formatResetDuration, idleKeyMs, RateLimiter, sweepIntervalMs } from '../../federation/rate-limit.ts'

const limits = (l: Partial<KeyLimits>): KeyLimits => ({ rpm: null, tpm: null, concurrency: null, ...l })

function setup(start = Date.parse('2025-03-01T12:00:00Z')) {
  const clock = { now: start }
  const limiter = new RateLimiter({ now: () => clock.now })
  return { clock, limiter }
}

describe('RateLimiter', () => {
  it('refuses past rpm with Retry-After and OpenAI headers, and admits again as the window slides', () => {
    const { clock, limiter } = setup()
    const key = { id: 'k1', limits: limits({ rpm: 3 }) }
    const first = limiter.check(key)
    expect(first.ok).toBe(true)
    expect(first.headers).toEqual({
      'x-ratelimit-limit-requests': '3',
      'x-ratelimit-remaining-requests': '2',
      'x-ratelimit-reset-requests': '1m0s',
    })
    clock.now += 20_000
    expect(limiter.check(key).headers['x-ratelimit-remaining-requests']).toBe('1')
    clock.now += 10_000
    const third = limiter.check(key)
    expect(third.headers['x-ratelimit-remaining-requests']).toBe('0')
    expect(third.headers['x-ratelimit-reset-requests']).toBe('1m0s')

    clock.now += 5_000
    const refused = limiter.check(key)
    expect(refused).toMatchObject({ ok: false, reason: 'rpm', retryAfterSeconds: 25 })
    expect(refused.headers).toEqual({
      'x-ratelimit-limit-requests': '3',
      'x-ratelimit-remaining-requests': '0',
      'x-ratelimit-reset-requests': '55s',
      'retry-after': '25',
    })
    // A refusal is not counted: once the first request leaves the window, one more fits.
    clock.now += 24_000
    expect(limiter.check(key).ok).toBe(false)
    clock.now += 1_000
    const again = limiter.check(key)
    expect(again.ok).toBe(true)
    expect(again.headers['x-ratelimit-remaining-requests']).toBe('0')
    expect(limiter.check(key)).toMatchObject({ ok: false, retryAfterSeconds: 20 })
  })

  it('charges tokens after the response and refuses once the minute reached tpm', () => {
    const { clock, limiter } = setup()
    const key = { id: 'k2', limits: limits({ tpm: 1000 }) }
    const a = limiter.check(key)
    expect(a.headers).toEqual({
      'x-ratelimit-limit-tokens': '1000',
      'x-ratelimit-remaining-tokens': '1000',
      'x-ratelimit-reset-tokens': '0s',
    })
    limiter.record('k2', 600)
    clock.now += 10_000
    expect(limiter.check(key)).toMatchObject({
      ok: true,
      headers: { 'x-ratelimit-remaining-tokens': '400', 'x-ratelimit-reset-tokens': '50s' },
    })
    limiter.record('k2', 500)
    clock.now += 1_000
    const refused = limiter.check(key)
    expect(refused).toMatchObject({ ok: false, reason: 'tpm', retryAfterSeconds: 49 })
    expect(refused.headers['retry-after']).toBe('49')
    expect(refused.headers['x-ratelimit-remaining-tokens']).toBe('0')
    // The first 600 tokens leave the window: 500 < 1000, admitted.
    clock.now += 49_000
    expect(limiter.check(key).ok).toBe(true)
  })

  it('holds a concurrency slot from check() to release(), once', () => {
    const { limiter } = setup()
    const key = { id: 'k3', limits: limits({ concurrency: 2 }) }
    const a = limiter.check(key)
    const b = limiter.check(key)
    expect(a.ok && b.ok).toBe(true)
    const refused = limiter.check(key)
    expect(refused).toMatchObject({ ok: false, reason: 'concurrency', retryAfterSeconds: 1 })
    expect(refused.headers['retry-after']).toBe('1')
    if (!a.ok) throw new Error('unreachable')
    a.release()
    a.release()
    const c = limiter.check(key)
    expect(c.ok).toBe(true)
    expect(limiter.check(key).ok).toBe(false)
  })

  it('keeps keys apart and sends no headers for unlimited keys', () => {
    const { limiter } = setup()
    const limited = { id: 'a', limits: limits({ rpm: 1 }) }
    expect(limiter.check(limited).ok).toBe(true)
    expect(limiter.check(limited).ok).toBe(false)
    const free = { id: 'b', limits: limits({}) }
    for (let i = 0; i < 1000; i++) expect(limiter.check(free).ok).toBe(true)
    expect(limiter.check(free).headers).toEqual({})
  })

  it('drops idle keys, but not keys with requests in flight', () => {
    const { clock, limiter } = setup()
    const held = limiter.check({ id: 'busy', limits: limits({ concurrency: 1 }) })
    for (let i = 0; i < 100; i++) {
      const admitted = limiter.check({ id: `idle-${i}`, limits: limits({ rpm: 10 }) })
      if (admitted.ok) admitted.release()
    }
    limiter.record('tokens-only', 50)
    expect(limiter.trackedKeys).toBe(102)
    clock.now += Math.max(idleKeyMs, sweepIntervalMs)
    // The sweep runs from check() itself: no timer.
    const fresh = limiter.check({ id: 'fresh', limits: limits({}) })
    expect(limiter.trackedKeys).toBe(2)
    if (held.ok) held.release()
    if (fresh.ok) fresh.release()
    clock.now += Math.max(idleKeyMs, sweepIntervalMs)
    limiter.sweep()
    expect(limiter.trackedKeys).toBe(0)
  })

  it('formats reset durations as OpenAI does', () => {
    expect(formatResetDuration(0)).toBe('0s')
    expect(formatResetDuration(250)).toBe('250ms')
    expect(formatResetDuration(12_000)).toBe('12s')
    expect(formatResetDuration(11_001)).toBe('12s')
    expect(formatResetDuration(60_000)).toBe('1m0s')
  })
})
