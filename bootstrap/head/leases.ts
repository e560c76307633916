import { randomBytes } from 'node:crypto'
import type { IdentifyResult, PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import type { Logger } from '../../core/logger.ts'
import {
  handleLeaseProtocol,
  type Lease,
  type LeaseGrant,
  type LeaseRequest,
} from '../../mesh/lease-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { leaseReportIntervalMs, leaseTtlMs } from '../../mesh/protocols.ts'
import { issueTicket, ticketKeyBytes } from '../../mesh/ticket.ts'
import { type IntegritySample, parseSample } from '../../openai/integrity.ts'
import {
  abandonedStreamAllowanceTokens,
  directCutStreamAllowanceTokens,
  type VerifiedThroughput,
} from '../../openai/usage.ts'
import type { RegionalRouter } from '../../routing/node-router.ts'
import type { HeadMetrics } from './metrics.ts'

/** Reports a holder must send after a node's telemetry before its claims are checked. */
const reportsBeforeCheck = 2

interface Holder {
  /** Reports received. */
  reports: number
  lastAt: number
  /** Its direct requests running at each node, as of its last report. */
  inflight: Map<string, { requests: number; budget: number }>
  /** Its leases: a stable id per node (a renewal keeps the node's slot count), and the last ticket. */
  leases: Map<string, { id: number; ticket: string; exp: number; slots: number }>
}

/** A node's telemetry check waiting for the holders' reports that cover it. */
interface PendingCheck {
  run: () => void
  /** holder → the report count at which its reports cover the telemetry. */
  waits: Map<string, number>
  since: number
}

/** A check waits at most this long for reports (a holder that reports slowly, or not at all). */
const maxCheckWaitMs = 3_000

export interface LeaseDeskInit {
  logger: Logger
  ttlMs?: number
  now?: () => number
}

export interface LeaseDeskComponents {
  node: MeshNode
  router: RegionalRouter
  verified: VerifiedThroughput
  metrics: Pick<HeadMetrics, 'regionTokens' | 'requests'>
  /** Whether a holder may have leases (the head's trusted federation gateways). */
  allowed(peer: string): boolean
  /** Nodes the head would not send to: flagged, quarantined, leaving, unknown. */
  usable(node: string): boolean
  /**
   * Result integrity (docs/integrity.md): each lease says the node's sample rate, the holders'
   * samples are checked and their done records credited as the head's own answers are. Null: off.
   */
  integrity?: {
    rateFor(node: string): number
    credited(node: string, tokens: number): void
    consider(sample: IntegritySample): boolean
  } | null
}

/**
 * The head's side of the direct path (docs/region.md): a ticket key per node at each join, leases
 * on its serving nodes for the federation gateways it trusts, and the gateways' completion reports
 * taken into the head's accounting (verified tokens, in-flight counts, measured rates, breakers).
 * A node's telemetry check waits for the reports that cover it, so tokens a node made for the
 * direct path before the gateway had reported them are not held against it.
 */
export class LeaseDesk {
  readonly #init: LeaseDeskInit
  readonly #c: LeaseDeskComponents
  readonly #keys = new Map<string, Uint8Array>()
  readonly #holders = new Map<string, Holder>()
  readonly #checks = new Map<string, PendingCheck>()
  readonly #now: () => number
  readonly #ttlMs: number
  /** identify's listen addresses of joined nodes. */
  readonly #addrs = new Map<string, string[]>()
  #nextLeaseId = 1
  #timer: ReturnType<typeof setInterval> | null = null
  #unhandle: (() => Promise<void>) | null = null

  constructor(init: LeaseDeskInit, components: LeaseDeskComponents) {
    this.#init = init
    this.#c = components
    this.#now = init.now ?? Date.now
    this.#ttlMs = init.ttlMs ?? leaseTtlMs
  }

  async start(): Promise<void> {
    this.#unhandle = await handleLeaseProtocol(this.#c.node, {
      allow: (peer) => this.#c.allowed(peer.toString()),
      exchange: (request, peer, instance) => this.exchange(request, peer.toString(), instance),
      onBadRequest: (err, peer) =>
        this.#init.logger.debug({ peer: peer.toString(), err: err.message }, 'bad lease request'),
    })
    this.#c.node.addEventListener('peer:identify', this.#onIdentify)
    // A holder that stopped reporting is gone: what it had running is allowed for, its checks run.
    this.#timer = setInterval(() => this.expireHolders(), Math.max(250, this.#ttlMs / 4))
    this.#timer.unref()
  }

  async stop(): Promise<void> {
    if (this.#timer != null) clearInterval(this.#timer)
    this.#c.node.removeEventListener('peer:identify', this.#onIdentify)
    await this.#unhandle?.().catch(() => {})
  }

  /** A fresh ticket key for the node's join (sent with its assignment). */
  keyFor(peer: PeerId | string): Uint8Array {
    const key = new Uint8Array(randomBytes(ticketKeyBytes))
    const id = peer.toString()
    this.#keys.set(id, key)
    if (!this.#addrs.has(id)) {
      this.#addrs.set(id, [])
      // identify ran before the join: its addresses are in the peer store.
      this.#c.node.peerStore
        .get(typeof peer === 'string' ? peerIdFromString(peer) : peer)
        .then((p) => {
          if (this.#keys.get(id) === key && this.#addrs.get(id)?.length === 0)
            this.#addrs.set(
              id,
              p.addresses.slice(0, 8).map((a) => a.multiaddr.toString()),
            )
        })
        .catch(() => {})
    }
    for (const h of this.#holders.values()) h.leases.delete(id)
    return key
  }

  readonly #onIdentify = (evt: CustomEvent<IdentifyResult>): void => {
    const id = evt.detail.peerId.toString()
    if (this.#keys.has(id) || this.#addrs.has(id))
      this.#addrs.set(
        id,
        evt.detail.listenAddrs.slice(0, 8).map((a) => a.toString()),
      )
  }

  /** The node left: its key and leases go (its old tickets no longer verify after a rejoin). */
  forget(peer: string): void {
    this.#keys.delete(peer)
    this.#addrs.delete(peer)
    this.#checks.delete(peer)
    for (const h of this.#holders.values()) {
      h.leases.delete(peer)
      h.inflight.delete(peer)
    }
    this.#c.router.outside(peer, 0)
  }

  /** Direct requests' token budgets running at the node, by every holder's last report. */
  pending(peer: string): number {
    let budget = 0
    for (const h of this.#holders.values()) budget += h.inflight.get(peer)?.budget ?? 0
    return budget
  }

  /**
   * Runs the node's telemetry check now, or once every holder with a lease on the node has sent
   * the reports that cover what the node reported (a newer report replaces a waiting one).
   */
  whenCovered(peer: string, check: () => void): void {
    const waits = new Map<string, number>()
    for (const [id, h] of this.#holders) if (h.leases.has(peer)) waits.set(id, h.reports + reportsBeforeCheck)
    if (waits.size === 0) {
      this.#checks.delete(peer)
      check()
      return
    }
    // A check that waited too long runs now, with what the head has, before the newer one waits.
    const now = this.#now()
    let waiting = this.#checks.get(peer)
    if (waiting != null && now - waiting.since >= maxCheckWaitMs) {
      waiting.run()
      waiting = undefined
    }
    this.#checks.set(peer, { run: check, waits, since: waiting?.since ?? now })
  }

  /**
   * One holder's report in, its leases out. `holderId` is the gateway's PeerId (what its tickets
   * name); `instance` tells apart gateways sharing that PeerId (replicas), each with its own leases,
   * slots and in-flight counts.
   */
  exchange(request: LeaseRequest, holderId: string, instance = holderId): LeaseGrant {
    const now = this.#now()
    let holder = this.#holders.get(instance)
    if (holder == null) {
      holder = { reports: 0, lastAt: now, inflight: new Map(), leases: new Map() }
      this.#holders.set(instance, holder)
    }
    holder.lastAt = now
    const { router, verified, metrics, integrity } = this.#c
    for (const d of request.done) {
      if (!this.#keys.has(d.node)) continue
      verified.add(d.node, d.completionTokens)
      integrity?.credited(d.node, d.completionTokens)
      if (d.unseen > 0) verified.abandoned(d.node, d.unseen, directCutStreamAllowanceTokens)
      router.observed(d.node, { ok: d.ok, completionTokens: d.completionTokens, decodeMs: d.decodeMs })
      const model = holder.leases.has(d.node) ? this.#modelOf(d.node) : null
      if (model != null) {
        metrics.regionTokens.inc({ model }, d.completionTokens)
        metrics.requests.inc({ model, status: d.ok ? '200' : 'interrupted' })
      }
    }
    const touched = new Set([...holder.inflight.keys()])
    holder.inflight.clear()
    for (const i of request.inflight) {
      if (!this.#keys.has(i.node)) continue
      holder.inflight.set(i.node, { requests: i.requests, budget: i.budget })
      touched.add(i.node)
    }
    for (const node of touched) this.#countOutside(node)
    if (integrity != null) this.#consider(request.samples ?? [], holderId, integrity)
    holder.reports++
    this.#runCoveredChecks()
    return {
      ttlMs: this.#ttlMs,
      leases: request.models.length > 0 ? this.#grant(holderId, holder, request.models, now) : [],
    }
  }

  /** The holder's samples of its direct answers, each checked like one the head relayed itself. */
  #consider(
    samples: readonly Record<string, unknown>[],
    holderId: string,
    integrity: NonNullable<LeaseDeskComponents['integrity']>,
  ): void {
    for (const raw of samples) {
      let sample: IntegritySample
      try {
        sample = parseSample(raw)
      } catch (err) {
        this.#init.logger.debug({ holder: holderId, err: (err as Error).message }, 'bad integrity sample')
        continue
      }
      // Only answers of nodes this head keys (and so leased) are its to check.
      if (!this.#keys.has(sample.node)) continue
      integrity.consider(sample)
    }
  }

  /** Holders that reported within a lease's lifetime. */
  holders(): number {
    let n = 0
    const cutoff = this.#now() - this.#ttlMs
    for (const h of this.#holders.values()) if (h.lastAt >= cutoff) n++
    return n
  }

  #grant(holderId: string, holder: Holder, models: string[], now: number): Lease[] {
    const wanted = new Set(models)
    // Several gateways share a node's slots between them.
    const holders = Math.max(1, this.holders())
    const out: Lease[] = []
    for (const n of this.#c.router.snapshot()) {
      if (!wanted.has(n.model) || n.state !== 'serving' || n.breaker === 'open') continue
      const key = this.#keys.get(n.peerId)
      if (key == null || !this.#c.usable(n.peerId)) {
        holder.leases.delete(n.peerId)
        continue
      }
      // The node's parallel sequences and as many waiting, shared between the gateways.
      const slots = 2 * Math.max(1, Math.ceil(n.slots / holders))
      let lease = holder.leases.get(n.peerId)
      // A ticket is renewed once half its life is gone (or its slots changed), not at every report.
      if (lease == null || lease.exp - now < this.#ttlMs / 2 || lease.slots !== slots) {
        const id = lease?.id ?? this.#nextLeaseId++
        const exp = now + this.#ttlMs
        lease = {
          id,
          exp,
          slots,
          ticket: issueTicket(key, { node: n.peerId, holder: holderId, lease: id, exp, slots }),
        }
        holder.leases.set(n.peerId, lease)
      }
      out.push({
        node: n.peerId,
        model: n.model,
        slots,
        ticket: lease.ticket,
        addrs: this.#addrsOf(n.peerId),
        ...(this.#c.integrity != null ? { rate: this.#c.integrity.rateFor(n.peerId) } : {}),
      })
    }
    return out
  }

  /** Where a holder can dial the node: its listen and relayed addresses, as identify told the head. */
  #addrsOf(peer: string): string[] {
    const seen = new Set<string>(this.#addrs.get(peer) ?? [])
    for (const c of this.#c.node.getConnections(peerIdFromString(peer))) {
      // A relayed connection's address is dialable by anyone through the same relay.
      if (c.remoteAddr.toString().includes('/p2p-circuit')) seen.add(c.remoteAddr.toString())
    }
    return [...seen].slice(0, 8)
  }

  #modelOf(peer: string): string | null {
    return this.#c.router.snapshot().find((n) => n.peerId === peer)?.model ?? null
  }

  #countOutside(peer: string): void {
    let requests = 0
    for (const h of this.#holders.values()) requests += h.inflight.get(peer)?.requests ?? 0
    this.#c.router.outside(peer, requests)
  }

  #runCoveredChecks(): void {
    const now = this.#now()
    for (const [peer, check] of this.#checks) {
      let covered = now - check.since >= maxCheckWaitMs
      if (!covered) {
        covered = true
        for (const [id, at] of check.waits) {
          const h = this.#holders.get(id)
          if (h != null && h.reports < at) covered = false
        }
      }
      if (!covered) continue
      this.#checks.delete(peer)
      check.run()
    }
  }

  /** Drops holders silent past a lease's life (the desk's timer calls it). */
  expireHolders(): void {
    const cutoff = this.#now() - Math.max(this.#ttlMs, 8 * leaseReportIntervalMs)
    for (const [id, h] of this.#holders) {
      if (h.lastAt >= cutoff) continue
      // Gone mid-request (killed, partitioned): its nodes stopped at the reset, and what they made
      // since its last report is allowed for as the head allows for its own cut streams.
      for (const [node, i] of h.inflight) {
        for (let r = 0; r < i.requests; r++)
          this.#c.verified.abandoned(node, Math.min(abandonedStreamAllowanceTokens, i.budget))
      }
      this.#holders.delete(id)
      for (const node of h.inflight.keys()) this.#countOutside(node)
      this.#init.logger.info({ holder: id }, 'a direct-path holder stopped reporting: its leases lapse')
      for (const check of this.#checks.values()) check.waits.delete(id)
    }
    this.#runCoveredChecks()
  }
}
