import { randomInt } from 'node:crypto'

/** A seeded PRNG (mulberry32): the same seed gives the same fault schedule, so a failing run can be replayed. */
export class Random {
  readonly seed: number
  private state: number

  constructor(seed: number) {
    this.seed = seed >>> 0
    this.state = this.seed
  }

  /** A float in [0, 1). */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0
    let t = this.state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4_294_967_296
  }

  /** A whole number in [min, max]. */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1))
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError('pick from an empty list')
    return items[Math.floor(this.next() * items.length)]!
  }

  shuffle<T>(items: readonly T[]): T[] {
    const out = [...items]
    for (let i = out.length - 1; i > 0; i--) {
      const j = Math.floor(this.next() * (i + 1))
      ;[out[i], out[j]] = [out[j]!, out[i]!]
    }
    return out
  }

  /** An independent stream for another purpose, so one consumer's draws do not shift the other's. */
  fork(salt: number): Random {
    return new Random((this.seed ^ Math.imul(salt, 0x9e3779b1)) >>> 0)
  }
}

/** GARAGE_FAULT_SEED when set (a failing run prints its seed), else a fresh one. */
export function faultSeed(env: NodeJS.ProcessEnv = process.env): number {
  const given = env.GARAGE_FAULT_SEED
  if (given != null && given !== '') {
    const n = Number(given)
    if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) {
      throw new RangeError(`GARAGE_FAULT_SEED must be a whole number from 0 to 4294967295, got ${given}`)
    }
    return n
  }
  return randomInt(0, 0xffffffff)
}
