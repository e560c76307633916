import { peerIdFromString } from '@libp2p/peer-id'
import { encode } from 'cborg'
import { afterAll, describe, expect, it } from 'vitest'
import { verifyRegionCertificate } from '../../mesh/certificate.ts'
import { REGION_PROTOCOL } from '../../mesh/protocols.ts'
import { fetchRegionCertificate, handleRegionProtocol } from '../../mesh/region-protocol.ts'
import { dialAddr, TestMesh } from '../helpers/mesh.ts'

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

describe('/garage/region/1.0.0 under hostile input', () => {
  const mesh = new TestMesh()
  afterAll(() => mesh.cleanup())

  it('resets the stream on garbage and oversized messages, and keeps serving', async () => {
    const authority = await mesh.authority()
    const head = await mesh.bootstrap(authority, 'eu-north')
    const client = await mesh.node([dialAddr(head)])
    const headId = peerIdFromString(head.peerId.toString())

    // garbage: a length prefix announcing 3 bytes of non-CBOR
    const garbage = await client.dialProtocol(headId, REGION_PROTOCOL)
    garbage.send(new Uint8Array([3, 0xff, 0xfe, 0xfd]))
    const g = await drain(garbage)
    expect(g.bytes).toBe(0)
    expect(g.error?.name).toMatch(/Reset|Abort/)

    // oversized: a varint length of 1 MiB, far past the 512-byte request limit
    const big = await client.dialProtocol(headId, REGION_PROTOCOL)
    big.send(new Uint8Array([0x80, 0x80, 0x40]))
    big.send(new Uint8Array(4096))
    const b = await drain(big)
    expect(b.bytes).toBe(0)
    expect(b.error?.name).toMatch(/Reset|Abort/)

    // well-formed canonical CBOR that is not the request map { v: 1 }
    for (const value of [{ v: 2 }, { v: 1, extra: true }, [1], 'v1']) {
      const body = encode(value)
      const wrong = await client.dialProtocol(headId, REGION_PROTOCOL)
      wrong.send(new Uint8Array([body.byteLength, ...body]))
      const w = await drain(wrong)
      expect(w.bytes, JSON.stringify(value)).toBe(0)
      expect(w.error?.name, JSON.stringify(value)).toMatch(/Reset|Abort/)
    }

    // the head still serves well-formed requests
    const bytes = await fetchRegionCertificate(client, headId)
    const cert = await verifyRegionCertificate(bytes, { authority: authority.id, head: headId })
    expect(cert.region).toBe('eu-north')

    const metrics = await (await fetch(`${head.http.url}/metrics`)).text()
    expect(metrics).toMatch(/garage_bootstrap_region_requests_total\{outcome="rejected"\} 6/)
    expect(metrics).toMatch(/garage_bootstrap_region_requests_total\{outcome="served"\} 1/)
  })

  it('resets a peer that opens a stream and never speaks, after the exchange timeout', async () => {
    const server = await mesh.node([])
    const rejected: Error[] = []
    await handleRegionProtocol(server, {
      certificate: () => new Uint8Array(),
      timeoutMs: 300,
      onBadRequest: (e) => rejected.push(e),
    })
    const client = await mesh.node([])
    const silent = await client.dialProtocol(server.getMultiaddrs()[0]!, REGION_PROTOCOL)
    const started = Date.now()
    const result = await drain(silent)
    expect(result.bytes).toBe(0)
    expect(Date.now() - started).toBeLessThan(5_000)
    expect(rejected[0]?.name).toMatch(/Abort|Timeout/)
  })
})
