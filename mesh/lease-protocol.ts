import type { AbortOptions, Connection, PeerId, Stream } from '@libp2p/interface'
import { decodeCanonical, encodeCanonical } from '../core/cbor.ts'
import { isPlainObject } from '../core/guards.ts'
import { keptExchange, serveKept } from './kept-stream.ts'
import type { MeshNode } from './node.ts'
import {
  LEASE_PROTOCOL,
  leaseExchangeTimeoutMs,
  leaseMaxInboundStreams,
  leaseMaxModels,
  leaseMaxOutboundStreams,
  leaseMaxRecords,
  leaseMaxSamples,
  leaseRequestMaxBytes,
  leaseResponseMaxBytes,
} from './protocols.ts'
import { ticketMaxChars } from './ticket.ts'

/**
 * `/garage/lease/1.0.0`: the federation's side of the direct path (docs/mesh.md). One exchange per
 * stream: the holder reports what its direct requests did since the last exchange and what runs
 * now, and asks for leases on models; the head takes the report into its accounting and answers
 * with a lease (a ticket, slots, addresses) per node it lets the holder use.
 */

export class LeaseProtocolError extends Error {
  override name = 'LeaseProtocolError'
}

/** One direct request that ended: who served it, how, and what the holder saw of it. */
export interface LeaseDone {
  node: string
  /** Answered in full (status 200 and not cut). */
  ok: boolean
  /** Completion tokens the holder relayed (and billed). */
  completionTokens: number
  /** From the first byte to the end, ms (0 when there was no first byte). */
  decodeMs: number
  /**
   * Tokens the node may have made that the holder never saw: the rest of a cut stream's budget
   * (the head caps it as it does its own cut streams).
   */
  unseen: number
}

/** Direct requests running at one node as the report leaves, and their token budget. */
export interface LeaseInflight {
  node: string
  requests: number
  budget: number
}

export interface LeaseRequest {
  models: string[]
  done: LeaseDone[]
  inflight: LeaseInflight[]
  /**
   * Answers the holder sampled for the head's integrity check (openai/integrity.ts's
   * IntegritySample, checked by the head with parseSample): at most leaseMaxSamples, and only as
   * many as fit in leaseRequestMaxBytes beside the records (optional; absent when none).
   */
  samples?: Record<string, unknown>[]
}

export interface Lease {
  node: string
  model: string
  slots: number
  ticket: string
  /** Where the holder may dial the node (its direct and relayed addresses as the head knows them). */
  addrs: string[]
  /**
   * The share of the node's answers the holder samples for the head's integrity check, 0-1
   * (docs/integrity.md); absent when the head checks nothing (the holder then samples nothing).
   */
  rate?: number
}

export interface LeaseGrant {
  /** How long the tickets last, ms; the holder asks again well before. */
  ttlMs: number
  leases: Lease[]
}

const maxAddrs = 8
const maxAddrChars = 512
const maxIdChars = 128

function bad(message: string): never {
  throw new LeaseProtocolError(message)
}

function uint(v: unknown, what: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) bad(`${what} must be an unsigned integer`)
  return v
}

function text(v: unknown, what: string, max: number): string {
  if (typeof v !== 'string' || v.length === 0 || v.length > max)
    bad(`${what} must be a string of 1-${max} characters`)
  return v
}

function list(v: unknown, what: string, max: number): unknown[] {
  if (!Array.isArray(v) || v.length > max) bad(`${what} must be a list of at most ${max}`)
  return v
}

export function parseLeaseRequest(value: unknown): LeaseRequest {
  const keys = isPlainObject(value) ? Object.keys(value).sort().join(',') : ''
  if (
    !isPlainObject(value) ||
    value.v !== 1 ||
    (keys !== 'done,inflight,models,v' && keys !== 'done,inflight,models,samples,v')
  )
    bad('a lease request is { v: 1, models, done, inflight [, samples] }')
  const samples =
    value.samples === undefined
      ? null
      : list(value.samples, 'samples', leaseMaxSamples).map((x) => {
          if (!isPlainObject(x)) bad('a sample must be a map')
          return x
        })
  return {
    ...(samples != null ? { samples } : {}),
    models: list(value.models, 'models', leaseMaxModels).map((m) => text(m, 'a model', maxIdChars)),
    done: list(value.done, 'done', leaseMaxRecords).map((r) => {
      const f = list(r, 'a done record', 5)
      if (f.length !== 5) bad('a done record is [node, ok, completionTokens, decodeMs, unseen]')
      if (f[1] !== 0 && f[1] !== 1) bad("a done record's ok is 0 or 1")
      return {
        node: text(f[0], 'node', maxIdChars),
        ok: f[1] === 1,
        completionTokens: uint(f[2], 'completionTokens'),
        decodeMs: uint(f[3], 'decodeMs'),
        unseen: uint(f[4], 'unseen'),
      }
    }),
    inflight: list(value.inflight, 'inflight', leaseMaxRecords).map((r) => {
      const f = list(r, 'an inflight record', 3)
      if (f.length !== 3) bad('an inflight record is [node, requests, budget]')
      return {
        node: text(f[0], 'node', maxIdChars),
        requests: uint(f[1], 'requests'),
        budget: uint(f[2], 'budget'),
      }
    }),
  }
}

export function encodeLeaseRequest(r: LeaseRequest): Uint8Array {
  return encodeCanonical({
    v: 1,
    models: r.models,
    done: r.done.map((d) => [d.node, d.ok ? 1 : 0, d.completionTokens, Math.round(d.decodeMs), d.unseen]),
    inflight: r.inflight.map((i) => [i.node, i.requests, i.budget]),
    ...(r.samples != null && r.samples.length > 0 ? { samples: r.samples } : {}),
  })
}

export function parseLeaseGrant(value: unknown): LeaseGrant {
  if (!isPlainObject(value) || value.v !== 1 || Object.keys(value).sort().join(',') !== 'leases,ttl,v')
    bad('a lease grant is { v: 1, ttl, leases }')
  return {
    ttlMs: uint(value.ttl, 'ttl'),
    leases: list(value.leases, 'leases', leaseMaxRecords).map((l) => {
      const f = list(l, 'a lease', 6)
      if (f.length !== 5 && f.length !== 6) bad('a lease is [node, model, slots, ticket, addrs [, rate]]')
      const slots = uint(f[2], 'slots')
      if (slots < 1) bad("a lease's slots must be at least 1")
      const rate = f[5]
      if (f.length === 6 && (typeof rate !== 'number' || !(rate >= 0 && rate <= 1)))
        bad("a lease's rate must be a number from 0 to 1")
      return {
        ...(f.length === 6 ? { rate: rate as number } : {}),
        node: text(f[0], 'node', maxIdChars),
        model: text(f[1], 'model', maxIdChars),
        slots,
        ticket: text(f[3], 'ticket', ticketMaxChars),
        addrs: list(f[4], 'addrs', maxAddrs).map((a) => text(a, 'an address', maxAddrChars)),
      }
    }),
  }
}

export function encodeLeaseGrant(g: LeaseGrant): Uint8Array {
  return encodeCanonical({
    v: 1,
    ttl: g.ttlMs,
    leases: g.leases.map((l) => [
      l.node,
      l.model,
      l.slots,
      l.ticket,
      l.addrs.slice(0, maxAddrs),
      ...(l.rate != null ? [l.rate] : []),
    ]),
  })
}

export interface LeaseHandlerInit {
  /** Whether `peer` may hold leases (the head's trusted federation gateways). */
  allow(peer: PeerId): boolean
  /**
   * Takes the report and answers with leases. `instance` tells apart gateways that share one
   * PeerId (replicas of one Deployment): one per connection.
   */
  exchange(request: LeaseRequest, peer: PeerId, instance: string): LeaseGrant
  onBadRequest?: (err: Error, peer: PeerId) => void
}

/** Serves lease exchanges; a peer not allowed, or a malformed request, gets its stream reset. */
export async function handleLeaseProtocol(
  node: MeshNode,
  init: LeaseHandlerInit,
): Promise<() => Promise<void>> {
  await node.handle(
    LEASE_PROTOCOL,
    async (stream: Stream, connection: Connection) => {
      const peer = connection.remotePeer
      try {
        if (!init.allow(peer)) bad(`${peer.toString()} may not hold leases`)
        // Report after report on one stream (a gateway reports every 250 ms while it holds leases).
        await serveKept(stream, {
          maxRequestBytes: leaseRequestMaxBytes,
          firstMs: leaseExchangeTimeoutMs,
          idleMs: leaseKeptStreamIdleMs,
          writeMs: leaseExchangeTimeoutMs,
          answer: (bytes) =>
            encodeLeaseGrant(
              init.exchange(
                parseLeaseRequest(decodeCanonical(bytes)),
                peer,
                `${peer.toString()}/${connection.id}`,
              ),
            ),
        })
      } catch (err) {
        init.onBadRequest?.(err as Error, peer)
        stream.abort(err as Error)
      }
    },
    { maxInboundStreams: leaseMaxInboundStreams, maxOutboundStreams: leaseMaxOutboundStreams },
  )
  return () => node.unhandle(LEASE_PROTOCOL)
}

/** One exchange with `head` (on the stream kept from the last one): the report goes, leases come back. */
export async function requestLeases(
  node: MeshNode,
  head: PeerId,
  request: LeaseRequest,
  options: AbortOptions = {},
): Promise<LeaseGrant> {
  const bytes = encodeLeaseRequest(request)
  if (bytes.byteLength > leaseRequestMaxBytes)
    throw new LeaseProtocolError(
      `a lease request of ${bytes.byteLength} bytes is over ${leaseRequestMaxBytes}`,
    )
  const signal = AbortSignal.any([
    AbortSignal.timeout(leaseExchangeTimeoutMs),
    ...(options.signal != null ? [options.signal] : []),
  ])
  const answer = await keptExchange(node, head, bytes, {
    signal,
    protocol: LEASE_PROTOCOL,
    maxAnswerBytes: leaseResponseMaxBytes,
    maxOutboundStreams: leaseMaxOutboundStreams,
  })
  return parseLeaseGrant(decodeCanonical(answer))
}

/** A gateway's kept lease stream waits this long for its next report (it reports every 250 ms). */
const leaseKeptStreamIdleMs = 60_000
