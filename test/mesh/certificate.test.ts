import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { decode, encode } from 'cborg'
import { beforeAll, describe, expect, it } from 'vitest'
import {
  decodeRegionCertificate,
  issueRegionCertificate,
  RegionCertificateExpiredError,
  RegionCertificateHeadMismatchError,
  RegionCertificateMalformedError,
  RegionCertificateNotYetValidError,
  RegionCertificateSignatureError,
  RegionCertificateVersionError,
  RegionCertificateWrongRegionError,
  RegionCertificateWrongSignerError,
  verifyRegionCertificate,
} from '../../mesh/certificate.ts'

const day = 86_400_000

describe('region certificates', () => {
  let authority: PrivateKey
  let authorityId: string
  let other: PrivateKey
  let head: string

  beforeAll(async () => {
    authority = await generateKeyPair('Ed25519')
    authorityId = peerIdFromPrivateKey(authority).toString()
    other = await generateKeyPair('Ed25519')
    head = peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString()
  })

  const issue = (extra: Partial<Parameters<typeof issueRegionCertificate>[1]> = {}, key = authority) =>
    issueRegionCertificate(key, {
      region: 'eu-north',
      head,
      addrs: ['/dns4/eu-north.example.net/tcp/4001'],
      ttlMs: 30 * day,
      ...extra,
    })

  it('round-trips every field and verifies against the pinned authority', async () => {
    const notBefore = new Date('2026-11-01T00:00:00Z')
    const bytes = await issue({ rayTrusted: true, notBefore })
    const cert = await verifyRegionCertificate(bytes, {
      authority: authorityId,
      region: 'eu-north',
      head,
      now: new Date('2026-11-10T00:00:00Z'),
    })
    expect(cert).toEqual({
      version: 1,
      region: 'eu-north',
      head,
      addrs: ['/dns4/eu-north.example.net/tcp/4001'],
      rayTrusted: true,
      notBefore,
      expiresAt: new Date(notBefore.getTime() + 30 * day),
      issuer: authorityId,
    })
  })

  it('encodes canonically: the same certificate gives the same bytes', async () => {
    const notBefore = new Date('2026-11-01T00:00:00Z')
    const a = await issue({ notBefore })
    const b = await issue({ notBefore })
    expect(Buffer.from(a).equals(Buffer.from(b))).toBe(true)
  })

  it('rejects a certificate from another signer', async () => {
    const bytes = await issue({}, other)
    await expect(verifyRegionCertificate(bytes, { authority: authorityId })).rejects.toThrow(
      RegionCertificateWrongSignerError,
    )
  })

  it('rejects an expired certificate, and one not yet valid', async () => {
    const bytes = await issue({ notBefore: new Date('2026-01-01T00:00:00Z'), ttlMs: day })
    await expect(
      verifyRegionCertificate(bytes, { authority: authorityId, now: new Date('2026-01-03T00:00:00Z') }),
    ).rejects.toThrow(RegionCertificateExpiredError)
    await expect(
      verifyRegionCertificate(bytes, { authority: authorityId, now: new Date('2025-12-31T00:00:00Z') }),
    ).rejects.toThrow(RegionCertificateNotYetValidError)
    // inside the window, give or take the tolerated clock skew
    await expect(
      verifyRegionCertificate(bytes, { authority: authorityId, now: new Date('2026-01-01T12:00:00Z') }),
    ).resolves.toBeTruthy()
  })

  it('rejects a certificate for another region, and one served by another peer', async () => {
    const bytes = await issue()
    await expect(
      verifyRegionCertificate(bytes, { authority: authorityId, region: 'us-east' }),
    ).rejects.toThrow(RegionCertificateWrongRegionError)
    const impostor = peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString()
    await expect(verifyRegionCertificate(bytes, { authority: authorityId, head: impostor })).rejects.toThrow(
      RegionCertificateHeadMismatchError,
    )
  })

  it('rejects tampered bytes: a changed field under the original signature', async () => {
    const bytes = await issue()
    const env = decode(bytes) as { payload: Uint8Array; sig: Uint8Array }
    const payload = decode(env.payload) as Record<string, unknown>
    const forged = encode({ payload: encode({ ...payload, region: 'us-east' }), sig: env.sig })
    await expect(verifyRegionCertificate(forged, { authority: authorityId })).rejects.toThrow(
      RegionCertificateSignatureError,
    )
    const longer = encode({
      payload: encode({ ...payload, exp: (payload.exp as number) + 86_400 * 365 }),
      sig: env.sig,
    })
    await expect(verifyRegionCertificate(longer, { authority: authorityId })).rejects.toThrow(
      RegionCertificateSignatureError,
    )
  })

  it('rejects a flipped byte anywhere with a named certificate error', async () => {
    const bytes = await issue()
    for (let i = 0; i < bytes.byteLength; i++) {
      const copy = bytes.slice()
      copy[i] = (copy[i] as number) ^ 0x01
      const err = await verifyRegionCertificate(copy, { authority: authorityId }).then(
        () => null,
        (e: Error) => e,
      )
      expect(err, `byte ${i}`).not.toBeNull()
      expect(err?.name, `byte ${i}`).toMatch(/^RegionCertificate\w+Error$/)
    }
  })

  it('rejects garbage, oversized, non-canonical and future-version certificates', async () => {
    await expect(
      verifyRegionCertificate(new Uint8Array([1, 2, 3]), { authority: authorityId }),
    ).rejects.toThrow(RegionCertificateMalformedError)
    await expect(
      verifyRegionCertificate(new Uint8Array(64 * 1024), { authority: authorityId }),
    ).rejects.toThrow(RegionCertificateMalformedError)
    const bytes = await issue()
    const env = decode(bytes) as { payload: Uint8Array; sig: Uint8Array }
    // same map with the keys out of canonical order
    // (canonical order is length-first: "sig" before "payload")
    const reordered = new Uint8Array([
      0xa2,
      0x67,
      ...new TextEncoder().encode('payload'),
      ...encode(env.payload),
      0x63,
      ...new TextEncoder().encode('sig'),
      ...encode(env.sig),
    ])
    expect(decode(reordered)).toEqual(env)
    await expect(verifyRegionCertificate(reordered, { authority: authorityId })).rejects.toThrow(
      RegionCertificateMalformedError,
    )
    const payload = decode(env.payload) as Record<string, unknown>
    const v2 = encode({ payload: encode({ ...payload, v: 2 }), sig: env.sig })
    await expect(verifyRegionCertificate(v2, { authority: authorityId })).rejects.toThrow(
      RegionCertificateVersionError,
    )
  })

  it('refuses to issue a certificate with bad fields', async () => {
    await expect(issue({ region: 'EU North' })).rejects.toThrow(RegionCertificateMalformedError)
    await expect(issue({ head: 'not-a-peer-id' })).rejects.toThrow(RegionCertificateMalformedError)
    await expect(issue({ addrs: ['not a multiaddr'] })).rejects.toThrow(RegionCertificateMalformedError)
    await expect(issue({ ttlMs: 0 })).rejects.toThrow(RegionCertificateMalformedError)
  })

  it('decodes for display without verifying', async () => {
    const bytes = await issue({}, other)
    expect(decodeRegionCertificate(bytes).issuer).toBe(peerIdFromPrivateKey(other).toString())
  })
})
