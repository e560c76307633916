import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { describe, expect, it } from 'vitest'
import { LeaseDesk } from '../../bootstrap/head/leases.ts'
import { silentLogger } from '../../core/logger.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { readTicket, TicketVerifier } from '../../mesh/ticket.ts'
import { abandonedStreamAllowanceTokens, VerifiedThroughput } from '../../openai/usage.ts'
import { RegionalRouter } from '../../routing/node-router.ts'

/** What LeaseDesk touches of the head's libp2p node outside start(): connections and the peer store. */
const fakeNode = {
  getConnections: () => [],
  peerStore: { get: async () => ({ addresses: [] }) },
} as unknown as MeshNode

async function setup() {
  let now = 1_000_000
  const ids = await Promise.all(
    [0, 1].map(async () => peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString()),
  )
  const [a, b] = ids as [string, string]
  const router = new RegionalRouter({ now: () => now })
  const verified = new VerifiedThroughput({ now: () => now })
  const counted: number[] = []
  const metrics = {
    regionTokens: { inc: (_l: unknown, n: number) => counted.push(n) },
    requests: { inc: () => {} },
  } as never
  const flagged = new Set<string>()
  const desk = new LeaseDesk(
    { logger: silentLogger, ttlMs: 10_000, now: () => now },
    {
      node: fakeNode,
      router,
      verified,
      metrics,
      allowed: () => true,
      usable: (p) => !flagged.has(p),
    },
  )
  for (const id of [a, b]) router.upsert(id, { model: 'm', slots: 2, state: 'serving' })
  const keys = { [a]: desk.keyFor(a), [b]: desk.keyFor(b) }
  const ask = (holder: string, extra: Partial<Parameters<LeaseDesk['exchange']>[0]> = {}) =>
    desk.exchange({ models: ['m'], done: [], inflight: [], ...extra }, holder)
  return {
    a,
    b,
    keys,
    desk,
    router,
    verified,
    flagged,
    counted,
    ask,
    advance: (ms: number) => {
      now += ms
    },
    now: () => now,
  }
}

describe('LeaseDesk: the head side of the direct path', () => {
  it('leases serving, usable nodes with tickets that verify under each node key, for that holder', async () => {
    const s = await setup()
    const grant = s.ask('gw1')
    expect(grant.ttlMs).toBe(10_000)
    expect(grant.leases.map((l) => l.node).sort()).toEqual([s.a, s.b].sort())
    for (const l of grant.leases) {
      expect(l.slots).toBe(4)
      const v = new TicketVerifier({ key: s.keys[l.node]!, self: l.node, now: s.now })
      expect(v.check(l.ticket, 'gw1').slots).toBe(4)
    }
    // A flagged node, or one the router says is not serving, is not leased.
    s.flagged.add(s.a)
    s.router.updateTelemetry(s.b, { running: 0, waiting: 0, kvCacheUsage: 0, state: 'draining' })
    expect(s.ask('gw1').leases).toEqual([])
    // No models asked: a report only.
    expect(s.ask('gw1', { models: [] }).leases).toEqual([])
  })

  it('renews a ticket once half its life is gone, keeping the lease; gateways share the slots', async () => {
    const s = await setup()
    const first = s.ask('gw1').leases.find((l) => l.node === s.a)!
    s.advance(4_000)
    expect(s.ask('gw1').leases.find((l) => l.node === s.a)!.ticket).toBe(first.ticket)
    s.advance(2_000)
    const renewed = s.ask('gw1').leases.find((l) => l.node === s.a)!
    expect(renewed.ticket).not.toBe(first.ticket)
    expect(readTicket(renewed.ticket).lease).toBe(readTicket(first.ticket).lease)
    // A second gateway: each gets half the node's slots (and as many waiting).
    expect(s.ask('gw2').leases.find((l) => l.node === s.a)!.slots).toBe(2)
    // A rejoin's new key voids the leases.
    s.keys[s.a] = s.desk.keyFor(s.a)
    const again = s.ask('gw1').leases.find((l) => l.node === s.a)!
    expect(() =>
      new TicketVerifier({ key: s.keys[s.a]!, self: s.a, now: s.now }).check(first.ticket, 'gw1'),
    ).toThrow(/MAC/)
    expect(
      new TicketVerifier({ key: s.keys[s.a]!, self: s.a, now: s.now }).check(again.ticket, 'gw1').node,
    ).toBe(s.a)
  })

  it("takes reports into the head's accounting: verified tokens, cut streams, in-flight, pending", async () => {
    const s = await setup()
    s.ask('gw1')
    s.ask('gw1', {
      done: [
        { node: s.a, ok: true, completionTokens: 40, decodeMs: 200, unseen: 0 },
        { node: s.a, ok: false, completionTokens: 5, decodeMs: 50, unseen: 500 },
        { node: 'not-a-member', ok: true, completionTokens: 999, decodeMs: 1, unseen: 0 },
      ],
      inflight: [{ node: s.b, requests: 3, budget: 300 }],
    })
    expect(s.verified.verified(s.a)).toBe(45)
    expect(s.verified.verified('not-a-member')).toBe(0)
    expect(s.router.inflight(s.b)).toBe(3)
    expect(s.desk.pending(s.b)).toBe(300)
    expect(s.router.snapshot().find((n) => n.peerId === s.a)!.measured).toBe(true)
    // The cut stream's unseen tail is allowed for (capped), never credited: 45 + 64 claimed is fine.
    s.verified.compare(s.a, 45 + abandonedStreamAllowanceTokens)
    expect(s.verified.flagged(s.a)).toBe(false)
    s.ask('gw1', { inflight: [] })
    expect(s.router.inflight(s.b)).toBe(0)
    expect(s.desk.pending(s.b)).toBe(0)
  })

  it("checks a node's claims once two reports after them are in, or after 3 s at most", async () => {
    const s = await setup()
    let runs = 0
    // No gateway holds a lease on the node: at once.
    s.desk.whenCovered(s.a, () => runs++)
    expect(runs).toBe(1)
    s.ask('gw1')
    s.desk.whenCovered(s.a, () => runs++)
    expect(runs).toBe(1)
    s.ask('gw1', { models: [] })
    expect(runs).toBe(1)
    s.ask('gw1', { models: [] })
    expect(runs).toBe(2)
    // A gateway that stops reporting: the check runs anyway after 3 s.
    s.desk.whenCovered(s.a, () => runs++)
    s.advance(3_000)
    s.desk.whenCovered(s.a, () => runs++)
    expect(runs).toBe(3)
  })

  it('a gateway gone mid-request: what it had running is allowed for as cut streams', async () => {
    const s = await setup()
    s.ask('gw1', { inflight: [{ node: s.a, requests: 2, budget: 1000 }] })
    expect(s.desk.holders()).toBe(1)
    s.advance(10_001)
    s.desk.expireHolders()
    expect(s.desk.holders()).toBe(0)
    expect(s.desk.pending(s.a)).toBe(0)
    expect(s.router.inflight(s.a)).toBe(0)
    // The two streams' tails, unseen: within the allowance, not flagged; past it, flagged.
    s.verified.compare(s.a, 2 * abandonedStreamAllowanceTokens)
    expect(s.verified.flagged(s.a)).toBe(false)
    s.verified.compare(s.a, 2 * abandonedStreamAllowanceTokens + 100)
    expect(s.verified.flagged(s.a)).toBe(true)
  })

  it('integrity: each lease carries the node rate; done records are credited and samples considered', async () => {
    const s = await setup()
    const credited: Array<[string, number]> = []
    const considered: string[] = []
    const integrity = {
      rateFor: (node: string) => (node === s.a ? 0.5 : 0.02),
      credited: (node: string, tokens: number) => credited.push([node, tokens]),
      consider: (sample: { requestId: string }) => {
        considered.push(sample.requestId)
        return true
      },
    }
    const desk = new LeaseDesk(
      { logger: silentLogger, ttlMs: 10_000, now: s.now },
      {
        node: fakeNode,
        router: s.router,
        verified: s.verified,
        metrics: { regionTokens: { inc: () => {} }, requests: { inc: () => {} } } as never,
        allowed: () => true,
        usable: () => true,
        integrity,
      },
    )
    desk.keyFor(s.a)
    desk.keyFor(s.b)
    const grant = desk.exchange({ models: ['m'], done: [], inflight: [] }, 'gw1')
    expect(Object.fromEntries(grant.leases.map((l) => [l.node, l.rate]))).toEqual({ [s.a]: 0.5, [s.b]: 0.02 })
    const sample = (node: string, requestId: string, over: Record<string, unknown> = {}) => ({
      v: 1,
      model: 'm',
      node,
      endpoint: 'chat',
      request: { messages: [{ role: 'user', content: 'hi' }] },
      output: { text: 'hello', finishReason: 'stop' },
      requestId,
      at: 1,
      ...over,
    })
    desk.exchange(
      {
        models: [],
        done: [
          { node: s.a, ok: true, completionTokens: 7, decodeMs: 5, unseen: 0 },
          { node: 'unknown-node', ok: true, completionTokens: 9, decodeMs: 5, unseen: 0 },
        ],
        inflight: [],
        samples: [
          sample(s.a, 'good'),
          // Malformed, a request that cannot be checked, a node this head does not key: dropped alone.
          sample(s.a, 'bad', { output: { text: '' } }),
          sample(s.a, 'tools', { request: { messages: [], tools: [{ type: 'function' }] } }),
          sample('unknown-node', 'stranger'),
          sample(s.b, 'good-b'),
        ],
      },
      'gw1',
    )
    expect(credited).toEqual([[s.a, 7]])
    expect(considered).toEqual(['good', 'good-b'])
    // A head with the checks off puts no rate in its leases (the holder samples nothing).
    expect(s.ask('gw2').leases.every((l) => l.rate === undefined)).toBe(true)
  })
})
