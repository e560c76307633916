import { multiaddr } from '@multiformats/multiaddr'
import { encodeCanonical } from '../core/cbor.ts'
import type { Logger } from '../core/logger.ts'
import {
  InferConnectError,
  InferFirstByteTimeoutError,
  InferRemoteError,
  type InferRequest,
  type InferResponse,
  sendInferRequest,
} from '../mesh/infer-protocol.ts'
import type { Lease, LeaseDone, LeaseInflight, LeaseRequest } from '../mesh/lease-protocol.ts'
import { encodeLeaseRequest, requestLeases } from '../mesh/lease-protocol.ts'
import type { MeshNode } from '../mesh/node.ts'
import { PeerIdCache } from '../mesh/peer-ids.ts'
import {
  leaseMaxRecords,
  leaseMaxSamples,
  leaseReportIntervalMs,
  leaseRequestMaxBytes,
} from '../mesh/protocols.ts'
import { ticketHeader } from '../mesh/ticket.ts'
import type { ProxiedKind } from '../openai/endpoints.ts'
import { AnswerCapture, buildSample, type IntegritySample, sampleDecision } from '../openai/integrity.ts'
import { RegionalRouter, type RequestTicket } from '../routing/node-router.ts'

/**
 * The federation's side of the direct path (docs/federation.md): requests go straight to a node
 * the region's head leased to this gateway, with the head's ticket, instead of through the head.
 * Per region, the leases are spent locally (a RegionalRouter over the leased nodes, so no round
 * trip per request), and what the direct requests did goes back to the head in a report every
 * 250 ms, which also renews the leases. When no lease is free, or the node cannot be reached or
 * refuses before the first byte, the request goes through the head as before.
 */

/** Statuses from a node that mean "let the head place it" while nothing reached the client. */
const fallbackStatuses: ReadonlySet<number> = new Set([429, 500, 502, 503, 504])
/** A node the gateway cannot dial in this long is left to the head for this request. */
const directConnectTimeoutMs = 3_000
/** A model nobody asked for in this long stops being leased. */
const modelIdleMs = 60_000
/** Integrity samples waiting for a report (the head unreachable): past it the oldest go. */
const maxQueuedSamples = 4 * leaseMaxSamples
/** Room a report keeps for the samples list's own framing (its key and length). */
const samplesFramingBytes = 16

export interface DirectPathInit {
  logger: Logger
  firstByteTimeoutMs: number
  /** Between reports (default 250 ms). */
  reportIntervalMs?: number
}

export interface DirectPathComponents {
  node: MeshNode
  /** The head of a region now (the directory's view). */
  headOf(region: string): string | null
}

/** A direct request in flight: what its report needs when it ends. */
export interface DirectAttempt {
  region: string
  node: string
  budget: number
  ticket: RequestTicket
  firstByteAt: number | null
  /** The share of the node's answers the head wants checked (its lease's rate; 0 when none). */
  rate: number
  /** The answer's status (a sample is taken from a whole 200 answer only). */
  status: number
  /** The answer is sampled for the head's integrity check: what the sample needs, and its text. */
  sampled: { capture: AnswerCapture; init: Omit<IntegritySample, 'v' | 'output' | 'at'> } | null
}

interface RegionLeases {
  head: string
  router: RegionalRouter
  leases: Map<string, Lease & { exp: number; ttlHalf: number }>
  /** model → when it was last asked for. */
  wanted: Map<string, number>
  done: LeaseDone[]
  /** Sampled answers for the head's integrity check, with their encoded size, oldest first. */
  samples: Array<{ sample: IntegritySample; bytes: number }>
  inflight: Map<string, { requests: number; budget: number }>
  /** A report is on its way; `settled` resolves when it is done. */
  busy: boolean
  settled: Promise<void>
  /** Ask now, not at the next tick (a model with no leases, a refused ticket). */
  urgent: boolean
  /** Failed reports in a row (the head unreachable): the next waits longer. */
  failures: number
  nextAt: number
}

export class DirectPath {
  readonly #init: DirectPathInit
  readonly #c: DirectPathComponents
  readonly #regions = new Map<string, RegionLeases>()
  readonly #peerIds = new PeerIdCache(4096)
  readonly #intervalMs: number
  #timer: ReturnType<typeof setInterval> | null = null
  /** Requests sent straight to nodes, and those that fell back to the head. */
  readonly counts = { direct: 0, fallback: 0, dropped: 0, samples: 0, samplesDropped: 0 }

  constructor(init: DirectPathInit, components: DirectPathComponents) {
    this.#init = init
    this.#c = components
    this.#intervalMs = init.reportIntervalMs ?? leaseReportIntervalMs
  }

  start(): void {
    this.#timer = setInterval(() => this.#tick(), this.#intervalMs)
    this.#timer.unref()
  }

  /** Stops reporting after one last report per region (best effort). */
  async stop(): Promise<void> {
    if (this.#timer != null) clearInterval(this.#timer)
    this.#timer = null
    await this.flush()
  }

  /** Reports to every region's head now, not at the next tick (waits for one under way first). */
  async flush(): Promise<void> {
    await Promise.all(
      [...this.#regions].map(async ([region, r]) => {
        while (r.busy) await r.settled
        await this.#report(region).catch(() => {})
      }),
    )
  }

  /**
   * Sends the request straight to a leased node of `region`: the answer, with the attempt to end
   * once it is relayed; or null when there is no free lease or the node failed before its first
   * byte (the caller sends through the head).
   */
  async send(
    region: string,
    model: string,
    request: InferRequest,
    budget: number,
    signal: AbortSignal,
  ): Promise<{ response: InferResponse; attempt: DirectAttempt } | null> {
    const r = this.#region(region)
    if (r == null) return null
    r.wanted.set(model, performance.now())
    this.#expire(r)
    // A lease whose slots are all taken here is skipped (its node would refuse).
    let full: Set<string> | undefined
    for (const [node, i] of r.inflight) {
      const slots = r.leases.get(node)?.slots ?? 0
      if (i.requests < slots) continue
      full ??= new Set()
      full.add(node)
    }
    const nodeId = r.router.pick(model, full != null ? { exclude: full } : {})
    if (nodeId == null) {
      if (![...r.leases.values()].some((l) => l.model === model)) r.urgent = true
      this.counts.fallback++
      return null
    }
    const lease = r.leases.get(nodeId)!
    const ticket = r.router.begin(nodeId)
    const attempt: DirectAttempt = {
      region,
      node: nodeId,
      budget,
      ticket,
      firstByteAt: null,
      rate: lease.rate ?? 0,
      status: 0,
      sampled: null,
    }
    this.#inflight(r, nodeId, 1, budget)
    let response: InferResponse
    try {
      response = await sendInferRequest(
        this.#c.node,
        this.#peerIds.get(nodeId),
        { ...request, headers: [...request.headers, [ticketHeader, lease.ticket]] },
        {
          signal,
          connectTimeoutMs: directConnectTimeoutMs,
          firstByteTimeoutMs: this.#init.firstByteTimeoutMs,
        },
      )
    } catch (err) {
      this.#abandon(r, attempt, 0)
      if (signal.aborted) throw err
      this.#failed(r, nodeId, err as Error)
      return null
    }
    if (fallbackStatuses.has(response.status)) {
      // Nothing reached the client: drop the answer and let the head place the request.
      void (async () => {
        try {
          for await (const _ of response.body) {
            // discarded
          }
        } catch {}
      })()
      this.#abandon(r, attempt, 0)
      if (response.status >= 500) r.router.failure(nodeId)
      this.counts.fallback++
      return null
    }
    this.counts.direct++
    attempt.status = response.status
    // What the node says of itself never names who served: the gateway knows, from the lease.
    const headers = response.headers.filter(([k]) => !k.toLowerCase().startsWith('x-garage-'))
    headers.push(['x-garage-node', nodeId])
    return { response: { ...response, headers }, attempt }
  }

  /**
   * Whether to check this answer, at the rate the node's head put in its lease (decided before it
   * is relayed): a capture to feed as it passes, or null. The head sees no direct answer, so the
   * gateway samples them for it and ships the samples in its next report.
   */
  capture(
    attempt: DirectAttempt,
    call: { kind: ProxiedKind; model: string; body: Record<string, unknown>; requestId: string },
  ): AnswerCapture | null {
    if (call.kind !== 'chat' && call.kind !== 'completion') return null
    if (!sampleDecision(call.kind, call.body, attempt.rate)) return null
    const capture = new AnswerCapture()
    attempt.sampled = {
      capture,
      init: {
        model: call.model,
        node: attempt.node,
        operator: attempt.node,
        endpoint: call.kind,
        request: call.body,
        requestId: call.requestId,
      },
    }
    return capture
  }

  /** The attempt's answer began reaching the client. */
  firstByte(attempt: DirectAttempt): void {
    attempt.firstByteAt ??= performance.now()
    attempt.ticket.firstByte()
  }

  /**
   * The attempt's answer was relayed (or failed): reported to the head with its tokens. `ok`: whole;
   * `completionTokens`: what the client received; a cut answer's unseen tail is the rest of its budget.
   */
  ended(attempt: DirectAttempt, ok: boolean, completionTokens: number): void {
    const r = this.#regions.get(attempt.region)
    attempt.ticket.end({ ok, completionTokens })
    if (r == null) return
    if (ok) r.router.success(attempt.node)
    this.#inflight(r, attempt.node, -1, -attempt.budget)
    this.#record(r, {
      node: attempt.node,
      ok,
      completionTokens,
      decodeMs: attempt.firstByteAt == null ? 0 : performance.now() - attempt.firstByteAt,
      unseen: ok ? 0 : Math.max(0, attempt.budget - completionTokens),
    })
    if (ok && attempt.status === 200) this.#sample(r, attempt)
  }

  /** A sampled answer that came whole: its sample waits for the next report. */
  #sample(r: RegionLeases, attempt: DirectAttempt): void {
    const sampled = attempt.sampled
    attempt.sampled = null
    const output = sampled?.capture.output()
    if (sampled == null || output == null) return
    const sample = buildSample({ ...sampled.init, output, at: Date.now() })
    if (sample == null) return
    let bytes: number
    try {
      bytes = encodeCanonical(sample).byteLength
    } catch {
      return
    }
    if (r.samples.length >= maxQueuedSamples) {
      r.samples.shift()
      this.counts.samplesDropped++
    }
    r.samples.push({ sample, bytes })
  }

  /**
   * The samples that go with a report: the oldest that fit, at most leaseMaxSamples, within
   * leaseRequestMaxBytes beside the records (which are never left out for them). A sample too big
   * to ever fit beside an empty report is dropped; the others wait for the next report.
   */
  #samplesFor(r: RegionLeases, request: LeaseRequest): Array<{ sample: IntegritySample; bytes: number }> {
    if (r.samples.length === 0) return []
    const room = leaseRequestMaxBytes - encodeLeaseRequest(request).byteLength - samplesFramingBytes
    const emptyRoom =
      leaseRequestMaxBytes -
      encodeLeaseRequest({ models: [], done: [], inflight: [] }).byteLength -
      samplesFramingBytes
    const taken: Array<{ sample: IntegritySample; bytes: number }> = []
    const kept: Array<{ sample: IntegritySample; bytes: number }> = []
    let used = 0
    for (const s of r.samples) {
      if (s.bytes > emptyRoom) {
        this.counts.samplesDropped++
        continue
      }
      if (taken.length < leaseMaxSamples && used + s.bytes <= room) {
        taken.push(s)
        used += s.bytes
      } else kept.push(s)
    }
    r.samples = kept
    return taken
  }

  /** Leased nodes per region (for /health). */
  view(): Array<{ region: string; leases: number; inflight: number }> {
    return [...this.#regions].map(([region, r]) => ({
      region,
      leases: r.leases.size,
      inflight: [...r.inflight.values()].reduce((s, i) => s + i.requests, 0),
    }))
  }

  #region(region: string): RegionLeases | null {
    const head = this.#c.headOf(region)
    if (head == null) return null
    let r = this.#regions.get(region)
    if (r != null && r.head !== head) {
      // A new head: its nodes' keys are new; the old leases are worthless.
      this.#regions.delete(region)
      r = undefined
    }
    if (r == null) {
      r = {
        head,
        router: new RegionalRouter(),
        leases: new Map(),
        wanted: new Map(),
        done: [],
        samples: [],
        inflight: new Map(),
        busy: false,
        settled: Promise.resolve(),
        urgent: true,
        failures: 0,
        nextAt: 0,
      }
      this.#regions.set(region, r)
    }
    return r
  }

  /** A failure before the first byte: the node is avoided a while; a refused ticket is renewed. */
  #failed(r: RegionLeases, nodeId: string, err: Error): void {
    this.counts.fallback++
    if (err instanceof InferRemoteError && err.code === 'ticket_invalid') {
      // The node rejoined (new key) or its lease ran out: this lease is dead.
      r.leases.delete(nodeId)
      r.router.remove(nodeId)
      r.urgent = true
    } else if (err instanceof InferRemoteError && err.code === 'lease_full') {
      // All the lease's slots are busy (another gateway's count drifted): nothing is broken.
    } else {
      r.router.failure(nodeId)
    }
    if (err instanceof InferConnectError || err instanceof InferFirstByteTimeoutError)
      this.#init.logger.debug({ node: nodeId, err: err.message }, 'direct path failed; through the head')
  }

  #abandon(r: RegionLeases, attempt: DirectAttempt, tokens: number): void {
    attempt.ticket.end({ ok: false, completionTokens: tokens })
    this.#inflight(r, attempt.node, -1, -attempt.budget)
  }

  #inflight(r: RegionLeases, node: string, requests: number, budget: number): void {
    const i = r.inflight.get(node) ?? { requests: 0, budget: 0 }
    i.requests += requests
    i.budget += budget
    if (i.requests <= 0) r.inflight.delete(node)
    else r.inflight.set(node, i)
  }

  #record(r: RegionLeases, done: LeaseDone): void {
    if (r.done.length >= leaseMaxRecords) {
      // The head has been unreachable for a long time: the oldest reports go (the ledger has them;
      // the head allows for what it never hears of as for a cut stream).
      r.done.shift()
      this.counts.dropped++
    }
    r.done.push(done)
  }

  #expire(r: RegionLeases): void {
    const now = performance.now()
    for (const [node, l] of r.leases) {
      if (l.exp > now) continue
      r.leases.delete(node)
      r.router.remove(node)
    }
  }

  #tick(): void {
    const now = performance.now()
    for (const [region, r] of this.#regions) {
      if (r.busy || now < r.nextAt) continue
      for (const [model, at] of r.wanted) if (now - at > modelIdleMs) r.wanted.delete(model)
      const renew = [...r.leases.values()].some((l) => l.exp - now < l.ttlHalf)
      // While it holds leases the gateway reports at every tick, empty or not: the head checks its
      // nodes' claims once two reports after them are in.
      if (
        r.leases.size === 0 &&
        r.done.length === 0 &&
        r.samples.length === 0 &&
        r.inflight.size === 0 &&
        !r.urgent &&
        !renew
      )
        continue
      void this.#report(region).catch(() => {})
    }
  }

  /** One exchange with the region's head: the report goes, leases come back. */
  async #report(region: string): Promise<void> {
    const r = this.#regions.get(region)
    if (r == null || r.busy) return
    r.busy = true
    let settle = (): void => {}
    r.settled = new Promise((resolve) => {
      settle = resolve
    })
    const done = r.done
    r.done = []
    const inflight: LeaseInflight[] = [...r.inflight].map(([node, i]) => ({ node, ...i }))
    const now = performance.now()
    const renew = r.urgent || [...r.leases.values()].some((l) => l.exp - now < l.ttlHalf)
    r.urgent = false
    const request: LeaseRequest = { models: renew ? [...r.wanted.keys()].slice(0, 64) : [], done, inflight }
    const samples = this.#samplesFor(r, request)
    try {
      const grant = await requestLeases(this.#c.node, this.#peerIds.get(r.head), {
        ...request,
        ...(samples.length > 0
          ? { samples: samples.map((s) => s.sample as unknown as Record<string, unknown>) }
          : {}),
      })
      this.counts.samples += samples.length
      r.failures = 0
      r.nextAt = 0
      if (renew) await this.#take(r, grant.leases, grant.ttlMs)
    } catch (err) {
      // Kept for the next report; a head that is down is asked less often.
      r.done = done.concat(r.done).slice(-leaseMaxRecords)
      r.samples = samples.concat(r.samples).slice(-maxQueuedSamples)
      r.failures++
      r.nextAt = performance.now() + Math.min(5_000, this.#intervalMs * 2 ** r.failures)
      if (renew) r.urgent = true
      this.#init.logger.debug({ region, err: (err as Error).message }, 'lease report failed')
    } finally {
      r.busy = false
      settle()
    }
  }

  /** A grant replaces the region's leases for the models asked (those not granted again lapse). */
  async #take(r: RegionLeases, leases: Lease[], ttlMs: number): Promise<void> {
    const now = performance.now()
    // Expire early by a margin: a ticket must not run out between the pick and the node's check.
    const exp = now + Math.max(0, ttlMs - 2 * this.#intervalMs - 500)
    const granted = new Set<string>()
    for (const l of leases) {
      granted.add(l.node)
      const before = r.leases.get(l.node)
      r.leases.set(l.node, { ...l, exp, ttlHalf: ttlMs / 2 })
      r.router.upsert(l.node, { model: l.model, slots: l.slots, state: 'serving' })
      if (before == null || before.addrs.join() !== l.addrs.join()) {
        const addrs = l.addrs.flatMap((a) => {
          try {
            return [multiaddr(a)]
          } catch {
            return []
          }
        })
        await this.#c.node.peerStore
          .merge(this.#peerIds.get(l.node), { multiaddrs: addrs })
          .catch((err: Error) =>
            this.#init.logger.debug({ node: l.node, err: err.message }, 'bad lease addrs'),
          )
      }
    }
    for (const node of [...r.leases.keys()]) {
      if (granted.has(node)) continue
      r.leases.delete(node)
      r.router.remove(node)
    }
  }
}
