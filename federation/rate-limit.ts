import type { KeyLimits } from './keys.ts'

/** The sliding window, in one-second buckets. */
export const windowSeconds = 60
/** A key with nothing in flight and nothing in its window is forgotten after this long. */
export const idleKeyMs = windowSeconds * 1000
/** How often check() looks for idle keys to drop. */
export const sweepIntervalMs = 30_000

export type RateLimitReason = 'rpm' | 'tpm' | 'concurrency'

/** What the limiter needs of a key: its id and limits (a KeyInfo fits). */
export interface RateLimitedKey {
  readonly id: string
  readonly limits: Readonly<KeyLimits>
}

export type RateLimitHeaders = Record<string, string>

export type RateLimitDecision =
  | { ok: true; release: () => void; headers: RateLimitHeaders }
  | { ok: false; reason: RateLimitReason; retryAfterSeconds: number; headers: RateLimitHeaders }

export interface RateLimiterOptions {
  now?: () => number
}

interface KeyWindow {
  /** Slot i counts the epoch second `seconds[i]`, where seconds[i] % windowSeconds === i (0: never used). */
  seconds: Uint32Array
  requests: Uint32Array
  tokens: Float64Array
  inFlight: number
  lastActivityMs: number
}

interface WindowUse {
  total: number
  /** Epoch second of the newest bucket with a non-zero count, or null. */
  newestSecond: number | null
  /** The wait, in ms, until the window's total drops below `limit`. */
  msUntilBelow: (limit: number) => number
}

/** Go-style durations as OpenAI writes them in x-ratelimit-reset-*: "250ms", "12s", "1m0s". */
export function formatResetDuration(ms: number): string {
  if (ms <= 0) return '0s'
  if (ms < 1000) return `${Math.ceil(ms)}ms`
  const seconds = Math.ceil(ms / 1000)
  return seconds < 60 ? `${seconds}s` : `${Math.floor(seconds / 60)}m${seconds % 60}s`
}

/**
 * Per-key requests per minute, tokens per minute and requests in flight, over a sliding one-minute
 * window of one-second buckets. In memory, per process: behind several gateway processes each enforces
 * its own share. Tokens are charged after a response with record(); check() refuses once the last
 * minute's tokens reach the key's tpm.
 */
export class RateLimiter {
  private readonly now: () => number
  private readonly windows = new Map<string, KeyWindow>()
  private lastSweepMs: number

  constructor(options: RateLimiterOptions = {}) {
    this.now = options.now ?? Date.now
    this.lastSweepMs = this.now()
  }

  /** Admits a request for KEY (counting it and holding a concurrency slot until release()) or says why not. */
  check(key: RateLimitedKey): RateLimitDecision {
    const now = this.now()
    this.maybeSweep(now)
    const w = this.window(key.id, now)
    const { rpm, tpm, concurrency } = key.limits
    // A dimension without a limit is neither checked nor reported: no need to sum its window.
    const requests = rpm != null ? use(w, w.requests, now) : null
    const tokens = tpm != null ? use(w, w.tokens, now) : null
    let refusal: { reason: RateLimitReason; waitMs: number } | null = null
    if (requests != null && rpm != null && requests.total >= rpm)
      refusal = { reason: 'rpm', waitMs: requests.msUntilBelow(rpm) }
    else if (tokens != null && tpm != null && tokens.total >= tpm)
      refusal = { reason: 'tpm', waitMs: tokens.msUntilBelow(tpm) }
    // No way to know when a request in flight ends: one second is a polite guess.
    else if (concurrency != null && w.inFlight >= concurrency)
      refusal = { reason: 'concurrency', waitMs: 1000 }
    if (refusal != null) {
      const retryAfterSeconds = Math.max(1, Math.ceil(refusal.waitMs / 1000))
      return {
        ok: false,
        reason: refusal.reason,
        retryAfterSeconds,
        headers: { ...headers(key.limits, requests, tokens, now), 'retry-after': String(retryAfterSeconds) },
      }
    }
    add(w, w.requests, now, 1)
    w.inFlight++
    let released = false
    const release = (): void => {
      if (released) return
      released = true
      w.inFlight--
      w.lastActivityMs = Math.max(w.lastActivityMs, this.now())
    }
    const after = rpm != null ? use(w, w.requests, now) : null
    return { ok: true, release, headers: headers(key.limits, after, tokens, now) }
  }

  /** Charges TOKENS (prompt + completion) to KEY_ID's window, once its response is done. */
  record(keyId: string, tokens: number): void {
    if (!Number.isFinite(tokens) || tokens <= 0) return
    const now = this.now()
    const w = this.window(keyId, now)
    add(w, w.tokens, now, tokens)
  }

  /** How many keys the limiter holds state for (idle ones are dropped). */
  get trackedKeys(): number {
    return this.windows.size
  }

  /** Drops keys with nothing in flight and no activity for idleKeyMs; check() runs it every sweepIntervalMs. */
  sweep(now = this.now()): void {
    this.lastSweepMs = now
    for (const [id, w] of this.windows)
      if (w.inFlight === 0 && now - w.lastActivityMs >= idleKeyMs) this.windows.delete(id)
  }

  private maybeSweep(now: number): void {
    if (now - this.lastSweepMs >= sweepIntervalMs) this.sweep(now)
  }

  private window(id: string, now: number): KeyWindow {
    let w = this.windows.get(id)
    if (w == null) {
      w = {
        seconds: new Uint32Array(windowSeconds),
        requests: new Uint32Array(windowSeconds),
        tokens: new Float64Array(windowSeconds),
        inFlight: 0,
        lastActivityMs: now,
      }
      this.windows.set(id, w)
    }
    w.lastActivityMs = Math.max(w.lastActivityMs, now)
    return w
  }
}

function isLive(second: number, current: number): boolean {
  return second > current - windowSeconds && second <= current
}

function add(w: KeyWindow, counts: Uint32Array | Float64Array, now: number, amount: number): void {
  const second = Math.floor(now / 1000)
  const slot = second % windowSeconds
  if (w.seconds[slot] !== second) {
    // The slot last held a second that has left the window: both counters start over.
    w.seconds[slot] = second
    w.requests[slot] = 0
    w.tokens[slot] = 0
  }
  counts[slot] = (counts[slot] as number) + amount
}

function use(w: KeyWindow, counts: Uint32Array | Float64Array, now: number): WindowUse {
  const current = Math.floor(now / 1000)
  const buckets: Array<{ second: number; count: number }> = []
  let total = 0
  for (let i = 0; i < windowSeconds; i++) {
    const second = w.seconds[i] as number
    const count = counts[i] as number
    if (count > 0 && isLive(second, current)) {
      buckets.push({ second, count })
      total += count
    }
  }
  buckets.sort((a, b) => a.second - b.second)
  const expiresAtMs = (second: number): number => (second + windowSeconds) * 1000
  return {
    total,
    newestSecond: buckets.at(-1)?.second ?? null,
    msUntilBelow: (limit) => {
      let left = total
      for (const b of buckets) {
        if (left < limit) break
        left -= b.count
        if (left < limit) return expiresAtMs(b.second) - now
      }
      return 0
    },
  }
}

/** OpenAI's x-ratelimit-* headers, for the limits the key has (an unlimited dimension sends none). */
function headers(
  limits: Readonly<KeyLimits>,
  requests: WindowUse | null,
  tokens: WindowUse | null,
  now: number,
): RateLimitHeaders {
  const out: RateLimitHeaders = {}
  const resetMs = (u: WindowUse): number =>
    u.newestSecond == null ? 0 : (u.newestSecond + windowSeconds) * 1000 - now
  if (limits.rpm != null && requests != null) {
    out['x-ratelimit-limit-requests'] = String(limits.rpm)
    out['x-ratelimit-remaining-requests'] = String(Math.max(0, limits.rpm - requests.total))
    out['x-ratelimit-reset-requests'] = formatResetDuration(resetMs(requests))
  }
  if (limits.tpm != null && tokens != null) {
    out['x-ratelimit-limit-tokens'] = String(limits.tpm)
    out['x-ratelimit-remaining-tokens'] = String(Math.max(0, limits.tpm - tokens.total))
    out['x-ratelimit-reset-tokens'] = formatResetDuration(resetMs(tokens))
  }
  return out
}
