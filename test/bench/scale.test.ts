import { describe, expect, it } from 'vitest'
import { garageDiscovery } from '../../bench/scale/dht.ts'
import {
  federationRouterPickCost,
  joinAppCost,
  regionalRouterPickCost,
  telemetryAppCost,
} from '../../bench/scale/head-costs.ts'
import {
  classicKademliaParams,
  commonPrefixBits,
  kadDhtParams,
  lookup,
  ModelNetwork,
  provide,
  randomKey,
  seededRandom,
  stats,
} from '../../bench/scale/kademlia.ts'

describe('the Kademlia model', () => {
  it('keeps kad-dht 16 tables: at most k peers per 6-bit prefix, never the owner', () => {
    const net = ModelNetwork.random(5_000, kadDhtParams, 1)
    for (const owner of [0, 17, 4_999]) {
      const table = [...net.table(owner)]
      expect(table).not.toContain(owner)
      expect(new Set(table).size).toBe(table.length)
      const perPrefix = new Map<number, number>()
      for (const p of table) {
        const prefix = net.hi[p]! >>> 26
        perPrefix.set(prefix, (perPrefix.get(prefix) ?? 0) + 1)
      }
      for (const [prefix, n] of perPrefix) {
        const members = net.prefixRange(6, { hi: (prefix << 26) >>> 0, lo: 0 })
        // ~78 servers per prefix at 5000: the bucket is full at 20.
        expect(n).toBeLessThanOrEqual(20)
        expect(members[1] - members[0]).toBeGreaterThan(20)
      }
      expect(table.length).toBe(64 * 20)
    }
  })

  it("answers a lookup from a server's table exactly as a scan of the whole table would", () => {
    const net = ModelNetwork.random(20_000, kadDhtParams, 2)
    const rng = seededRandom(3)
    for (let i = 0; i < 50; i++) {
      const owner = Math.floor(rng() * net.size)
      const target = randomKey(rng)
      expect(net.answer(owner, target, 20)).toEqual(net.closest(net.table(owner), target, 20))
    }
  })

  it('always finds the closest server and the record when every table is complete', () => {
    // 300 servers: about 5 per 6-bit prefix, so every table holds every other server.
    const net = ModelNetwork.random(300, kadDhtParams, 4)
    expect(net.table(7).length).toBe(299)
    const rng = seededRandom(5)
    for (let i = 0; i < 100; i++) {
      const target = randomKey(rng)
      const from = Math.floor(rng() * net.size)
      const walk = lookup(net, { target, self: from, rng })
      expect(walk.closest[0]).toBe(net.trueClosest(target, 1, from)[0])
      const holders = provide(net, Math.floor(rng() * net.size), target, rng)
      // The provide walk stores the record on the true 20 closest (and the provider).
      for (const s of net.trueClosest(target, 20)) expect(holders.has(s)).toBe(true)
      const found = lookup(net, { target, self: from, holders, rng })
      expect(found.found).toBe(true)
      // Complete tables: the caller already knows a holder, so the first hop finds it (0: it holds it).
      expect(found.hops).toBeLessThanOrEqual(1)
    }
  })

  it("takes hops within Kademlia's bounds on the paper's table (alpha 3, one path)", () => {
    const n = 4_000
    const net = ModelNetwork.random(n, classicKademliaParams, 6)
    const rng = seededRandom(7)
    const hops: number[] = []
    for (let i = 0; i < 200; i++) {
      const target = randomKey(rng)
      const holders = provide(net, Math.floor(rng() * n), target, rng)
      const res = lookup(net, { target, self: Math.floor(rng() * n), holders, rng })
      expect(res.found).toBe(true)
      hops.push(res.hops!)
    }
    const s = stats(hops)
    // Each hop learns k peers of the target's subtree: about log2(k) bits, so log_k(N) hops...
    expect(s.mean).toBeGreaterThanOrEqual(1)
    expect(s.mean).toBeLessThanOrEqual(Math.log2(n) / Math.log2(20) + 1)
    // ...and never more than one bit per hop.
    expect(s.max).toBeLessThanOrEqual(Math.ceil(Math.log2(n)))
  })

  it('finds records through incomplete kad-dht tables at 20,000 servers in a few hops', () => {
    const n = 20_000
    const net = ModelNetwork.random(n, kadDhtParams, 8)
    const rng = seededRandom(9)
    const hops: number[] = []
    for (let i = 0; i < 60; i++) {
      const target = randomKey(rng)
      const holders = provide(net, Math.floor(rng() * n), target, rng)
      const res = lookup(net, { target, self: Math.floor(rng() * n), holders, rng })
      expect(res.found).toBe(true)
      expect(res.messages).toBeGreaterThan(20)
      hops.push(res.hops!)
    }
    expect(stats(hops).max).toBeLessThanOrEqual(Math.ceil(Math.log2(n)))
  })

  it('walks a path only toward servers closer to the key', () => {
    const net = ModelNetwork.random(10_000, kadDhtParams, 10)
    const rng = seededRandom(11)
    const target = randomKey(rng)
    const walk = lookup(net, { target, self: 0, rng })
    const best = walk.closest[0]!
    // What the walk settled on shares at least as many leading bits with the key as its start did.
    const start = net.answer(0, target, 20)[0]!
    expect(commonPrefixBits(net.key(best), target)).toBeGreaterThanOrEqual(
      commonPrefixBits(net.key(start), target),
    )
  })

  it("models a fresh gamer's node: self-query, then its region key, through its bootstrap servers", () => {
    const g = garageDiscovery({ regions: 20, params: kadDhtParams, samples: 30 })
    expect(g.servers).toBe(40)
    expect(g.foundShare).toBe(1)
    expect(g.selfQueryMessages.mean).toBeGreaterThan(0)
    // The node stays connected to every server it asked.
    expect(g.connectionsPerNode.mean).toBeGreaterThanOrEqual(g.regionLookupMessages.mean)
    expect(g.timeToFirstMs.p50).toBeGreaterThan(0)
  })
})

describe('the head and router measurements', () => {
  it('time RegionalRouter.pick on a small pool', () => {
    const cost = regionalRouterPickCost({ nodes: 50, minPicks: 100, maxPicks: 100 })
    expect(cost.picks).toBe(100)
    expect(cost.pickUs.p50).toBeGreaterThan(0)
    expect(Number.isFinite(cost.pickUs.p99)).toBe(true)
    expect(cost.demandPicksPerSecond).toBeGreaterThan(0)
    expect(cost.coreShareAtDemand).toBeGreaterThan(0)
  })

  it('time FederationRouter.pick across a few regions', () => {
    const cost = federationRouterPickCost({ regions: 5, picks: 200 })
    expect(cost.pickUs.p50).toBeGreaterThan(0)
    expect(cost.pickUs.p99).toBeGreaterThanOrEqual(cost.pickUs.p50)
  })

  it("time the head's telemetry handling of a report", () => {
    const cost = telemetryAppCost({ nodes: 20, reports: 200 })
    expect(cost.reports).toBe(200)
    expect(cost.perReportUs.p50).toBeGreaterThan(0)
    expect(Number.isFinite(cost.perReportUs.max)).toBe(true)
  })

  it("time the head's handling of a join, signature check included", async () => {
    const cost = await joinAppCost({ nodes: 20, joins: 10, signers: 2 })
    expect(cost.perJoinUs.p50).toBeGreaterThan(0)
    expect(cost.verifyUs.p50).toBeGreaterThan(0)
    expect(cost.replicasByModelUs.p50).toBeGreaterThan(0)
    expect(cost.perJoinUs.p50).toBeGreaterThanOrEqual(cost.verifyUs.p50)
  })
})
