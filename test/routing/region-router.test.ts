import { describe, expect, it } from 'vitest'
import type { RegionStatus } from '../../federation/regions.ts'
import type { RegionModelLoad } from '../../routing/region-router.ts'
import { FederationRouter } from '../../routing/region-router.ts'

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

function setup(random: () => number = seeded(1)): { router: FederationRouter; clock: Clock } {
  const clock = new Clock()
  return { router: new FederationRouter({ now: clock.now, random }), clock }
}

function load(over: Partial<RegionModelLoad> = {}): RegionModelLoad {
  return { nodes: 1, capacityTokensPerSecond: 100, inflight: 0, slots: 4, ...over }
}

function status(
  region: string,
  models: Record<string, RegionModelLoad>,
  over: Partial<RegionStatus> = {},
): RegionStatus {
  return {
    region,
    head: `head-${region}`,
    rttMs: 10,
    expiresAt: null,
    models: new Map(Object.entries(models)),
    held: [],
    updatedAt: 0,
    reachable: true,
    error: null,
    ...over,
  }
}

/** How often each region is picked in `n` tries. */
function tally(router: FederationRouter, model: string, n: number): Record<string, number> {
  const seen: Record<string, number> = {}
  for (let i = 0; i < n; i++) {
    const r = router.pick(model) ?? 'none'
    seen[r] = (seen[r] ?? 0) + 1
  }
  return seen
}

describe('FederationRouter: which regions may be picked', () => {
  it("counts a region whose head has measured no node yet at the others' rate per slot, so it is not starved", () => {
    const { router } = setup()
    // A restarted head reports capacity 0 until it measures a node; the other region is measured.
    router.update(status('measured', { m: load({ capacityTokensPerSecond: 400, slots: 4, inflight: 2 }) }))
    router.update(status('restarted', { m: load({ capacityTokensPerSecond: 0, slots: 4, inflight: 0 }) }))
    // At 100 tok/s per slot the restarted region's 4 idle slots weigh as much as the measured region's.
    expect(router.load('restarted', 'm')).toBeCloseTo(1 / 400, 9)
    expect(router.pick('m')).toBe('restarted')
    // With no region measured at all, 1 per slot for everyone: the idle one still wins.
    router.update(status('measured', { m: load({ capacityTokensPerSecond: 0, slots: 4, inflight: 2 }) }))
    expect(router.load('restarted', 'm')).toBeCloseTo(1 / 4, 9)
    expect(router.pick('m')).toBe('restarted')
  })

  it('picks only reachable regions that serve the model with at least one node', () => {
    const { router } = setup()
    router.update(status('down', { m: load() }, { reachable: false }))
    router.update(status('empty', { m: load({ nodes: 0 }) }))
    router.update(status('other', { x: load() }))
    expect(router.pick('m')).toBeNull()

    router.update(status('up', { m: load({ capacityTokensPerSecond: 1, inflight: 50 }) }))
    // Availability comes before load: the only region that can serve it takes it, however busy.
    expect(tally(router, 'm', 50)).toEqual({ up: 50 })
    expect(router.pick('x')).toBe('other')
    expect(router.pick('nobody-serves-this')).toBeNull()

    // The directory reports the region unreachable, then back.
    router.update(status('up', { m: load() }, { reachable: false }))
    expect(router.pick('m')).toBeNull()
    router.update(status('up', { m: load() }))
    expect(router.pick('m')).toBe('up')
  })

  it('never picks an excluded region (already tried for this request)', () => {
    const { router } = setup()
    for (const r of ['a', 'b', 'c']) router.update(status(r, { m: load() }))
    for (let i = 0; i < 50; i++) expect(router.pick('m', { exclude: new Set(['a', 'c']) })).toBe('b')
    expect(router.pick('m', { exclude: new Set(['a', 'b', 'c']) })).toBeNull()
  })

  it('forgets a removed region, and drops tickets of a region that was removed or got a new head', () => {
    const { router } = setup()
    router.update(status('a', { m: load() }))
    const old = router.begin('a')
    expect(router.remove('a')).toBe(true)
    expect(router.remove('a')).toBe(false)
    expect(router.pick('m')).toBeNull()
    expect(() => router.begin('a')).toThrow(expect.objectContaining({ name: 'UnknownRegionError' }))

    router.update(status('a', { m: load() }))
    old.end(true)
    expect(router.outstanding('a')).toBe(0)

    // A new head for the region is a fresh record: its breaker and counts start over.
    const ticket = router.begin('a')
    for (let i = 0; i < 3; i++) router.failure('a')
    expect(router.breakerState('a')).toBe('open')
    router.update(status('a', { m: load() }, { head: 'another-head' }))
    expect(router.breakerState('a')).toBe('closed')
    ticket.end(false)
    expect(router.outstanding('a')).toBe(0)
    expect(router.pick('m')).toBe('a')
  })
})

describe('FederationRouter: preference (X-Garage-Region)', () => {
  it('honours the preferred region when it serves the model, even when another is idler', () => {
    const { router } = setup()
    router.update(status('idle', { m: load({ capacityTokensPerSecond: 1000 }) }))
    router.update(status('busy', { m: load({ capacityTokensPerSecond: 10, inflight: 40 }) }))
    expect(router.pick('m')).toBe('idle')
    for (let i = 0; i < 20; i++) expect(router.pick('m', { prefer: 'busy' })).toBe('busy')
  })

  it('ignores the preference when that region cannot take the request', () => {
    const { router, clock } = setup()
    router.update(status('a', { m: load() }))
    router.update(status('other-model', { x: load() }))
    router.update(status('no-nodes', { m: load({ nodes: 0 }) }))
    router.update(status('down', { m: load() }, { reachable: false }))
    router.update(status('broken', { m: load() }))
    for (let i = 0; i < 3; i++) router.failure('broken')
    for (const prefer of ['other-model', 'no-nodes', 'down', 'broken', 'unknown']) {
      expect(router.pick('m', { prefer })).toBe('a')
    }
    expect(router.pick('m', { prefer: 'a', exclude: new Set(['a']) })).toBeNull()
    // Once the breaker half-opens, the preferred region gets its trial.
    clock.t += 1000
    expect(router.pick('m', { prefer: 'broken' })).toBe('broken')
  })
})

describe('FederationRouter: load', () => {
  it('normalises load by capacity: (head inflight + own outstanding + 1) / capacity', () => {
    const { router } = setup()
    router.update(status('big', { m: load({ capacityTokensPerSecond: 300, inflight: 5 }) }))
    router.update(status('small', { m: load({ capacityTokensPerSecond: 100, inflight: 0 }) }))
    expect(router.load('big', 'm')).toBeCloseTo(6 / 300, 12)
    expect(router.load('small', 'm')).toBeCloseTo(1 / 100, 12)
    expect(router.pick('m')).toBe('small')
    // Requests this gateway opened count at once, before the head's next report shows them.
    const tickets = [router.begin('small'), router.begin('small')]
    expect(router.load('small', 'm')).toBeCloseTo(3 / 100, 12)
    expect(router.pick('m')).toBe('big')
    for (const t of tickets) t.end(true)
    expect(router.outstanding('small')).toBe(0)
    expect(router.pick('m')).toBe('small')
  })

  it('keeps outstanding requests in proportion to capacity', () => {
    const { router } = setup()
    router.update(status('fast', { m: load({ capacityTokensPerSecond: 200 }) }, { rttMs: 10 }))
    router.update(status('slow', { m: load({ capacityTokensPerSecond: 100 }) }, { rttMs: 10 }))
    for (let i = 0; i < 300; i++) router.begin(router.pick('m')!)
    const fast = router.outstanding('fast')
    const slow = router.outstanding('slow')
    expect(fast + slow).toBe(300)
    expect(fast / slow).toBeGreaterThan(1.8)
    expect(fast / slow).toBeLessThan(2.2)
  })

  it('falls back to slots when the head reports no capacity, and to 1 when it reports no slots', () => {
    const { router } = setup()
    router.update(status('slots', { m: load({ capacityTokensPerSecond: 0, slots: 8, inflight: 3 }) }))
    router.update(status('nothing', { m: load({ capacityTokensPerSecond: 0, slots: 0, inflight: 3 }) }))
    expect(router.load('slots', 'm')).toBe(4 / 8)
    expect(router.load('nothing', 'm')).toBe(4)
    expect(router.load('slots', 'absent')).toBeNull()
    expect(router.pick('m')).toBe('slots')
  })

  it('treats loads within 10% of the best as ties, broken by lower RTT', () => {
    const { router } = setup()
    router.update(status('near', { m: load({ capacityTokensPerSecond: 100 }) }, { rttMs: 5 }))
    router.update(status('far', { m: load({ capacityTokensPerSecond: 109 }) }, { rttMs: 80 }))
    // far's load is 8% lower: a tie, and near is closer.
    expect(tally(router, 'm', 50)).toEqual({ near: 50 })
    router.update(status('far', { m: load({ capacityTokensPerSecond: 112 }) }, { rttMs: 80 }))
    // 11% lower is not a tie: load wins over proximity.
    expect(tally(router, 'm', 50)).toEqual({ far: 50 })
    // A region without a measured RTT loses a tie to one with any RTT.
    router.update(status('unmeasured', { m: load({ capacityTokensPerSecond: 112 }) }, { rttMs: null }))
    expect(tally(router, 'm', 50)).toEqual({ far: 50 })
  })

  it('spreads ties of equal RTT at random', () => {
    let next = 0
    const { router } = setup(() => next)
    for (const r of ['a', 'b', 'c']) router.update(status(r, { m: load() }))
    next = 0
    expect(router.pick('m')).toBe('a')
    next = 0.5
    expect(router.pick('m')).toBe('b')
    next = 0.9999
    expect(router.pick('m')).toBe('c')

    const spread = setup(seeded(7)).router
    for (const r of ['a', 'b']) spread.update(status(r, { m: load() }))
    const seen = tally(spread, 'm', 400)
    expect(seen.a!).toBeGreaterThan(150)
    expect(seen.b!).toBeGreaterThan(150)
  })
})

describe('FederationRouter: circuit breaker', () => {
  it('opens after 3 consecutive failures, half-opens for one trial, doubles to 30 s, resets on success', () => {
    const { router, clock } = setup()
    router.update(status('a', { m: load() }))
    router.failure('a')
    router.failure('a')
    expect(router.breakerState('a')).toBe('closed')
    expect(router.pick('m')).toBe('a')
    router.failure('a')
    expect(router.breakerState('a')).toBe('open')
    expect(router.pick('m')).toBeNull()

    for (const openMs of [1000, 2000, 4000, 8000, 16000, 30000, 30000]) {
      clock.t += openMs - 1
      expect(router.pick('m')).toBeNull()
      clock.t += 1
      expect(router.breakerState('a')).toBe('half-open')
      expect(router.pick('m')).toBe('a')
      const trial = router.begin('a')
      // Only one trial at a time.
      expect(router.pick('m')).toBeNull()
      trial.end(false)
      router.failure('a')
      expect(router.breakerState('a')).toBe('open')
    }

    clock.t += 30_000
    const trial = router.begin(router.pick('m')!)
    trial.end(true)
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

  it('needs the failures to be consecutive, and ignores failures while open', () => {
    const { router, clock } = setup()
    router.update(status('a', { m: load() }))
    router.failure('a')
    router.failure('a')
    router.success('a')
    router.failure('a')
    router.failure('a')
    expect(router.breakerState('a')).toBe('closed')
    router.failure('a')
    expect(router.breakerState('a')).toBe('open')
    // Late failures of requests begun before it opened neither extend nor double the wait.
    router.failure('a')
    router.failure('a')
    router.failure('a')
    clock.t += 1000
    expect(router.breakerState('a')).toBe('half-open')
    router.failure('a')
    clock.t += 1999
    expect(router.breakerState('a')).toBe('open')
    clock.t += 1
    expect(router.breakerState('a')).toBe('half-open')
  })

  it('sends traffic to another region while one is open, and back once it recovers', () => {
    const { router, clock } = setup()
    router.update(status('near', { m: load() }, { rttMs: 5 }))
    router.update(status('far', { m: load() }, { rttMs: 90 }))
    expect(router.pick('m')).toBe('near')
    for (let i = 0; i < 3; i++) router.failure('near')
    expect(tally(router, 'm', 20)).toEqual({ far: 20 })
    clock.t += 1000
    expect(router.pick('m')).toBe('near')
    router.begin('near').end(true)
    router.success('near')
    expect(tally(router, 'm', 20)).toEqual({ near: 20 })
  })

  it('closes the breaker of a region whose head answers again after an outage (a restarted head)', () => {
    const { router } = setup()
    router.update(status('near', { m: load() }, { rttMs: 5 }))
    router.update(status('far', { m: load() }, { rttMs: 90 }))
    for (let i = 0; i < 3; i++) router.failure('near')
    expect(router.breakerState('near')).toBe('open')
    // Still reachable as far as the directory knows: the breaker stays as it is.
    router.update(status('near', { m: load() }, { rttMs: 5 }))
    expect(router.breakerState('near')).toBe('open')
    router.update(status('near', { m: load() }, { rttMs: 5, reachable: false }))
    router.update(status('near', { m: load() }, { rttMs: 5, reachable: true }))
    expect(router.breakerState('near')).toBe('closed')
    expect(router.pick('m')).toBe('near')
  })

  it('reports every region with its breaker, outstanding requests and loads in the snapshot', () => {
    const { router, clock } = setup()
    router.update(
      status('b', { m: load({ inflight: 1 }), a: load({ capacityTokensPerSecond: 0, slots: 2 }) }),
    )
    router.update(status('a', { m: load() }, { reachable: false, rttMs: null }))
    router.begin('b')
    for (let i = 0; i < 3; i++) router.failure('b')
    expect(router.snapshot()).toEqual([
      {
        region: 'a',
        head: 'head-a',
        reachable: false,
        rttMs: null,
        outstanding: 0,
        breaker: 'closed',
        consecutiveFailures: 0,
        openUntil: null,
        models: [{ model: 'm', ...load(), load: 0.01 }],
      },
      {
        region: 'b',
        head: 'head-b',
        reachable: true,
        rttMs: 10,
        outstanding: 1,
        breaker: 'open',
        consecutiveFailures: 0,
        openUntil: 1000,
        models: [
          { model: 'a', ...load({ capacityTokensPerSecond: 0, slots: 2 }), load: 1 },
          { model: 'm', ...load({ inflight: 1 }), load: 0.03 },
        ],
      },
    ])
    clock.t += 1000
    expect(router.snapshot()[1]!.breaker).toBe('half-open')
  })
})
