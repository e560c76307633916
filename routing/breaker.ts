/**
 * The circuit breaker both routers keep per target (a node, a region), fed only by failure() and
 * success(): `failureThreshold` consecutive failures open it for `baseOpenMs`; after that it is
 * half-open and lets one trial request through; a failure then re-opens it for twice as long (up to
 * `maxOpenMs`); any success closes it and resets the backoff.
 */

export const breakerFailureThreshold = 3
export const breakerBaseOpenMs = 1_000
export const breakerMaxOpenMs = 30_000

export type BreakerState = 'closed' | 'open' | 'half-open'

/** A request begun through the breaker; pass it back to end(). */
export type BreakerToken = object

export class CircuitBreaker {
  consecutiveFailures = 0
  /** null = closed; otherwise open until this time, half-open after it. */
  openUntil: number | null = null
  /** Length of the last opening (0 = never opened since the last success). */
  #openMs = 0
  /** The half-open trial in flight, if any. */
  #trial: BreakerToken | null = null

  state(now: number): BreakerState {
    if (this.openUntil == null) return 'closed'
    return now < this.openUntil ? 'open' : 'half-open'
  }

  /** May a new request go to the target now (closed, or half-open with no trial in flight)? */
  admits(now: number): boolean {
    const state = this.state(now)
    return state === 'closed' || (state === 'half-open' && this.#trial == null)
  }

  /** Counts a request in; the first one through a half-open breaker is its trial. */
  begin(now: number): BreakerToken {
    const token = {}
    if (this.#trial == null && this.state(now) === 'half-open') this.#trial = token
    return token
  }

  end(token: BreakerToken): void {
    if (this.#trial === token) this.#trial = null
  }

  /** The target failed a request (unreachable, 5xx, broke mid-stream). */
  failure(now: number): void {
    const state = this.state(now)
    // Requests begun before the breaker opened say nothing new while it is open.
    if (state === 'open') return
    if (state === 'half-open') {
      this.#open(now)
      return
    }
    this.consecutiveFailures++
    if (this.consecutiveFailures >= breakerFailureThreshold) this.#open(now)
  }

  /** The target answered a request in full. */
  success(): void {
    this.consecutiveFailures = 0
    this.openUntil = null
    this.#openMs = 0
    this.#trial = null
  }

  #open(now: number): void {
    this.#openMs = this.#openMs === 0 ? breakerBaseOpenMs : Math.min(this.#openMs * 2, breakerMaxOpenMs)
    this.openUntil = now + this.#openMs
    this.consecutiveFailures = 0
    this.#trial = null
  }
}
