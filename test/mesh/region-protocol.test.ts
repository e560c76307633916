import { peerIdFromString } from '@libp2p/peer-id'
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
    expect(garbage.status).not.toBe('open')

    // oversized: a varint length of 1 MiB, far past the 512-byte request limit
    const big = await client.dialProtocol(headId, REGION_PROTOCOL)
    big.send(new Uint8Array([0x80, 0x80, 0x40]))
    big.send(new Uint8Array(4096))
    const b = await drain(big)
    expect(b.bytes).toBe(0)
    expect(big.status).not.toBe('open')

    // valid CBOR that is not the request map
    const wrong = await client.dialProtocol(headId, REGION_PROTOCOL)
    wrong.send(new Uint8Array([2, 0x82, 0x01]))
    expect((await drain(wrong)).bytes).toBe(0)

    // the head still serves well-formed requests
    const bytes = await fetchRegionCertificate(client, headId)
    const cert = await verifyRegionCertificate(bytes, { authority: authority.id, head: headId })
    expect(cert.region).toBe('eu-north')

    const metrics = await (await fetch(`${head.http.url}/metrics`)).text()
    expect(metrics).toMatch(/garage_bootstrap_region_requests_total\{outcome="rejected"\} 3/)
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
