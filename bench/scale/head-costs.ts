/**
 * In-process timings of the real head and federation code at 10^3-10^5 nodes, without the network:
 * the regional router's pick() under churn, the telemetry and join handlers' work, and the
 * federation router's pick() across regions. Every figure is performance.now() around the real call.
 */
import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PeerId, PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { chooseAssignment } from '../../bootstrap/head/assign.ts'
import { LeaseDesk } from '../../bootstrap/head/leases.ts'
import { NodeRegistry } from '../../bootstrap/head/registry.ts'
import { decodeCanonical, encodeCanonical } from '../../core/cbor.ts'
import { silentLogger } from '../../core/logger.ts'
import { signCapabilityReport, verifyCapabilityReport } from '../../mesh/capability-report.ts'
import { encodeLeaseGrant, encodeLeaseRequest, parseLeaseRequest } from '../../mesh/lease-protocol.ts'
import type { Assignment, NodeServingState } from '../../mesh/region-messages.ts'
import { parseTelemetryReport } from '../../mesh/telemetry-protocol.ts'
import { VerifiedThroughput } from '../../openai/usage.ts'
import { RegionalRouter, type RequestTicket } from '../../routing/node-router.ts'
import type { RegionModelLoad } from '../../routing/region-router.ts'
import { FederationRouter, type RegionTicket } from '../../routing/region-router.ts'
import { type Stats, seededRandom, stats } from './kademlia.ts'
import {
  benchModel,
  benchPolicy,
  benchRegion,
  benchReport,
  benchSlots,
  benchTelemetry,
} from './region-fixture.ts'
import { TimeHeap } from './time-heap.ts'

/** A request's length on a node: log-normal, median 6 s, mean about 10 s (a chat answer of a few hundred tokens). */
function requestMs(rng: () => number): number {
  const u = Math.max(rng(), 1e-12)
  const z = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng())
  return 6_000 * Math.exp(1.0 * z)
}
export const meanRequestMs = 6_000 * Math.exp(0.5)

/** Decode speed per sequence of a gamer's GPU: log-normal around 30 tokens/s. */
function decodeRate(rng: () => number): number {
  const u = Math.max(rng(), 1e-12)
  const z = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng())
  return 30 * Math.exp(0.4 * z)
}

export interface PickCost {
  nodes: number
  picks: number
  /** Microseconds per pick(). */
  pickUs: Stats
  /** Requests per second the region's nodes finish at the modelled load: what pick() must keep up with. */
  demandPicksPerSecond: number
  /** Share of one core pick() alone needs at that rate (p50 cost). */
  coreShareAtDemand: number
}

/**
 * RegionalRouter.pick() with `nodes` serving one model at half their slots busy: between picks,
 * requests end (each a decode-rate measurement), telemetry arrives every 2 s per node, and a share
 * of the pool is unmeasured newcomers (which makes pick() recompute the pool's median capacity
 * after every measurement). Arrivals match what the pool finishes: a steady state.
 */
export function regionalRouterPickCost(options: {
  nodes: number
  /** Nodes not yet measured, as after joins (0..1). */
  unmeasuredShare?: number
  /** Share of slots busy. */
  utilisation?: number
  maxPicks?: number
  minPicks?: number
  /** Stop after this much time spent inside pick(). */
  budgetMs?: number
  seed?: number
}): PickCost {
  const n = options.nodes
  const rng = seededRandom(options.seed ?? 5)
  const utilisation = options.utilisation ?? 0.5
  let now = 0
  const router = new RegionalRouter({ now: () => now, random: rng })
  const ids = Array.from({ length: n }, (_, i) => `node-${i}`)
  const rates = ids.map(() => decodeRate(rng))
  for (const id of ids) router.upsert(id, { model: benchModel, slots: benchSlots, state: 'serving' })
  const measured = Math.round(n * (1 - (options.unmeasuredShare ?? 0.05)))
  for (let i = 0; i < measured; i++) {
    // One finished request at the node's speed sets its measured rate.
    now = 0
    const ticket = router.begin(ids[i]!)
    ticket.firstByte()
    now = 1_000
    ticket.end({ ok: true, completionTokens: Math.round(rates[i]!) })
    router.success(ids[i]!)
  }
  now = 0
  const open = new TimeHeap<{ ticket: RequestTicket; node: number; startedAt: number }>()
  const start = (node: number, at: number, length: number): void => {
    const ticket = router.begin(ids[node]!)
    ticket.firstByte()
    open.push(at + length, { ticket, node, startedAt: at })
  }
  // Steady state from the start: each node busy on a share of its slots, mid-request.
  for (let i = 0; i < n; i++) {
    for (let s = 0; s < benchSlots; s++) if (rng() < utilisation) start(i, 0, requestMs(rng) * rng())
  }
  const demand = (n * benchSlots * utilisation) / (meanRequestMs / 1000)
  const stepMs = 1000 / demand
  const telemetryPerStep = (n * stepMs) / 2_000
  let telemetryDue = 0
  const states: NodeServingState[] = ['serving', 'serving', 'serving', 'paused']
  const samples: number[] = []
  let spent = 0
  const maxPicks = options.maxPicks ?? 5_000
  const minPicks = options.minPicks ?? 20
  const budget = options.budgetMs ?? 1_500
  while (samples.length < maxPicks && (samples.length < minPicks || spent < budget)) {
    now += stepMs
    while (open.peek() <= now) {
      const { ticket, node, startedAt } = open.pop()!
      ticket.end({ ok: true, completionTokens: Math.round((rates[node]! * (now - startedAt)) / 1000) })
      router.success(ids[node]!)
    }
    for (telemetryDue += telemetryPerStep; telemetryDue >= 1; telemetryDue--) {
      const node = Math.floor(rng() * n)
      // Now and then a node pauses for a game, then serves again at its next report.
      const state = rng() < 0.001 ? states[3]! : 'serving'
      router.updateTelemetry(ids[node]!, {
        running: Math.floor(rng() * (benchSlots + 1)),
        waiting: Math.floor(rng() * 2),
        kvCacheUsage: rng(),
        state,
      })
    }
    const t = performance.now()
    const peer = router.pick(benchModel)
    const took = performance.now() - t
    samples.push(took * 1000)
    spent += took
    if (peer != null) start(Number(peer.slice(5)), now, requestMs(rng))
  }
  const pickUs = stats(samples)
  return {
    nodes: n,
    picks: samples.length,
    pickUs,
    demandPicksPerSecond: Math.round(demand),
    coreShareAtDemand: (demand * pickUs.p50) / 1e6,
  }
}

export interface RegionPickCost {
  regions: number
  picks: number
  pickUs: Stats
}

/**
 * FederationRouter.pick() across `regions`, each serving 5 of 20 models, with the directory's
 * refresh (an update() per region every 3 s) and requests opening and ending between picks.
 */
export function federationRouterPickCost(options: {
  regions: number
  picks?: number
  picksPerSecond?: number
  seed?: number
}): RegionPickCost {
  const rng = seededRandom(options.seed ?? 9)
  const models = Array.from({ length: 20 }, (_, i) => `model-${i}`)
  let now = 0
  const router = new FederationRouter({ now: () => now, random: rng })
  const names = Array.from({ length: options.regions }, (_, i) => `region-${i}`)
  const status = (region: string): Parameters<FederationRouter['update']>[0] => {
    const served = new Map<string, RegionModelLoad>()
    while (served.size < 5) {
      const nodes = 1 + Math.floor(rng() * 2000)
      served.set(models[Math.floor(rng() * models.length)]!, {
        nodes,
        capacityTokensPerSecond: nodes * 120 * (0.5 + rng()),
        inflight: Math.floor(nodes * 2 * rng()),
        slots: nodes * benchSlots,
      })
    }
    return {
      region,
      head: `head-${region}`,
      rttMs: 10 + rng() * 200,
      models: served,
      reachable: true,
    }
  }
  for (const r of names) router.update(status(r))
  const rate = options.picksPerSecond ?? 1_000
  const stepMs = 1000 / rate
  const updatesPerStep = (options.regions * stepMs) / 3_000
  let updatesDue = 0
  const open = new TimeHeap<RegionTicket>()
  const samples: number[] = []
  const picks = options.picks ?? 20_000
  for (let i = 0; i < picks; i++) {
    now += stepMs
    while (open.peek() <= now) open.pop()!.end(true)
    for (updatesDue += updatesPerStep; updatesDue >= 1; updatesDue--) {
      router.update(status(names[Math.floor(rng() * names.length)]!))
    }
    const model = models[Math.floor(rng() * models.length)]!
    const t = performance.now()
    const region = router.pick(model)
    samples.push((performance.now() - t) * 1000)
    if (region != null) open.push(now + requestMs(rng), router.begin(region))
  }
  return { regions: options.regions, picks, pickUs: stats(samples) }
}

export interface TelemetryAppCost {
  registryNodes: number
  reports: number
  /** What the head's telemetry handler does with a report once its bytes are in, µs. */
  perReportUs: Stats
}

/**
 * The head's work for one telemetry report once its bytes arrived, as head.ts and
 * telemetry-protocol.ts do it: strict CBOR decode, parseTelemetryReport, registry.report,
 * router.updateTelemetry, verified.compare and the encoded answer. The stream around it is not
 * included (measureHeadLoad has the whole).
 */
export function telemetryAppCost(options: {
  nodes: number
  reports?: number
  seed?: number
}): TelemetryAppCost {
  const rng = seededRandom(options.seed ?? 3)
  let clock = 0
  const registry = new NodeRegistry({ now: () => clock })
  const router = new RegionalRouter()
  const verified = new VerifiedThroughput({ now: () => clock })
  const report = benchReport('node-0', 0)
  const assignment = benchAssignment()
  const ids = Array.from({ length: options.nodes }, (_, i) => `node-${i}`)
  for (const id of ids) {
    registry.join(id, report, assignment)
    router.upsert(id, { model: benchModel, slots: benchSlots, state: 'starting' })
  }
  const count = options.reports ?? 20_000
  const seqs = new Map<string, number>()
  const wire = Array.from({ length: Math.min(count, 4_096) }, () => {
    const id = ids[Math.floor(rng() * ids.length)]!
    const seq = (seqs.get(id) ?? 0) + 1
    seqs.set(id, seq)
    return { id, bytes: encodeCanonical(benchTelemetry(seq, rng)) }
  })
  const samples: number[] = []
  for (let i = 0; i < count; i++) {
    const { id, bytes } = wire[i % wire.length]!
    clock += 1
    const t = performance.now()
    const r = parseTelemetryReport(decodeCanonical(bytes))
    if (registry.report(id, r) === 'ok') {
      router.updateTelemetry(id, {
        running: r.running,
        waiting: r.waiting,
        kvCacheUsage: r.kvCacheUsage,
        state: r.state,
      })
      verified.compare(id, r.tokensTotal, 0)
    }
    encodeCanonical({ v: 1, ok: true, verified: verified.verified(id) })
    samples.push((performance.now() - t) * 1000)
  }
  return { registryNodes: options.nodes, reports: count, perReportUs: stats(samples) }
}

function benchAssignment(): Assignment {
  return {
    v: 1,
    region: benchRegion,
    head: 'head',
    model: benchModel,
    engine: 'llamacpp',
    source: { gguf: 'garage-tiny' },
    engineArgs: { parallel: benchSlots },
    telemetryIntervalMs: 2_000,
  }
}

export interface JoinAppCost {
  registryNodes: number
  joins: number
  /** verifyCapabilityReport + chooseAssignment (with registry.replicasByModel) + registry.join + router.upsert, µs. */
  perJoinUs: Stats
  /** Of which the signature check. */
  verifyUs: Stats
  /** Of which registry.replicasByModel: a walk over every joined node. */
  replicasByModelUs: Stats
}

/**
 * The head's work for one join once the signed report is in, as head.ts's onJoin does it, with
 * `nodes` already joined: the report's verification (signature included), the assignment (which
 * counts every joined node per model), and the registry and router entries.
 */
export async function joinAppCost(options: {
  nodes: number
  joins?: number
  signers?: number
}): Promise<JoinAppCost> {
  const registry = new NodeRegistry()
  const router = new RegionalRouter()
  const policy = benchPolicy()
  const report = benchReport('node-0', Date.now())
  const assignment = benchAssignment()
  for (let i = 0; i < options.nodes; i++) {
    registry.join(`node-${i}`, report, assignment)
    router.upsert(`node-${i}`, { model: benchModel, slots: benchSlots, state: 'serving' })
  }
  const signers: Array<{ key: PrivateKey; peer: PeerId; envelope: Uint8Array }> = []
  for (let i = 0; i < (options.signers ?? 32); i++) {
    const key = await generateKeyPair('Ed25519')
    const peer = peerIdFromPrivateKey(key)
    signers.push({
      key,
      peer,
      envelope: await signCapabilityReport(key, benchReport(peer.toString(), Date.now())),
    })
  }
  const joins = options.joins ?? 200
  const total: number[] = []
  const verify: number[] = []
  const replicas: number[] = []
  for (let i = 0; i < joins; i++) {
    const { peer, envelope } = signers[i % signers.length]!
    const id = peer.toString()
    const t0 = performance.now()
    const checked = await verifyCapabilityReport(envelope, { remotePeer: peer, region: benchRegion })
    const t1 = performance.now()
    const current = registry.replicasByModel({ except: id })
    const t2 = performance.now()
    const assigned = chooseAssignment(policy, checked, current, 'head')
    if (assigned == null) throw new Error('the bench policy must fit the bench report')
    registry.join(id, checked, assigned)
    router.upsert(id, { model: assigned.model, slots: benchSlots, state: 'starting' })
    const t3 = performance.now()
    total.push((t3 - t0) * 1000)
    verify.push((t1 - t0) * 1000)
    replicas.push((t2 - t1) * 1000)
  }
  return {
    registryNodes: options.nodes,
    joins,
    perJoinUs: stats(total),
    verifyUs: stats(verify),
    replicasByModelUs: stats(replicas),
  }
}

export interface LeaseAppCost {
  nodes: number
  /** Done records and in-flight entries per report. */
  recordsPerReport: number
  reports: number
  /** The report decoded, LeaseDesk.exchange (verified tokens, router, pending), the answer encoded, µs. */
  perReportUs: Stats
  /** perReportUs.p50 / recordsPerReport. */
  perRecordUs: number
}

/**
 * The head's work for one direct-path report once its bytes are in, as bootstrap/head/leases.ts
 * does it: `records` done records and as many in-flight entries over `nodes` leased nodes.
 */
export async function leaseAppCost(options: {
  nodes: number
  records: number
  reports?: number
}): Promise<LeaseAppCost> {
  const router = new RegionalRouter()
  const verified = new VerifiedThroughput()
  // Real PeerIds: the desk reads them back (the peer store, connections).
  const ids = await Promise.all(
    Array.from({ length: options.nodes }, async () =>
      peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString(),
    ),
  )
  const desk = new LeaseDesk(
    { logger: silentLogger },
    {
      node: { getConnections: () => [], peerStore: { get: async () => ({ addresses: [] }) } } as never,
      router,
      verified,
      metrics: { regionTokens: { inc: () => {} }, requests: { inc: () => {} } } as never,
      allowed: () => true,
      usable: () => true,
    },
  )
  for (const id of ids) {
    router.upsert(id, { model: benchModel, slots: benchSlots, state: 'serving' })
    desk.keyFor(id)
  }
  desk.exchange({ models: [benchModel], done: [], inflight: [] }, 'gateway')
  const n = Math.min(options.records, ids.length)
  const wire = encodeLeaseRequest({
    models: [],
    done: ids
      .slice(0, n)
      .map((node) => ({ node, ok: true, completionTokens: 300, decodeMs: 10_000, unseen: 0 })),
    inflight: ids.slice(0, n).map((node) => ({ node, requests: 1, budget: 512 })),
  })
  const count = options.reports ?? 2_000
  const samples: number[] = []
  for (let i = 0; i < count; i++) {
    const t = performance.now()
    const grant = desk.exchange(parseLeaseRequest(decodeCanonical(wire)), 'gateway')
    encodeLeaseGrant(grant)
    samples.push((performance.now() - t) * 1000)
  }
  const perReportUs = stats(samples)
  return {
    nodes: options.nodes,
    recordsPerReport: 2 * n,
    reports: count,
    perReportUs,
    perRecordUs: perReportUs.p50 / (2 * n),
  }
}
