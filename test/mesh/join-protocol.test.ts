import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PeerId, PrivateKey, Stream } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { lpStream } from '@libp2p/utils'
import { encode } from 'cborg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { decodeCanonical, encodeCanonical } from '../../core/cbor.ts'
import {
  capabilityReportSigningDomain,
  signCapabilityReport,
  verifyCapabilityReport,
} from '../../mesh/capability-report.ts'
import {
  handleJoinProtocol,
  type JoinHandlerInit,
  JoinRefusedError,
  parseAssignment,
  requestJoin,
  requestLeave,
} from '../../mesh/join-protocol.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { JOIN_PROTOCOL } from '../../mesh/protocols.ts'
import type { Assignment, CapabilityReport } from '../../mesh/region-messages.ts'
import { TestMesh } from '../helpers/mesh.ts'

const now = Date.UTC(2025, 0, 15, 12, 0, 0)
const minute = 60_000

function reportFor(peerId: string, over: Partial<CapabilityReport> = {}): CapabilityReport {
  return {
    v: 1,
    peerId,
    region: 'eu-north',
    daemonVersion: '0.1.0',
    issuedAt: now,
    hardware: {
      gpus: [{ vendor: 'nvidia', name: 'NVIDIA GeForce RTX 4090', vramMiB: 24_564 }],
      ramMiB: 65_536,
      cpuCores: 16,
    },
    engines: ['llamacpp', 'vllm'],
    vramCapMiB: 20_000,
    ramCapMiB: 32_000,
    hostPolicy: { state: 'clear' },
    rayOptIn: false,
    ...over,
  }
}

function assignmentFor(head: string, over: Partial<Assignment> = {}): Assignment {
  return {
    v: 1,
    region: 'eu-north',
    head,
    model: 'garage-tiny',
    engine: 'llamacpp',
    source: { gguf: 'garage-tiny' },
    engineArgs: { parallel: 4, contextLength: 1024 },
    telemetryIntervalMs: 2_000,
    ...over,
  }
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.byteLength + b.byteLength)
  out.set(a, 0)
  out.set(b, a.byteLength)
  return out
}

/** An envelope over any report, signed by any key: what a forger can build. */
async function forge(key: PrivateKey, report: unknown, v = 1): Promise<Uint8Array> {
  const bytes = encodeCanonical(report)
  const sig = await key.sign(concat(capabilityReportSigningDomain, bytes))
  return encodeCanonical({ v, report: bytes, sig })
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p
  } catch (err) {
    return err as Error
  }
  throw new Error('expected a rejection')
}

describe('signed capability reports', () => {
  let key: PrivateKey
  let peer: PeerId
  let other: PrivateKey
  let otherPeer: PeerId
  const verify = (bytes: Uint8Array, over: Partial<Parameters<typeof verifyCapabilityReport>[1]> = {}) =>
    verifyCapabilityReport(bytes, { remotePeer: peer, region: 'eu-north', now, ...over })

  beforeAll(async () => {
    key = await generateKeyPair('Ed25519')
    peer = peerIdFromPrivateKey(key)
    other = await generateKeyPair('Ed25519')
    otherPeer = peerIdFromPrivateKey(other)
  })

  it('round-trips a report signed by the node', async () => {
    const report = reportFor(peer.toString(), {
      hostPolicy: { state: 'paused', reason: 'game: eldenring.exe' },
    })
    expect(await verify(await signCapabilityReport(key, report))).toEqual(report)
  })

  it('carries the engines that failed, with why, and bounds them', async () => {
    const report = reportFor(peer.toString(), {
      engines: ['llamacpp'],
      engineFailures: [{ engine: 'vllm', reason: 'the vLLM image could not be pulled: no network' }],
    })
    expect(await verify(await signCapabilityReport(key, report))).toEqual(report)
    for (const failures of [
      [{ engine: 'docker', reason: 'x' }],
      [{ engine: 'vllm', reason: 'x'.repeat(129) }],
      [{ engine: 'vllm', reason: '' }],
      [{ engine: 'vllm' }],
      Array.from({ length: 3 }, () => ({ engine: 'vllm', reason: 'x' })),
    ]) {
      const bad = reportFor(peer.toString(), { engineFailures: failures as never })
      expect((await rejection(verify(await forge(key, bad)))).name, JSON.stringify(failures)).toBe(
        'CapabilityReportShapeError',
      )
    }
  })

  it('drops absent optional fields, so a report built with undefined still encodes', async () => {
    const report = reportFor(peer.toString(), { hostPolicy: { state: 'clear', reason: undefined } as never })
    expect((await verify(await signCapabilityReport(key, report))).hostPolicy).toEqual({ state: 'clear' })
  })

  it('names a report whose fields are wrong: CapabilityReportShapeError', async () => {
    const id = peer.toString()
    const gpu = { vendor: 'nvidia' as const, name: 'x', vramMiB: 1 }
    const bad: Array<[string, unknown]> = [
      ['17 GPUs', reportFor(id, { hardware: { gpus: Array(17).fill(gpu), ramMiB: 1, cpuCores: 1 } })],
      [
        'a 129-character GPU name',
        reportFor(id, { hardware: { gpus: [{ ...gpu, name: 'x'.repeat(129) }], ramMiB: 1, cpuCores: 1 } }),
      ],
      [
        'an unknown vendor',
        reportFor(id, {
          hardware: { gpus: [{ ...gpu, vendor: 'voodoo' as never }], ramMiB: 1, cpuCores: 1 },
        }),
      ],
      [
        'a fractional VRAM size',
        reportFor(id, { hardware: { gpus: [{ ...gpu, vramMiB: 1.5 }], ramMiB: 1, cpuCores: 1 } }),
      ],
      ['a negative RAM cap', reportFor(id, { ramCapMiB: -1 })],
      ['an unknown engine', reportFor(id, { engines: ['llamacpp', 'docker' as never] })],
      ['an engine twice', reportFor(id, { engines: ['vllm', 'vllm'] })],
      ['a string for rayOptIn', reportFor(id, { rayOptIn: 'yes' as never })],
      ['an extra field', { ...reportFor(id), extra: 1 }],
      ['a missing field', { ...reportFor(id), daemonVersion: undefined }],
      ['a bad host policy', reportFor(id, { hostPolicy: { state: 'gaming' as never } })],
      ['a region that is not a name', reportFor(id, { region: 'EU North' })],
    ]
    for (const [what, report] of bad) {
      expect((await rejection(verify(await forge(key, report)))).name, what).toBe(
        'CapabilityReportShapeError',
      )
      expect((await rejection(signCapabilityReport(key, report as CapabilityReport))).name, what).toBe(
        'CapabilityReportShapeError',
      )
    }
    for (const garbage of [
      new Uint8Array([0xff, 0x00]),
      encode([1, 2]),
      encode({ v: 1, report: 'x', sig: 'y' }),
    ]) {
      expect((await rejection(verify(garbage))).name).toBe('CapabilityReportShapeError')
    }
    expect((await rejection(verify(new Uint8Array(64 * 1024)))).name).toBe('CapabilityReportShapeError')
  })

  it('names a report from a newer daemon: CapabilityReportVersionError', async () => {
    const id = peer.toString()
    expect((await rejection(verify(await forge(key, reportFor(id), 2)))).name).toBe(
      'CapabilityReportVersionError',
    )
    expect((await rejection(verify(await forge(key, { ...reportFor(id), v: 2 })))).name).toBe(
      'CapabilityReportVersionError',
    )
  })

  it('names a report about another peer: CapabilityReportPeerMismatchError', async () => {
    const signed = await signCapabilityReport(key, reportFor(peer.toString()))
    const err = await rejection(verify(signed, { remotePeer: otherPeer }))
    expect(err.name).toBe('CapabilityReportPeerMismatchError')
    // the node's own key cannot sign a report that names someone else
    expect((await rejection(signCapabilityReport(key, reportFor(otherPeer.toString())))).name).toBe(
      'CapabilityReportPeerMismatchError',
    )
  })

  it('names a report signed by another key or altered: CapabilityReportSignatureError', async () => {
    const forged = await forge(other, reportFor(peer.toString()))
    expect((await rejection(verify(forged))).name).toBe('CapabilityReportSignatureError')

    const env = decodeCanonical(await signCapabilityReport(key, reportFor(peer.toString()))) as {
      sig: Uint8Array
    }
    env.sig[0] = (env.sig[0] ?? 0) ^ 1
    expect((await rejection(verify(encodeCanonical(env)))).name).toBe('CapabilityReportSignatureError')
  })

  it('names a report for another region: CapabilityReportRegionError', async () => {
    const signed = await signCapabilityReport(key, reportFor(peer.toString(), { region: 'us-east' }))
    expect((await rejection(verify(signed))).name).toBe('CapabilityReportRegionError')
  })

  it('names a report issued more than 5 minutes before or after now: CapabilityReportStaleError', async () => {
    const signed = await signCapabilityReport(key, reportFor(peer.toString()))
    expect(await verify(signed, { now: now + 5 * minute })).toBeDefined()
    expect(await verify(signed, { now: now - 5 * minute })).toBeDefined()
    expect((await rejection(verify(signed, { now: now + 5 * minute + 1 }))).name).toBe(
      'CapabilityReportStaleError',
    )
    expect((await rejection(verify(signed, { now: now - 5 * minute - 1 }))).name).toBe(
      'CapabilityReportStaleError',
    )
    expect((await rejection(verify(signed, { now: now + 2 * minute, maxAgeMs: minute }))).name).toBe(
      'CapabilityReportStaleError',
    )
  })
})

describe('assignments from a head are checked', () => {
  const head = '12D3KooWRHB6rdTyTa5JPeJkL6RqvYJf3zQ3qgVdtqzYzN2Rk5p1'
  it('accepts a well-formed assignment and rejects each broken field', () => {
    expect(parseAssignment(assignmentFor(head))).toEqual(assignmentFor(head))
    const ray = { address: '10.0.0.1:6379', token: 't'.repeat(64) }
    expect(parseAssignment(assignmentFor(head, { ray })).ray).toEqual(ray)
    const bad: Array<[string, unknown]> = [
      ['engine', assignmentFor(head, { engine: 'docker' as never })],
      ['needs source.hf', assignmentFor(head, { engine: 'vllm' })],
      ['telemetryIntervalMs', assignmentFor(head, { telemetryIntervalMs: 1 })],
      ['gpuMemoryUtilization', assignmentFor(head, { engineArgs: { gpuMemoryUtilization: 1.5 } })],
      ['parallel', assignmentFor(head, { engineArgs: { parallel: 0 } })],
      ['model', assignmentFor(head, { model: 'm'.repeat(129) })],
      ['ray.token', assignmentFor(head, { ray: { address: 'a:1', token: '' } })],
      ['not a known field', { ...assignmentFor(head), shell: 'rm -rf /' }],
      ['version', { ...assignmentFor(head), v: 2 }],
    ]
    for (const [what, value] of bad) {
      expect(() => parseAssignment(value), what).toThrow(
        expect.objectContaining({ name: 'JoinProtocolError' }),
      )
      expect(() => parseAssignment(value), what).toThrow(what)
    }
  })
})

/** A loopback node whose key the test holds (TestMesh.node keeps its key to itself): it signs reports. */
async function nodeWithKey(mesh: TestMesh): Promise<{ node: MeshNode; key: PrivateKey }> {
  const key = await generateKeyPair('Ed25519')
  const node = await createMeshNode({
    privateKey: key,
    listen: ['/ip4/127.0.0.1/tcp/0'],
    allowPrivateAddresses: true,
    relayReservation: false,
  })
  mesh.track(async () => {
    await node.stop()
  })
  return { node, key }
}

/** Reads a stream until it ends or is reset; returns what arrived and how it ended. */
async function drain(
  stream: AsyncIterable<{ byteLength: number }>,
): Promise<{ bytes: number; error: Error | null }> {
  let bytes = 0
  try {
    for await (const chunk of stream) bytes += chunk.byteLength
    return { bytes, error: null }
  } catch (err) {
    return { bytes, error: err as Error }
  }
}

describe('/garage/join/1.0.0 between two nodes', () => {
  const mesh = new TestMesh()
  let head: MeshNode
  let node: MeshNode
  let nodeKey: PrivateKey
  let headId: PeerId
  const joins: Array<{ report: CapabilityReport; peer: string }> = []
  const leaves: string[] = []
  const badRequests: string[] = []
  let onJoin: JoinHandlerInit['onJoin']

  beforeAll(async () => {
    head = await mesh.node([])
    headId = head.peerId
    await handleJoinProtocol(head, {
      region: 'eu-north',
      now: () => now,
      onJoin: (report, peer, options) => onJoin(report, peer, options),
      async onLeave(peer) {
        leaves.push(peer.toString())
      },
      onBadRequest: (err) => badRequests.push(err.name),
    })
    ;({ node, key: nodeKey } = await nodeWithKey(mesh))
    await node.dial(head.getMultiaddrs()[0]!)
  })
  afterAll(() => mesh.cleanup())

  const join = async (report: CapabilityReport, key = nodeKey): Promise<Assignment> =>
    requestJoin(node, headId, await signCapabilityReport(key, report))

  it('answers a join with the assignment onJoin made', async () => {
    onJoin = async (report, peer) => {
      joins.push({ report, peer: peer.toString() })
      return assignmentFor(headId.toString(), { engineArgs: { parallel: 4, gpuMemoryUtilization: 0.81 } })
    }
    const report = reportFor(node.peerId.toString())
    const assignment = await join(report)
    expect(assignment).toEqual(
      assignmentFor(headId.toString(), { engineArgs: { parallel: 4, gpuMemoryUtilization: 0.81 } }),
    )
    expect(joins.at(-1)).toEqual({ report, peer: node.peerId.toString() })
  })

  it('passes a refusal to the node as JoinRefusedError with its code', async () => {
    onJoin = async () => {
      throw new JoinRefusedError('no_assignment', 'no model of region eu-north fits this node')
    }
    const err = await rejection(join(reportFor(node.peerId.toString())))
    expect(err.name).toBe('JoinRefusedError')
    expect((err as JoinRefusedError).code).toBe('no_assignment')
    expect(err.message).toBe('no model of region eu-north fits this node')
  })

  it('refuses reports for another region, stale ones and ones signed by another key, before onJoin', async () => {
    const before = joins.length
    onJoin = async (report, peer) => {
      joins.push({ report, peer: peer.toString() })
      return assignmentFor(headId.toString())
    }
    const id = node.peerId.toString()
    const codeOf = async (p: Promise<unknown>): Promise<string> => {
      const err = await rejection(p)
      expect(err.name).toBe('JoinRefusedError')
      return (err as JoinRefusedError).code
    }
    expect(await codeOf(join(reportFor(id, { region: 'us-east' })))).toBe('region_mismatch')
    expect(await codeOf(join(reportFor(id, { issuedAt: now - 10 * minute })))).toBe('stale_report')

    // another peer's report, correctly signed by that peer, replayed by this node
    const stranger = await generateKeyPair('Ed25519')
    expect(await codeOf(join(reportFor(peerIdFromPrivateKey(stranger).toString()), stranger))).toBe(
      'bad_report',
    )
    // this node's report, signed by someone else's key
    expect(await codeOf(requestJoin(node, headId, await forge(stranger, reportFor(id))))).toBe('bad_report')

    expect(joins.length).toBe(before)
    expect(badRequests.slice(-4)).toEqual([
      'CapabilityReportRegionError',
      'CapabilityReportStaleError',
      'CapabilityReportPeerMismatchError',
      'CapabilityReportSignatureError',
    ])
  })

  it('answers internal_error when onJoin fails, without the details', async () => {
    onJoin = async () => {
      throw new Error('database on fire at /var/lib/head')
    }
    const err = (await rejection(join(reportFor(node.peerId.toString())))) as JoinRefusedError
    expect(err.code).toBe('internal_error')
    expect(err.message).not.toMatch(/database/)
  })

  it('takes a leave from the connection peer', async () => {
    await requestLeave(node, headId)
    expect(leaves).toEqual([node.peerId.toString()])
  })

  it('resets garbage, oversized and malformed requests, and keeps serving', async () => {
    const before = badRequests.length
    const open = (): Promise<Stream> => node.dialProtocol(headId, JOIN_PROTOCOL)

    const garbage = await open()
    garbage.send(new Uint8Array([3, 0xff, 0xfe, 0xfd]))
    const g = await drain(garbage)
    expect(g.bytes).toBe(0)
    expect(g.error?.name).toMatch(/Reset|Abort/)

    // a varint length of 1 MiB, far past the 16 KiB request limit
    const big = await open()
    big.send(new Uint8Array([0x80, 0x80, 0x40]))
    big.send(new Uint8Array(4096))
    const b = await drain(big)
    expect(b.bytes).toBe(0)
    expect(b.error?.name).toMatch(/Reset|Abort/)

    for (const value of [
      { v: 1 },
      { v: 2, leave: true },
      { v: 1, leave: false },
      { v: 1, join: 'report' },
      [1],
    ]) {
      const body = encode(value)
      const wrong = await open()
      wrong.send(new Uint8Array([body.byteLength, ...body]))
      const w = await drain(wrong)
      expect(w.bytes, JSON.stringify(value)).toBe(0)
      expect(w.error?.name, JSON.stringify(value)).toMatch(/Reset|Abort/)
    }
    expect(badRequests.length - before).toBe(7)

    onJoin = async () => assignmentFor(headId.toString())
    expect((await join(reportFor(node.peerId.toString()))).model).toBe('garage-tiny')
  })
})

describe('a join peer that never speaks', () => {
  const mesh = new TestMesh()
  afterAll(() => mesh.cleanup())

  it('is reset after the exchange timeout', async () => {
    const head = await mesh.node([])
    const rejected: string[] = []
    await handleJoinProtocol(head, {
      region: 'eu-north',
      timeoutMs: 300,
      onJoin: async () => {
        throw new Error('unreachable')
      },
      onLeave: async () => {},
      onBadRequest: (err) => rejected.push(err.name),
    })
    const client = await mesh.node([])
    const silent = await client.dialProtocol(head.getMultiaddrs()[0]!, JOIN_PROTOCOL)
    const result = await drain(silent)
    expect(result.bytes).toBe(0)
    expect(result.error?.name).toMatch(/Reset|Abort/)
    expect(rejected[0]).toMatch(/Abort|Timeout/)
  })
})

describe('a hostile head', () => {
  const mesh = new TestMesh()
  let fake: MeshNode
  let node: MeshNode
  let nodeKey: PrivateKey
  let reply: (requestBytes: Uint8Array, fake: string) => Uint8Array

  beforeAll(async () => {
    fake = await mesh.node([])
    await fake.handle(JOIN_PROTOCOL, async (stream: Stream) => {
      const lp = lpStream(stream)
      const request = await lp.read()
      await lp.write(reply(request.subarray(), fake.peerId.toString()))
      await stream.close()
    })
    ;({ node, key: nodeKey } = await nodeWithKey(mesh))
    await node.dial(fake.getMultiaddrs()[0]!)
  })
  afterAll(() => mesh.cleanup())

  it('cannot make the node run a malformed assignment or one naming another head', async () => {
    const signed = await signCapabilityReport(nodeKey, reportFor(node.peerId.toString()))
    const cases: Array<(head: string) => unknown> = [
      (h) => ({ v: 1, ok: true, assignment: assignmentFor(h, { telemetryIntervalMs: 0 }) }),
      (h) => ({ v: 1, ok: true, assignment: { ...assignmentFor(h), extra: true } }),
      () => ({ v: 1, ok: true, assignment: assignmentFor('12D3KooWSomebodyElse') }),
      () => ({ v: 1, ok: true }),
      () => ({ v: 1, ok: false, code: 'NOT snake', message: 'x' }),
      () => ({ v: 1, ok: false, code: 'no_assignment', message: 'm'.repeat(10_000) }),
      () => 'hello',
    ]
    for (const make of cases) {
      reply = (_req, h) => encodeCanonical(make(h))
      const err = await rejection(requestJoin(node, fake.peerId, signed))
      expect(err.name, JSON.stringify(make('H')).slice(0, 80)).toBe('JoinProtocolError')
    }
    // an answer past the 16 KiB response limit never reaches the parser
    reply = () => new Uint8Array(20 * 1024)
    const err = await rejection(requestJoin(node, fake.peerId, signed))
    expect(err.name).toBe('InvalidDataLengthError')
  })
})
