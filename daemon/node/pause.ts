/**
 * Why the node is paused, and the moves between serving and paused. Several sources may hold a
 * pause at once (the user, a game, the schedule, the battery); the node resumes when none does.
 * Moves run one at a time, in order: a pause that arrives while a resume is under way waits for it.
 */

/** What the controller drives: the daemon's state and its two moves. */
export interface PauseHooks {
  /** 'serving' and 'paused' are the states it moves between; others leave the move for later. */
  state(): string
  /** serving → paused: stop routing here, let requests finish, free the GPU. */
  enter(reasons: string[]): Promise<void>
  /** paused → serving: start the engine, join again. */
  leave(): Promise<void>
  /** Still paused, for other reasons now: tell the watchers. */
  changed(): void
  /** A move failed (the daemon logs it; the next pause or resume tries again). */
  failed(err: Error): void
}

export interface PauseRequest {
  minutes?: number
  until?: Date
  reason?: string
  /** Who holds the pause: 'user' (the default, takes minutes/until) or a host policy. */
  source?: string
}

export class PauseController {
  readonly #hooks: PauseHooks
  readonly #reasons = new Map<string, string[]>()
  #until: Date | null = null
  #timer: NodeJS.Timeout | null = null
  #moves: Promise<void> = Promise.resolve()

  constructor(hooks: PauseHooks) {
    this.#hooks = hooks
  }

  /** True while any source holds a pause. */
  get wanted(): boolean {
    return this.#reasons.size > 0
  }

  /** Every reason held now, in the order the sources paused. */
  reasons(): string[] {
    return [...this.#reasons.values()].flat()
  }

  /** When the user's pause ends by itself, if it was given a length. */
  get until(): Date | null {
    return this.#until
  }

  pause(request: PauseRequest = {}): Promise<void> {
    const source = request.source ?? 'user'
    this.#reasons.set(source, [request.reason ?? (source === 'user' ? 'paused by you' : source)])
    if (source === 'user') {
      this.#clearTimer()
      const until =
        request.until ?? (request.minutes != null ? new Date(Date.now() + request.minutes * 60_000) : null)
      this.#until = until
      if (until != null) {
        this.#timer = setTimeout(() => void this.resume(), Math.max(0, until.getTime() - Date.now()))
        this.#timer.unref()
      }
    }
    return this.#move()
  }

  /** Lifts a pause (the user's by default). */
  resume(options: { source?: string } = {}): Promise<void> {
    const source = options.source ?? 'user'
    this.#reasons.delete(source)
    if (source === 'user') {
      this.#clearTimer()
      this.#until = null
    }
    return this.#move()
  }

  /** Forgets the user's pause timer (the daemon stops). */
  stop(): void {
    this.#clearTimer()
  }

  #clearTimer(): void {
    if (this.#timer != null) clearTimeout(this.#timer)
    this.#timer = null
  }

  /** Moves between serving and paused to match the reasons, one move at a time. */
  #move(): Promise<void> {
    const next = this.#moves.then(async () => {
      const state = this.#hooks.state()
      if (this.wanted && state === 'serving') await this.#hooks.enter(this.reasons())
      else if (this.wanted && state === 'paused') this.#hooks.changed()
      else if (!this.wanted && state === 'paused') await this.#hooks.leave()
    })
    this.#moves = next.catch((err: Error) => this.#hooks.failed(err))
    return next
  }
}
