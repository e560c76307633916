import { describe, expect, it } from 'vitest'
import { medianRefreshMs, RegionalRouter, type RequestTicket } from '../../routing/node-router.ts'

/** A seeded PRNG (mulberry32) so every run routes the same way. */
function seeded(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

class Clock {
  t = 0
  now = (): number => this.t
}

function setup(random: () => number = seeded(1)): { router: RegionalRouter; clock: Clock } {
  const clock = new Clock()
  return { router: new RegionalRouter({ now: clock.now, random }), clock }
}

/** Proxies one request: first byte now, `tokens` decoded over `ms`. */
function measure(router: RegionalRouter, clock: Clock, peer: string, tokens: number, ms: number): void {
  const ticket = router.begin(peer)
  ticket.firstByte()
  clock.t += ms
  ticket.end({ ok: true, completionTokens: tokens })
}

function serving(router: RegionalRouter, peers: string[], slots = 1, model = 'm'): void {
  for (const p of peers) router.upsert(p, { model, slots, state: 'serving' })
}

describe('RegionalRouter: closed-loop share follows measured capacity', () => {
  /**
   * Discrete-event simulation: `clients` each keep one request outstanding; a node decodes up to
   * `slots` sequences at once at its per-sequence rate and queues the rest (FIFO), as an engine does.
   */
  function simulate(clients: number, rates: number[], slots: number): number[] {
    const random = seeded(42)
    const { router, clock } = setup(random)
    const peers = rates.map((_, i) => `node-${i}`)
    serving(router, peers, slots)
    interface Job {
      peer: number
      ticket: RequestTicket
      tokens: number
      doneAt: number
    }
    const queues: Job[][] = peers.map(() => [])
    const running: Job[][] = peers.map(() => [])
    const completed = peers.map(() => 0)
    const warmupMs = 120_000
    const durationMs = 3_600_000

    const startQueued = (i: number): void => {
      while (running[i]!.length < slots && queues[i]!.length > 0) {
        const job = queues[i]!.shift()!
        job.ticket.firstByte()
        job.doneAt = clock.t + (job.tokens / rates[i]!) * 1000
        running[i]!.push(job)
      }
    }
    const submit = (): void => {
      const peer = router.pick('m')
      expect(peer).not.toBeNull()
      const i = peers.indexOf(peer!)
      const tokens = 50 + Math.floor(random() * 101)
      queues[i]!.push({ peer: i, ticket: router.begin(peer!), tokens, doneAt: 0 })
      startQueued(i)
    }

    for (let c = 0; c < clients; c++) submit()
    while (clock.t < durationMs) {
      let next: Job | null = null
      for (const jobs of running)
        for (const job of jobs) if (next == null || job.doneAt < next.doneAt) next = job
      if (next == null) throw new Error('the simulation stalled')
      clock.t = next.doneAt
      const jobs = running[next.peer]!
      jobs.splice(jobs.indexOf(next), 1)
      next.ticket.end({ ok: true, completionTokens: next.tokens })
      router.success(peers[next.peer]!)
      if (clock.t >= warmupMs) completed[next.peer]!++
      startQueued(next.peer)
      submit()
    }
    // The head measured what the simulation decodes: 20, 20 and 10 tokens/s per sequence, times 4 slots.
    for (const [i, p] of peers.entries()) expect(router.capacity(p)).toBeCloseTo(rates[i]! * slots, 6)
    return completed
  }

  it('16 clients on nodes decoding 2:2:1 with 4 slots: the slow node gets about half the share', () => {
    const [a, b, slow] = simulate(16, [20, 20, 10], 4) as [number, number, number]
    const share = slow / ((a + b) / 2)
    expect(share).toBeGreaterThan(0.35)
    expect(share).toBeLessThan(0.65)
    // The fast nodes split evenly.
    expect(Math.abs(a - b) / (a + b)).toBeLessThan(0.05)
  })

  it('48 clients (every node saturated): the share is the capacity ratio, 0.5', () => {
    const [a, b, slow] = simulate(48, [20, 20, 10], 4) as [number, number, number]
    const share = slow / ((a + b) / 2)
    expect(share).toBeGreaterThan(0.45)
    expect(share).toBeLessThan(0.55)
  })
})

describe('RegionalRouter: eligibility', () => {
  it('never picks a node that is not serving, and follows state changes from telemetry', () => {
    const { router } = setup()
    router.upsert('starting', { model: 'm', slots: 1, state: 'starting' })
    router.upsert('paused', { model: 'm', slots: 1, state: 'paused' })
    router.upsert('draining', { model: 'm', slots: 1, state: 'draining' })
    for (let i = 0; i < 50; i++) expect(router.pick('m')).toBeNull()
    expect(router.models()).toEqual([])

    router.updateTelemetry('starting', { running: 0, waiting: 0, kvCacheUsage: 0, state: 'serving' })
    for (let i = 0; i < 50; i++) expect(router.pick('m')).toBe('starting')
    expect(router.models()).toEqual([{ model: 'm', nodes: 1 }])

    router.updateTelemetry('starting', { running: 0, waiting: 0, kvCacheUsage: 0, state: 'paused' })
    expect(router.pick('m')).toBeNull()
  })

  it('never picks an excluded node (already tried for this request)', () => {
    const { router } = setup()
    serving(router, ['a', 'b', 'c'])
    for (let i = 0; i < 50; i++) {
      const peer = router.pick('m', { exclude: new Set(['a', 'c']) })
      expect(peer).toBe('b')
    }
    expect(router.pick('m', { exclude: new Set(['a', 'b', 'c']) })).toBeNull()
  })

  it('keeps pools per model and lists models with their serving nodes', () => {
    const { router } = setup()
    serving(router, ['a1', 'a2'], 1, 'alpha')
    serving(router, ['b1'], 1, 'beta')
    router.upsert('b2', { model: 'beta', slots: 1, state: 'paused' })
    expect(router.models()).toEqual([
      { model: 'alpha', nodes: 2 },
      { model: 'beta', nodes: 1 },
    ])
    for (let i = 0; i < 20; i++) expect(router.pick('beta')).toBe('b1')
    expect(router.pick('gamma')).toBeNull()

    // Moving a node to another model moves it between pools.
    router.upsert('a2', { model: 'beta', slots: 1, state: 'serving' })
    expect(router.models()).toEqual([
      { model: 'alpha', nodes: 1 },
      { model: 'beta', nodes: 2 },
    ])
    router.remove('a1')
    expect(router.models()).toEqual([{ model: 'beta', nodes: 2 }])
    expect(router.pick('alpha')).toBeNull()
  })

  it('refuses a registration without a positive whole number of slots', () => {
    const { router } = setup()
    expect(() => router.upsert('a', { model: 'm', slots: 0, state: 'serving' })).toThrow(
      expect.objectContaining({ name: 'InvalidNodeSlotsError' }),
    )
    expect(() => router.begin('nobody')).toThrow(expect.objectContaining({ name: 'UnknownNodeError' }))
  })
})

describe('RegionalRouter: scoring and ties', () => {
  it('spreads requests by (inflight + 1) / capacity', () => {
    const { router, clock } = setup()
    serving(router, ['fast', 'slow'])
    measure(router, clock, 'fast', 100, 1000) // 100 tok/s
    measure(router, clock, 'slow', 50, 1000) // 50 tok/s
    // Keep requests outstanding: the fast node holds about twice as many.
    for (let i = 0; i < 30; i++) router.begin(router.pick('m')!)
    expect(router.inflight('fast')).toBe(20)
    expect(router.inflight('slow')).toBe(10)
  })

  it('breaks ties within 1% by lower KV-cache usage, then fewer waiting, then at random', () => {
    const { router, clock } = setup()
    serving(router, ['a', 'b', 'c'])
    measure(router, clock, 'a', 1000, 1000)
    measure(router, clock, 'b', 1005, 1000) // 0.5% faster: still a tie
    measure(router, clock, 'c', 1005, 1000)
    const load = (peer: string, kvCacheUsage: number, waiting: number): void => {
      router.updateTelemetry(peer, { running: 1, waiting, kvCacheUsage, state: 'serving' })
    }
    load('a', 0.2, 5)
    load('b', 0.5, 0)
    load('c', 0.5, 0)
    for (let i = 0; i < 20; i++) expect(router.pick('m')).toBe('a')
    load('a', 0.5, 3)
    load('b', 0.5, 1)
    load('c', 0.5, 2)
    for (let i = 0; i < 20; i++) expect(router.pick('m')).toBe('b')
    load('b', 0.5, 0)
    load('c', 0.5, 0)
    const seen = new Map<string, number>()
    for (let i = 0; i < 400; i++) {
      const p = router.pick('m')!
      seen.set(p, (seen.get(p) ?? 0) + 1)
    }
    expect([...seen.keys()].sort()).toEqual(['b', 'c'])
    expect(seen.get('b')!).toBeGreaterThan(150)
    expect(seen.get('c')!).toBeGreaterThan(150)
  })

  it('does not let load signals override a score more than 1% better', () => {
    const { router, clock } = setup()
    serving(router, ['a', 'b'])
    measure(router, clock, 'a', 1000, 1000)
    measure(router, clock, 'b', 1020, 1000) // 2% faster
    router.updateTelemetry('a', { running: 0, waiting: 0, kvCacheUsage: 0, state: 'serving' })
    router.updateTelemetry('b', { running: 0, waiting: 9, kvCacheUsage: 0.9, state: 'serving' })
    expect(router.pick('m')).toBe('b')
  })

  it('uses the random source for exact ties', () => {
    let next = 0
    const { router } = setup(() => next)
    serving(router, ['a', 'b', 'c'])
    next = 0
    expect(router.pick('m')).toBe('a')
    next = 0.5
    expect(router.pick('m')).toBe('b')
    next = 0.9999
    expect(router.pick('m')).toBe('c')
  })
})

describe('RegionalRouter: measured capacity', () => {
  it('is an EWMA (alpha 0.2) of tokens / decode seconds, times slots', () => {
    const { router, clock } = setup()
    serving(router, ['a'], 4)
    measure(router, clock, 'a', 100, 1000) // 100 tok/s
    expect(router.capacity('a')).toBeCloseTo(400, 9)
    measure(router, clock, 'a', 200, 1000) // 200 tok/s -> 100 + 0.2 * 100 = 120
    expect(router.capacity('a')).toBeCloseTo(480, 9)
    // Slots change with a new assignment; the rate stays.
    router.upsert('a', { model: 'm', slots: 2, state: 'serving' })
    expect(router.capacity('a')).toBeCloseTo(240, 9)
  })

  it('measures decode from the first byte, not from the start of the request', () => {
    const { router, clock } = setup()
    serving(router, ['a'])
    const ticket = router.begin('a')
    clock.t += 5000 // queueing and prefill
    ticket.firstByte()
    clock.t += 500
    ticket.end({ ok: true, completionTokens: 50 })
    expect(router.capacity('a')).toBeCloseTo(100, 9)
  })

  it('skips requests too short to say anything, failed ones and ones without a first byte', () => {
    const { router, clock } = setup()
    serving(router, ['a'])
    measure(router, clock, 'a', 3, 1000) // fewer than 4 tokens
    measure(router, clock, 'a', 100, 4) // under 5 ms of decode
    const failed = router.begin('a')
    failed.firstByte()
    clock.t += 1000
    failed.end({ ok: false, completionTokens: 10 })
    const noFirstByte = router.begin('a')
    clock.t += 1000
    noFirstByte.end({ ok: true, completionTokens: 10 })
    expect(router.snapshot()[0]).toMatchObject({
      measured: false,
      decodeRate: null,
      capacity: 1,
      inflight: 0,
    })
    measure(router, clock, 'a', 4, 5) // the smallest that counts: 800 tok/s
    expect(router.capacity('a')).toBeCloseTo(800, 9)
  })

  it('gives an unmeasured node the pool median, or 1 when nobody is measured', () => {
    const { router, clock } = setup()
    serving(router, ['a', 'b', 'c', 'new'])
    for (const p of ['a', 'b', 'c', 'new']) expect(router.capacity(p)).toBe(1)
    measure(router, clock, 'a', 10, 1000)
    measure(router, clock, 'b', 30, 1000)
    expect(router.capacity('new')).toBeCloseTo(20, 9)
    measure(router, clock, 'c', 100, 1000)
    expect(router.capacity('new')).toBeCloseTo(30, 9)
    expect(router.capacity('c')).toBeCloseTo(100, 9)
    // A newcomer at the median gets work at once.
    expect(router.pick('m')).toBe('c')
    for (let i = 0; i < 3; i++) router.begin('c') // score 4/100 against 1/30
    expect(router.pick('m', { exclude: new Set(['a', 'b']) })).toBe('new')
  })

  it('re-sorts the pool median at most once per medianRefreshMs, however many requests finish', () => {
    const { router, clock } = setup()
    serving(router, ['a', 'b', 'new'])
    measure(router, clock, 'a', 10, 1000)
    measure(router, clock, 'b', 30, 1000)
    expect(router.capacity('new')).toBeCloseTo(20, 9)
    // Within the refresh interval a new measurement does not move the median yet...
    measure(router, clock, 'b', 50, medianRefreshMs / 2)
    expect(router.capacity('new')).toBeCloseTo(20, 9)
    // ...once it has passed, the next pick sees it (b's rate is now an EWMA between 30 and 100).
    clock.t += medianRefreshMs
    expect(router.capacity('new')).toBeGreaterThan(20)
  })

  it('forgets a rate measured on another model', () => {
    const { router, clock } = setup()
    serving(router, ['a', 'b'])
    measure(router, clock, 'a', 100, 1000)
    router.upsert('a', { model: 'other', slots: 1, state: 'serving' })
    expect(router.capacity('a')).toBe(1)
    expect(router.capacity('b')).toBe(1)
  })

  it('drops a ticket of a node that left, even if it rejoins', () => {
    const { router, clock } = setup()
    serving(router, ['a'])
    const ticket = router.begin('a')
    ticket.firstByte()
    router.remove('a')
    serving(router, ['a'])
    clock.t += 1000
    ticket.tokens(100)
    ticket.end({ ok: true, completionTokens: 100 })
    expect(router.snapshot()[0]).toMatchObject({ inflight: 0, measured: false, tokensSeen: 0 })
  })

  it('ends a ticket once and reports the node in the snapshot', () => {
    const { router, clock } = setup()
    serving(router, ['a'], 2)
    router.updateTelemetry('a', { running: 1, waiting: 2, kvCacheUsage: 0.25, state: 'serving' })
    const ticket = router.begin('a')
    ticket.tokens(3) // implies the first byte
    clock.t += 1000
    ticket.tokens(7)
    ticket.end({ ok: true, completionTokens: 10 })
    ticket.end({ ok: true, completionTokens: 10 })
    expect(router.snapshot()).toEqual([
      {
        peerId: 'a',
        model: 'm',
        state: 'serving',
        slots: 2,
        inflight: 0,
        capacity: 20,
        measured: true,
        decodeRate: 10,
        breaker: 'closed',
        consecutiveFailures: 0,
        tokensSeen: 10,
        running: 1,
        waiting: 2,
        kvCacheUsage: 0.25,
      },
    ])
  })
})

describe('RegionalRouter: circuit breaker', () => {
  it('a node that joins again (restarted after a kill) starts with its breaker closed', () => {
    const { router } = setup()
    serving(router, ['a'])
    for (let i = 0; i < 3; i++) router.failure('a')
    expect(router.breakerState('a')).toBe('open')
    expect(router.pick('m')).toBeNull()
    router.joined('a')
    expect(router.breakerState('a')).toBe('closed')
    expect(router.pick('m')).toBe('a')
  })

  it('opens after 3 consecutive failures, half-opens for one trial, doubles to 30 s, resets on success', () => {
    const { router, clock } = setup()
    serving(router, ['a'])
    router.failure('a')
    router.failure('a')
    expect(router.breakerState('a')).toBe('closed')
    expect(router.pick('m')).toBe('a')
    router.failure('a')
    expect(router.breakerState('a')).toBe('open')
    expect(router.pick('m')).toBeNull()

    const expectedOpenMs = [1000, 2000, 4000, 8000, 16000, 30000, 30000]
    for (const openMs of expectedOpenMs) {
      clock.t += openMs - 1
      expect(router.pick('m')).toBeNull()
      clock.t += 1
      expect(router.breakerState('a')).toBe('half-open')
      expect(router.pick('m')).toBe('a')
      const trial = router.begin('a')
      // Only one trial at a time.
      expect(router.pick('m')).toBeNull()
      trial.end({ ok: false, completionTokens: 0 })
      router.failure('a')
      expect(router.breakerState('a')).toBe('open')
    }

    clock.t += 30_000
    const trial = router.begin(router.pick('m')!)
    trial.end({ ok: true, completionTokens: 0 })
    router.success('a')
    expect(router.breakerState('a')).toBe('closed')
    expect(router.pick('m')).toBe('a')

    // The backoff starts again at 1 s.
    for (let i = 0; i < 3; i++) router.failure('a')
    clock.t += 999
    expect(router.pick('m')).toBeNull()
    clock.t += 1
    expect(router.pick('m')).toBe('a')
  })

  it('needs the failures to be consecutive', () => {
    const { router } = setup()
    serving(router, ['a'])
    router.failure('a')
    router.failure('a')
    router.success('a')
    router.failure('a')
    router.failure('a')
    expect(router.breakerState('a')).toBe('closed')
    expect(router.snapshot()[0]?.consecutiveFailures).toBe(2)
  })

  it('ignores late failures of requests begun before it opened', () => {
    const { router, clock } = setup()
    serving(router, ['a'])
    for (let i = 0; i < 3; i++) router.failure('a')
    router.failure('a')
    router.failure('a')
    clock.t += 1000
    expect(router.breakerState('a')).toBe('half-open')
    // Still the first backoff: a trial failure now re-opens for 2 s, not more.
    router.begin('a').end({ ok: false, completionTokens: 0 })
    router.failure('a')
    clock.t += 2000
    expect(router.breakerState('a')).toBe('half-open')
  })

  it('lets another trial through when one ends without a verdict (the client went away)', () => {
    const { router, clock } = setup()
    serving(router, ['a'])
    for (let i = 0; i < 3; i++) router.failure('a')
    clock.t += 1000
    const trial = router.begin(router.pick('m')!)
    expect(router.pick('m')).toBeNull()
    trial.end({ ok: false, completionTokens: 0 })
    expect(router.pick('m')).toBe('a')
  })

  it('sends traffic to the other nodes while one is open', () => {
    const { router } = setup()
    serving(router, ['a', 'b'])
    for (let i = 0; i < 3; i++) router.failure('a')
    for (let i = 0; i < 50; i++) expect(router.pick('m')).toBe('b')
    expect(router.snapshot().map((n) => n.breaker)).toEqual(['open', 'closed'])
  })
})
