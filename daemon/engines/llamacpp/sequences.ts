import { setTimeout as sleep } from 'node:timers/promises'
import type { LlamaContextSequence } from 'node-llama-cpp'
import { apiError } from '../../../core/errors.ts'

/** Milliseconds between one sequence's tokens under a cap; anything but a positive finite cap is refused. */
export function tokenIntervalMs(maxTokensPerSecond: number): number {
  if (
    typeof maxTokensPerSecond !== 'number' ||
    !Number.isFinite(maxTokensPerSecond) ||
    maxTokensPerSecond <= 0
  ) {
    throw new RangeError(
      `maxTokensPerSecond must be a positive finite number (tokens per second per sequence); got ${String(maxTokensPerSecond)}`,
    )
  }
  return 1000 / maxTokensPerSecond
}

// Node's timers fire after 1 ms instead of waiting longer than this.
const maxTimerMs = 2 ** 31 - 1

/** Passes a sequence's tokens on, asking for each after the first no sooner than intervalMs after the one before. */
async function* pacedTokens<T, N>(
  inner: AsyncGenerator<T, void, N>,
  intervalMs: number,
  signal: AbortSignal,
): AsyncGenerator<T, void, N> {
  let input: N | undefined
  let lastAt = Number.NEGATIVE_INFINITY
  try {
    while (true) {
      // An abort ends the wait: the caller sees its signal at the next token and stops.
      for (let wait = lastAt + intervalMs - performance.now(); wait > 0 && !signal.aborted; ) {
        await sleep(Math.min(wait, maxTimerMs), undefined, { signal }).catch(() => undefined)
        wait = lastAt + intervalMs - performance.now()
      }
      const { value, done } = await inner.next(input as N)
      if (done) return
      lastAt = performance.now()
      input = yield value
    }
  } finally {
    await inner.return()
  }
}

/**
 * The sequence as one capped generation sees it. Not the context's batching `dispatchSchedule`: in
 * node-llama-cpp 3.22 the context decodes at once when every sequence is waiting and keeps decoding
 * inside one dispatch while sequences keep queueing, so paced dispatches do not cap a sequence.
 */
export function pacedSequence(
  sequence: LlamaContextSequence,
  intervalMs: number,
  signal: AbortSignal,
): LlamaContextSequence {
  const evaluateWithMetadata: LlamaContextSequence['evaluateWithMetadata'] = (tokens, metadata, options) =>
    pacedTokens(sequence.evaluateWithMetadata(tokens, metadata, options), intervalMs, signal)
  // evaluate() calls this.evaluateWithMetadata, so this one method paces both.
  return new Proxy(sequence, {
    get: (target, key, receiver) =>
      key === 'evaluateWithMetadata' ? evaluateWithMetadata : Reflect.get(target, key, receiver),
  })
}

export interface PoolSlot<T> {
  value: T
  busy: boolean
}

export type Slot = PoolSlot<LlamaContextSequence>

/** What the engine's metrics read of a pool. */
export interface PoolStats {
  readonly running: number
  readonly queued: number
  /** KV cells in use. */
  readonly usedTokens: number
}

/** Grants what it holds (sequences, an embedding context) to requests: one each, a bounded queue behind. */
export class SlotPool<T> implements PoolStats {
  private readonly slots: Array<PoolSlot<T>>
  private readonly waiting: Array<{
    resolve: (s: PoolSlot<T>) => void
    reject: (e: Error) => void
    signal: AbortSignal
  }> = []
  private readonly maxQueue: number
  private readonly used: (value: T) => number

  constructor(values: T[], maxQueue: number, used: (value: T) => number = () => 0) {
    this.slots = values.map((value) => ({ value, busy: false }))
    this.maxQueue = maxQueue
    this.used = used
  }

  get running(): number {
    return this.slots.filter((s) => s.busy).length
  }

  get queued(): number {
    return this.waiting.length
  }

  get usedTokens(): number {
    return this.slots.reduce((n, s) => n + (s.busy ? this.used(s.value) : 0), 0)
  }

  acquire(signal: AbortSignal): Promise<PoolSlot<T>> {
    const free = this.slots.find((s) => !s.busy)
    if (free != null) {
      free.busy = true
      return Promise.resolve(free)
    }
    if (this.waiting.length >= this.maxQueue) {
      return Promise.reject(
        apiError(
          'engine_overloaded',
          `the engine is busy: ${this.slots.length} requests running and ${this.waiting.length} waiting`,
          { headers: { 'retry-after': '1' } },
        ),
      )
    }
    return new Promise((resolve, reject) => {
      const entry = { resolve, reject, signal }
      this.waiting.push(entry)
      signal.addEventListener(
        'abort',
        () => {
          const i = this.waiting.indexOf(entry)
          if (i >= 0) this.waiting.splice(i, 1)
          reject(new Error('client went away while queued'))
        },
        { once: true },
      )
    })
  }

  release(slot: PoolSlot<T>): void {
    const next = this.waiting.shift()
    if (next != null) next.resolve(slot)
    else slot.busy = false
  }
}

/** Sequences for generation: `parallel` at once. */
export class SequencePool extends SlotPool<LlamaContextSequence> {
  constructor(sequences: LlamaContextSequence[], maxQueue: number) {
    super(sequences, maxQueue, (sequence) => sequence.nextTokenIndex)
  }
}
