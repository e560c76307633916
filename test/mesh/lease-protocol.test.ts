import { generateKeyPair } from '@libp2p/crypto/keys'
import { lpStream } from '@libp2p/utils'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { decodeCanonical, encodeCanonical } from '../../core/cbor.ts'
import {
  encodeLeaseGrant,
  encodeLeaseRequest,
  handleLeaseProtocol,
  LeaseProtocolError,
  type LeaseRequest,
  parseLeaseGrant,
  parseLeaseRequest,
  requestLeases,
} from '../../mesh/lease-protocol.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { LEASE_PROTOCOL, leaseMaxRecords, leaseMaxSamples } from '../../mesh/protocols.ts'

describe('/garage/lease/1.0.0', () => {
  let head: MeshNode
  let holder: MeshNode
  let stranger: MeshNode
  const seen: LeaseRequest[] = []
  const bad: string[] = []
  beforeAll(async () => {
    const start = async () =>
      createMeshNode({
        privateKey: await generateKeyPair('Ed25519'),
        listen: ['/ip4/127.0.0.1/tcp/0'],
        allowPrivateAddresses: true,
        relayReservation: false,
      })
    ;[head, holder, stranger] = await Promise.all([start(), start(), start()])
    for (const n of [holder, stranger])
      await n.peerStore.merge(head.peerId, { multiaddrs: head.getMultiaddrs() })
    await handleLeaseProtocol(head, {
      allow: (peer) => peer.equals(holder.peerId),
      exchange: (request) => {
        seen.push(request)
        return {
          ttlMs: 10_000,
          leases: [{ node: 'n1', model: 'm', slots: 2, ticket: 'p.m', addrs: ['/ip4/10.0.0.1/tcp/1'] }],
        }
      },
      onBadRequest: (err) => bad.push(err.message),
    })
  })
  afterAll(async () => {
    await Promise.all([head, holder, stranger].map((n) => n?.stop()))
  })

  it('carries a report one way and leases the other', async () => {
    const grant = await requestLeases(holder, head.peerId, {
      models: ['m'],
      done: [{ node: 'n1', ok: true, completionTokens: 12, decodeMs: 30, unseen: 0 }],
      inflight: [{ node: 'n2', requests: 1, budget: 64 }],
    })
    expect(grant).toEqual({
      ttlMs: 10_000,
      leases: [{ node: 'n1', model: 'm', slots: 2, ticket: 'p.m', addrs: ['/ip4/10.0.0.1/tcp/1'] }],
    })
    expect(seen.at(-1)).toEqual({
      models: ['m'],
      done: [{ node: 'n1', ok: true, completionTokens: 12, decodeMs: 30, unseen: 0 }],
      inflight: [{ node: 'n2', requests: 1, budget: 64 }],
    })
  })

  it('a peer the head does not trust, or a malformed request, gets its stream reset; the head serves on', async () => {
    await expect(
      requestLeases(stranger, head.peerId, { models: [], done: [], inflight: [] }),
    ).rejects.toThrow()
    expect(bad.at(-1)).toMatch(/may not hold leases/)
    const stream = await holder.dialProtocol(head.peerId, LEASE_PROTOCOL)
    const lp = lpStream(stream)
    await lp.write(encodeCanonical({ v: 1, models: 'all', done: [], inflight: [] }))
    await expect(lp.read({ signal: AbortSignal.timeout(5_000) })).rejects.toThrow()
    expect(bad.at(-1)).toMatch(/models must be a list/)
    expect((await requestLeases(holder, head.peerId, { models: [], done: [], inflight: [] })).ttlMs).toBe(
      10_000,
    )
  })

  it('names every malformed field, and bounds every list', () => {
    const ok = { v: 1, models: [], done: [], inflight: [] }
    expect(() => parseLeaseRequest({ ...ok, extra: 1 })).toThrow(LeaseProtocolError)
    expect(() => parseLeaseRequest({ ...ok, done: [['n', 2, 1, 1, 0]] })).toThrow(/ok is 0 or 1/)
    expect(() => parseLeaseRequest({ ...ok, done: [['n', 1, -1, 1, 0]] })).toThrow(/completionTokens/)
    expect(() => parseLeaseRequest({ ...ok, inflight: [['n', 1]] })).toThrow(/inflight record/)
    expect(() => parseLeaseRequest({ ...ok, models: [''] })).toThrow(/model/)
    expect(() =>
      parseLeaseRequest({ ...ok, done: Array(leaseMaxRecords + 1).fill(['n', 1, 0, 0, 0]) }),
    ).toThrow(/at most/)
    expect(() => parseLeaseGrant({ v: 1, ttl: 1, leases: [['n', 'm', 0, 't', []]] })).toThrow(/slots/)
    expect(() =>
      parseLeaseGrant({ v: 1, ttl: 1, leases: [['n', 'm', 1, 't', Array(9).fill('/x')]] }),
    ).toThrow(/addrs/)
    // What the head encodes, the holder reads back.
    const grant = { ttlMs: 5, leases: [{ node: 'n', model: 'm', slots: 1, ticket: 't', addrs: [] }] }
    expect(
      parseLeaseGrant(JSON.parse(JSON.stringify({ v: 1, ttl: 5, leases: [['n', 'm', 1, 't', []]] }))),
    ).toEqual(grant)
    expect(encodeLeaseGrant(grant).byteLength).toBeGreaterThan(0)
  })

  it("carries the integrity fields: a lease's sample rate, a report's samples; both optional and strict", () => {
    const sample = {
      v: 1,
      model: 'm',
      node: 'n',
      endpoint: 'chat',
      request: { messages: [{ role: 'user', content: 'hi' }], temperature: 0.7 },
      output: { text: 'hello', finishReason: 'stop' },
      requestId: 'r1',
      at: 1_700_000_000_000,
    }
    // A report with samples, and one without: what is encoded is read back as it was.
    const withSamples: LeaseRequest = { models: ['m'], done: [], inflight: [], samples: [sample] }
    expect(parseLeaseRequest(decodeCanonical(encodeLeaseRequest(withSamples)))).toEqual(withSamples)
    const without: LeaseRequest = { models: ['m'], done: [], inflight: [] }
    expect(parseLeaseRequest(decodeCanonical(encodeLeaseRequest(without)))).toEqual(without)
    // An empty list is not sent at all.
    expect(
      Object.keys(decodeCanonical(encodeLeaseRequest({ ...without, samples: [] })) as object),
    ).not.toContain('samples')
    const ok = { v: 1, models: [], done: [], inflight: [] }
    expect(() => parseLeaseRequest({ ...ok, samples: 'all' })).toThrow(/samples must be a list/)
    expect(() => parseLeaseRequest({ ...ok, samples: [1] })).toThrow(/a sample must be a map/)
    expect(() => parseLeaseRequest({ ...ok, samples: Array(leaseMaxSamples + 1).fill(sample) })).toThrow(
      /at most 16/,
    )
    // A lease's rate: present (0-1) or absent; anything else is refused.
    const lease = { node: 'n', model: 'm', slots: 1, ticket: 't', addrs: [] }
    const rated = { ttlMs: 5, leases: [{ ...lease, rate: 0.02 }] }
    expect(parseLeaseGrant(decodeCanonical(encodeLeaseGrant(rated)))).toEqual(rated)
    expect(parseLeaseGrant(decodeCanonical(encodeLeaseGrant({ ttlMs: 5, leases: [lease] })))).toEqual({
      ttlMs: 5,
      leases: [lease],
    })
    for (const rate of [-0.1, 1.5, '0.5', null, Number.NaN])
      expect(() => parseLeaseGrant({ v: 1, ttl: 1, leases: [['n', 'm', 1, 't', [], rate]] })).toThrow(
        /rate must be a number from 0 to 1/,
      )
    expect(() => parseLeaseGrant({ v: 1, ttl: 1, leases: [['n', 'm', 1, 't', [], 0.5, 'x']] })).toThrow(
      /at most 6/,
    )
  })
})
