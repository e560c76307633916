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

/**
 * Admits a key's requests and charges its tokens: the in-memory RateLimiter (one process, beside
 * SQLite) or the PostgreSQL one (every gateway sharing the database). Both decide with decide().
 */
export interface KeyLimiter {
  /** Admits a request for KEY (counting it and holding a concurrency slot until release()) or says why not. */
  check(key: RateLimitedKey): RateLimitDecision | Promise<RateLimitDecision>
  /** Charges TOKENS (prompt + completion) to KEY_ID's window, once its response is done. */
  record(keyId: string, tokens: number): void
  /** Writes what is pending and gives back the slots held (a no-op in memory). */
  close(): Promise<void>
}

/** One second of a key's window: its epoch second and the count in it. */
export interface Bucket {
  second: number
  count: number
}

/** A key's window as it stands before a request: live buckets (oldest first) and the requests in flight. */
export interface KeyWindowState {
  requests: Bucket[]
  tokens: Bucket[]
  inFlight: number
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

type Verdict =
  | { ok: true; headers: RateLimitHeaders }
  | { ok: false; reason: RateLimitReason; retryAfterSeconds: number; headers: RateLimitHeaders }

/**
 * The decision on one request of a key, from its window before the request: refused (which limit,
 * Retry-After, headers) or admitted (headers that count the request itself). A dimension without a
 * limit is neither checked nor reported. Both limiters decide here; PostgreSQL applies the same
 * comparisons atomically in the database and this turns its answer into headers.
 */
export function decide(limits: Readonly<KeyLimits>, state: KeyWindowState, now: number): Verdict {
  const { rpm, tpm, concurrency } = limits
  const requests = rpm != null ? windowUse(state.requests, now) : null
  const tokens = tpm != null ? windowUse(state.tokens, now) : null
  let refusal: { reason: RateLimitReason; waitMs: number } | null = null
  if (requests != null && rpm != null && requests.total >= rpm)
    refusal = { reason: 'rpm', waitMs: requests.msUntilBelow(rpm) }
  else if (tokens != null && tpm != null && tokens.total >= tpm)
    refusal = { reason: 'tpm', waitMs: tokens.msUntilBelow(tpm) }
  // No way to know when a request in flight ends: one second is a polite guess.
  else if (concurrency != null && state.inFlight >= concurrency)
    refusal = { reason: 'concurrency', waitMs: 1000 }
  if (refusal != null) {
    const retryAfterSeconds = Math.max(1, Math.ceil(refusal.waitMs / 1000))
    return {
      ok: false,
      reason: refusal.reason,
      retryAfterSeconds,
      headers: { ...headers(limits, requests, tokens, now), 'retry-after': String(retryAfterSeconds) },
    }
  }
  // The request itself is in the window now: one more, in the current second.
  const after: WindowUse | null =
    requests != null
      ? { total: requests.total + 1, newestSecond: Math.floor(now / 1000), msUntilBelow: () => 0 }
      : null
  return { ok: true, headers: headers(limits, after, tokens, now) }
}

/**
 * Per-key requests per minute, tokens per minute and requests in flight, over a sliding one-minute
 * window of one-second buckets. In memory, per process: the limiter beside the SQLite store (one
 * gateway). Tokens are charged after a response with record(); check() refuses once the last
 * minute's tokens reach the key's tpm.
 */
export class RateLimiter implements KeyLimiter {
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
    const { rpm, tpm } = key.limits
    const verdict = decide(
      key.limits,
      {
        requests: rpm != null ? liveBuckets(w, w.requests, now) : [],
        tokens: tpm != null ? liveBuckets(w, w.tokens, now) : [],
        inFlight: w.inFlight,
      },
      now,
    )
    if (!verdict.ok) return verdict
    add(w, w.requests, now, 1)
    w.inFlight++
    let released = false
    const release = (): void => {
      if (released) return
      released = true
      w.inFlight--
      w.lastActivityMs = Math.max(w.lastActivityMs, this.now())
    }
    return { ok: true, release, headers: verdict.headers }
  }

  /** Charges TOKENS (prompt + completion) to KEY_ID's window, once its response is done. */
  record(keyId: string, tokens: number): void {
    if (!Number.isFinite(tokens) || tokens <= 0) return
    const now = this.now()
    const w = this.window(keyId, now)
    add(w, w.tokens, now, tokens)
  }

  async close(): Promise<void> {}

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

/** The ring's live, non-empty buckets. */
function liveBuckets(w: KeyWindow, counts: Uint32Array | Float64Array, now: number): Bucket[] {
  const current = Math.floor(now / 1000)
  const buckets: Bucket[] = []
  for (let i = 0; i < windowSeconds; i++) {
    const second = w.seconds[i] as number
    const count = counts[i] as number
    if (count > 0 && isLive(second, current)) buckets.push({ second, count })
  }
  return buckets
}

/** What a window holds now, from its buckets (any order; dead and empty ones are ignored). */
function windowUse(all: Bucket[], now: number): WindowUse {
  const current = Math.floor(now / 1000)
  const buckets = all.filter((b) => b.count > 0 && isLive(b.second, current))
  buckets.sort((a, b) => a.second - b.second)
  let total = 0
  for (const b of buckets) total += b.count
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
