import { connect, createServer, type Server, type Socket } from 'node:net'
import { afterEach, describe, expect, it } from 'vitest'
import {
  checkLedger,
  classifyRequests,
  faultOnPath,
  lastTurnTokens,
  recoveries,
} from '../helpers/fault-invariants.ts'
import { startLinkProxy } from '../helpers/fault-link.ts'
import type { RequestRecord } from '../helpers/fault-load.ts'
import { metricLabels, metricSum } from '../helpers/fault-observer.ts'
import { faultSeed, Random } from '../helpers/fault-random.ts'
import { ClusterTimeline, type FaultEvent } from '../helpers/fault-timeline.ts'

/** The fault suite's own rules, checked without a cluster: a wrong rule would pass or fail real runs for nothing. */

const settle = { nodeMs: 6_000, headMs: 45_000, federationMs: 6_000 }
const nodes = [
  { name: 'a1', region: 'a', peerId: 'PA1' },
  { name: 'a2', region: 'a', peerId: 'PA2' },
  { name: 'b1', region: 'b', peerId: 'PB1' },
]

function timeline(): ClusterTimeline {
  return new ClusterTimeline({ regions: ['a', 'b'], nodes, settle, at: 0 })
}

let nextId = 0
function rec(over: Partial<RequestRecord>): RequestRecord {
  return {
    id: nextId++,
    worker: 0,
    keyName: 'k1',
    api: 'chat',
    stream: true,
    maxTokens: 20,
    start: 1_000,
    headersAt: 1_100,
    firstChunkAt: 1_150,
    end: 2_000,
    status: 200,
    region: 'a',
    node: 'PA1',
    requestId: 'r',
    tokens: 10,
    promptTokens: 5,
    contentChunks: 10,
    usageSeen: true,
    finishReason: 'length',
    ok: true,
    failure: null,
    ...over,
  }
}

function failed(
  kind: NonNullable<RequestRecord['failure']>['kind'],
  over: Partial<RequestRecord> = {},
): RequestRecord {
  return rec({
    ok: false,
    failure: { kind, name: 'E', message: kind, code: null, status: null },
    ...over,
  })
}

function fault(over: Partial<FaultEvent>): FaultEvent {
  return {
    id: 1,
    kind: 'node-kill',
    target: 'a1',
    region: 'a',
    nodePeerId: 'PA1',
    injectedAt: 1_500,
    restoredAt: 5_000,
    detail: {},
    ...over,
  }
}

const classify = { requestTimeoutMs: 30_000, hangMarginMs: 2_000, faultTailMs: 3_000 }

describe('the seeded schedule', () => {
  it('replays the same draws from the same seed, and forks do not disturb each other', () => {
    const a = new Random(42)
    const b = new Random(42)
    const draws = Array.from({ length: 20 }, () => a.int(0, 1_000))
    expect(Array.from({ length: 20 }, () => b.int(0, 1_000))).toEqual(draws)
    const schedule = new Random(42).fork(2)
    const first = [schedule.next(), schedule.next()]
    const again = new Random(42)
    again.fork(1).next()
    const replay = again.fork(2)
    expect([replay.next(), replay.next()]).toEqual(first)
    expect(new Random(7).shuffle([1, 2, 3, 4, 5]).sort()).toEqual([1, 2, 3, 4, 5])
  })

  it('takes GARAGE_FAULT_SEED, and refuses one that is not a 32-bit whole number', () => {
    expect(faultSeed({ GARAGE_FAULT_SEED: '123' })).toBe(123)
    expect(() => faultSeed({ GARAGE_FAULT_SEED: 'abc' })).toThrow(RangeError)
    expect(() => faultSeed({ GARAGE_FAULT_SEED: '-1' })).toThrow(RangeError)
    const fresh = faultSeed({})
    expect(Number.isInteger(fresh) && fresh >= 0).toBe(true)
  })
})

describe('which region could serve (the timeline)', () => {
  it('a region with a live head and a live serving node could serve; a killed head ends that at once', () => {
    const t = timeline()
    expect(t.couldServe(1_000, 2_000)).not.toBeNull()
    t.headDown('a', 3_000)
    expect(t.able('a')).toBe(false)
    expect(t.couldServe(2_500, 3_500)).toBe('b')
    t.headDown('b', 4_000)
    expect(t.couldServe(4_500, 5_000)).toBeNull()
  })

  it('does not trust a head that still counts a dead node as serving', () => {
    const t = timeline()
    t.nodeDown('b1', 1_000)
    // The head has not noticed: it still reports b1 registered and serving.
    t.observe('b', 1_200, { serving: 1, registered: ['PB1'] })
    expect(t.able('b')).toBe(false)
    // One dead, one alive, both still counted: one serving node remains.
    t.nodeDown('a1', 1_300)
    t.observe('a', 1_400, { serving: 2, registered: ['PA1', 'PA2'] })
    expect(t.able('a')).toBe(true)
    t.observe('a', 1_500, { serving: 1, registered: ['PA1', 'PA2'] })
    expect(t.able('a')).toBe(false)
  })

  it('a node counts again only once it has joined after it was lost, and the region only after it settled', () => {
    const t = timeline()
    t.headDown('a', 1_000)
    t.nodeDown('b1', 1_000)
    t.observe('b', 1_000, { serving: 0, registered: [] })
    t.headReady('a', 3_000)
    t.observe('a', 3_100, { serving: 2, registered: ['PA1', 'PA2'] })
    // Its nodes have not rejoined the new head yet.
    expect(t.able('a')).toBe(false)
    t.nodeJoined('a1', 3_500)
    expect(t.able('a')).toBe(true)
    // A restarted head counts after the gateway could have found it again.
    expect(t.couldServe(10_000, 11_000)).toBeNull()
    expect(t.couldServe(3_000 + settle.headMs, 3_000 + settle.headMs + 1_000)).toBe('a')
  })

  it('knows when the gateway was down, until it was healthy again', () => {
    const t = timeline()
    t.federationDown(10_000)
    t.federationReady(12_000)
    expect(t.federationDownDuring(9_000, 10_500)).toBe(true)
    expect(t.federationDownDuring(11_000, 11_500)).toBe(true)
    expect(t.federationDownDuring(12_500, 13_000)).toBe(false)
    expect(t.couldServe(12_500, 13_000)).toBeNull()
    expect(t.couldServe(12_000 + settle.federationMs, 19_000)).not.toBeNull()
  })
})

describe('classifying what clients saw', () => {
  it('a stream cut by a kill on its path is allowed; one cut with no fault is a violation', () => {
    const t = timeline()
    const cut = failed('stream-error', { node: 'PA1', start: 1_000, end: 2_000 })
    const [c1] = classifyRequests([cut], t, [fault({})], classify)
    expect(c1!.outcome).toBe('cut-by-fault')
    // The kill hit another node: nothing explains this cut.
    const [c2] = classifyRequests([cut], t, [fault({ nodePeerId: 'PA2' })], classify)
    expect(c2!.outcome).toBe('violation')
    // A head kill cuts every stream of its region, a gateway kill every stream.
    expect(faultOnPath(cut, [fault({ kind: 'head-kill', nodePeerId: null })], 0)?.kind).toBe('head-kill')
    expect(
      faultOnPath(cut, [fault({ kind: 'federation-kill', region: null, nodePeerId: null })], 0),
    ).not.toBeNull()
    // A slow link cuts nothing.
    expect(faultOnPath(cut, [fault({ kind: 'slow-link' })], 0)).toBeNull()
  })

  it('a failure before streaming is a violation while a region could serve, allowed when none could', () => {
    const t = timeline()
    const early = failed('http', { headersAt: null, status: 503, start: 1_000, end: 1_200 })
    expect(classifyRequests([early], t, [], classify)[0]!.outcome).toBe('violation')
    t.headDown('a', 900)
    t.headDown('b', 900)
    expect(classifyRequests([early], t, [], classify)[0]!.outcome).toBe('no-region')
  })

  it('failures while the gateway is down are counted apart; a request past its deadline has hung', () => {
    const t = timeline()
    t.federationDown(1_000)
    t.federationReady(3_000)
    const refused = failed('connection', { headersAt: null, status: null, start: 1_500, end: 1_510 })
    expect(classifyRequests([refused], t, [], classify)[0]!.outcome).toBe('federation-down')
    const hung = rec({ start: 0, end: 40_000 })
    expect(classifyRequests([hung], t, [], classify)[0]!.reason).toMatch(/^hung/)
  })
})

describe('the ledger check', () => {
  const keys = [
    { id: 'key_1', name: 'k1' },
    { id: 'key_2', name: 'k2' },
  ]
  const ledgerOf = (
    usage: Array<[string, number, number, number]>,
    credits: Array<[string, number]>,
  ): Parameters<typeof checkLedger>[1] => ({
    usage: usage.map(([keyId, requests, promptTokens, completionTokens]) => ({
      keyId,
      model: 'm',
      requests,
      promptTokens,
      completionTokens,
    })),
    credits: credits.map(([node, completionTokens]) => ({
      node,
      region: 'a',
      model: 'm',
      requests: 1,
      completionTokens,
    })),
  })

  it('passes when keys and nodes are billed exactly what clients received, cut streams included', () => {
    const records = [
      rec({ keyName: 'k1', node: 'PA1', tokens: 10, promptTokens: 5 }),
      rec({ keyName: 'k2', node: 'PB1', tokens: 7, promptTokens: 3 }),
      // Cut after 4 chunks: billed the 4 that reached the client, no prompt tokens (no usage came).
      failed('stream-error', { keyName: 'k1', node: 'PA1', tokens: 4, promptTokens: null, usageSeen: false }),
      // Never answered: billed nothing.
      failed('connection', { keyName: 'k2', headersAt: null, status: null, tokens: 0 }),
    ]
    const ok = checkLedger(
      records,
      ledgerOf(
        [
          ['key_1', 2, 5, 14],
          ['key_2', 1, 3, 7],
        ],
        [
          ['PA1', 14],
          ['PB1', 7],
        ],
      ),
      keys,
      [],
      100,
    )
    expect(ok.violations).toEqual([])
    const over = checkLedger(
      records,
      ledgerOf(
        [
          ['key_1', 2, 5, 15],
          ['key_2', 1, 3, 7],
        ],
        [
          ['PA1', 15],
          ['PB1', 7],
        ],
      ),
      keys,
      [],
      100,
    )
    expect(over.violations.join('\n')).toMatch(
      /key k1: the ledger bills 15 completion tokens, clients received 14/,
    )
    expect(over.violations.join('\n')).toMatch(/node PA1: credited 15/)
  })

  it('a stream cut by a gateway kill is billed as it streamed: what the client got, short by at most the last turn', () => {
    const kill = 1_500
    const records = [
      rec({ keyName: 'k1', node: 'PA1', tokens: 10, start: 100, end: 500 }),
      // Cut by the gateway's death: billed write by write up to it.
      failed('stream-broken', {
        keyName: 'k1',
        node: 'PA1',
        stream: true,
        tokens: 6,
        promptTokens: null,
        start: 1_000,
        end: 1_600,
      }),
    ]
    const check = (requests: number, completion: number) =>
      checkLedger(
        records,
        ledgerOf([['key_1', requests, 5, completion]], [['PA1', completion]]),
        keys,
        [kill],
        100,
      )
    expect(check(2, 16).violations).toEqual([])
    expect(check(2, 16).receivedTokensAtFederationKill).toBe(6)
    // The last turn's writes (a chunk or two) may die with the gateway.
    expect(check(2, 16 - lastTurnTokens).violations).toEqual([])
    // More lost than that is a violation; so is more billed than the client got.
    expect(check(1, 10).violations.join('\n')).toMatch(/key k1: the ledger bills 10 completion tokens/)
    expect(check(2, 17).violations.length).toBeGreaterThan(0)
  })

  it('keys billed and nodes credited must add up to the same tokens', () => {
    const records = [rec({ keyName: 'k1', node: 'PA1', tokens: 10 })]
    const check = checkLedger(
      records,
      ledgerOf(
        [['key_1', 1, 5, 10]],
        [
          ['PA1', 10],
          ['PX', 3],
        ],
      ),
      keys,
      [],
      100,
    )
    expect(check.violations.join('\n')).toMatch(/billed 10 tokens but nodes credited 13/)
  })
})

describe('recovery times', () => {
  it('is the first success through the affected part after it was restored', () => {
    const f = fault({ injectedAt: 1_000, restoredAt: 4_000 })
    const records = [
      rec({ node: 'PA2', start: 1_100, end: 1_500 }),
      rec({ node: 'PA1', start: 3_000, end: 4_500 }),
      rec({ node: 'PA1', start: 5_000, end: 5_200 }),
    ]
    const [r] = recoveries(records, [f])
    expect(r!.faultToRecoveryMs).toBe(3_500)
    expect(r!.restoreToRecoveryMs).toBe(500)
    expect(recoveries([rec({ node: 'PA2', start: 2_000 })], [f])[0]!.faultToRecoveryMs).toBeNull()
  })
})

describe('metrics parsing', () => {
  it('sums a counter over its labels and lists label values', () => {
    const text = [
      '# HELP garage_head_retries_total x',
      'garage_head_retries_total{reason="InferConnectError"} 3',
      'garage_head_retries_total{reason="status_503"} 2',
      'garage_head_retries_totalx 100',
      'garage_head_node_inflight{node="P1",model="m"} 0',
      'garage_head_node_inflight{node="P2",model="m"} 1',
    ].join('\n')
    expect(metricSum(text, 'garage_head_retries_total')).toBe(5)
    expect(metricLabels(text, 'garage_head_node_inflight', 'node')).toEqual(['P1', 'P2'])
  })
})

describe('the slow link', () => {
  const servers: Server[] = []
  const sockets: Socket[] = []
  afterEach(async () => {
    for (const s of sockets.splice(0)) s.destroy()
    await Promise.all(servers.splice(0).map((s) => new Promise((resolve) => s.close(resolve))))
  })

  it('delays each chunk once, keeps their order, and takes a new delay while open', async () => {
    const echo = createServer((s) => {
      sockets.push(s)
      s.pipe(s)
    })
    servers.push(echo)
    await new Promise<void>((resolve) => echo.listen(0, '127.0.0.1', resolve))
    const port = (echo.address() as { port: number }).port
    const proxy = await startLinkProxy({
      listenHost: '127.0.0.1',
      target: () => ({ host: '127.0.0.1', port }),
    })
    try {
      proxy.setDelay(100)
      const client = connect(proxy.port, '127.0.0.1')
      sockets.push(client)
      await new Promise<void>((resolve) => client.once('connect', () => resolve()))
      let received = ''
      client.on('data', (d: Buffer) => {
        received += d.toString()
      })
      const arrived = (text: string): Promise<number> =>
        new Promise((resolve) => {
          const check = (): void => {
            if (received.includes(text)) {
              client.off('data', check)
              resolve(performance.now())
            }
          }
          client.on('data', check)
          check()
        })
      const started = performance.now()
      // Ten chunks in a burst: each is delayed 100 ms each way, not 100 ms after the one before.
      for (let i = 0; i < 10; i++) client.write(`<${i}>`)
      const burstMs = (await arrived('<9>')) - started
      expect(burstMs).toBeGreaterThanOrEqual(190)
      expect(burstMs).toBeLessThan(900)
      expect(received).toBe(Array.from({ length: 10 }, (_, i) => `<${i}>`).join(''))
      // Back to no delay on the open connection: well under the 2 × 100 ms it took before.
      proxy.setDelay(0)
      const again = performance.now()
      client.write('<fast>')
      expect((await arrived('<fast>')) - again).toBeLessThan(190)
      expect(proxy.connections).toBe(1)
    } finally {
      await proxy.close()
    }
  })
})
