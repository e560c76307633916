import { generateKeyPair } from '@libp2p/crypto/keys'
import { lpStream } from '@libp2p/utils'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { encodeCanonical } from '../../core/cbor.ts'
import {
  encodeLeaseGrant,
  handleLeaseProtocol,
  LeaseProtocolError,
  type LeaseRequest,
  parseLeaseGrant,
  parseLeaseRequest,
  requestLeases,
} from '../../mesh/lease-protocol.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { LEASE_PROTOCOL, leaseMaxRecords } from '../../mesh/protocols.ts'

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
})
