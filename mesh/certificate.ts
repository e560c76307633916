import type { PeerId, PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey, peerIdFromString } from '@libp2p/peer-id'
import { multiaddr } from '@multiformats/multiaddr'
import { decodeCanonical, encodeCanonical, printable } from '../core/cbor.ts'
import { isPlainObject } from '../core/guards.ts'

/**
 * Region certificates: the federation authority's statement that `head` is the regional head of
 * `region`, reachable at `addrs`, between `notBefore` and `expiresAt`. Wire format in docs/mesh.md.
 */

export const certificateFormatVersion = 1
export const certificateMaxBytes = 8 * 1024
export const maxCertificateAddrs = 16
export const maxAddrLength = 256
/** Signatures cover this prefix and the payload, so no other Garage signature can pass as one. */
const signingDomain = new TextEncoder().encode('garage/region-certificate/v1\n')
/** Clocks on gamers' PCs drift; accept certificates this far outside their window. */
export const defaultClockSkewMs = 60_000

/** Region certificates are renewed; a mistyped TTL must not mint a near-eternal one. */
export const maxCertificateTtlMs = 2 * 365 * 86_400_000

export const regionNamePattern = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/

export const CertificateFlags = Object.freeze({ rayTrusted: 1 })

export interface RegionCertificate {
  version: number
  region: string
  /** PeerId of the regional head this certificate vouches for. */
  head: string
  addrs: string[]
  rayTrusted: boolean
  notBefore: Date
  expiresAt: Date
  /** PeerId form of the authority public key that signed it. */
  issuer: string
}

/** Base of the named certificate errors; `name` is the subclass's, `code` is stable for logs and APIs. */
export class RegionCertificateError extends Error {
  readonly code: string = 'CERT_INVALID'
  constructor(message: string) {
    super(message)
    this.name = new.target.name
  }
}
export class RegionCertificateMalformedError extends RegionCertificateError {
  override readonly code = 'CERT_MALFORMED'
}
export class RegionCertificateVersionError extends RegionCertificateError {
  override readonly code = 'CERT_VERSION'
}
export class RegionCertificateWrongSignerError extends RegionCertificateError {
  override readonly code = 'CERT_WRONG_SIGNER'
}
export class RegionCertificateSignatureError extends RegionCertificateError {
  override readonly code = 'CERT_BAD_SIGNATURE'
}
export class RegionCertificateExpiredError extends RegionCertificateError {
  override readonly code = 'CERT_EXPIRED'
}
export class RegionCertificateNotYetValidError extends RegionCertificateError {
  override readonly code = 'CERT_NOT_YET_VALID'
}
export class RegionCertificateWrongRegionError extends RegionCertificateError {
  override readonly code = 'CERT_WRONG_REGION'
}
export class RegionCertificateHeadMismatchError extends RegionCertificateError {
  override readonly code = 'CERT_HEAD_MISMATCH'
}

export interface IssueCertificateInit {
  region: string
  head: string
  addrs: string[]
  rayTrusted?: boolean
  notBefore?: Date
  ttlMs: number
}

function toSeconds(d: Date): number {
  return Math.floor(d.getTime() / 1000)
}

function validateFields(c: Omit<RegionCertificate, 'version' | 'issuer'>): string | undefined {
  if (!regionNamePattern.test(c.region))
    return `region ${JSON.stringify(c.region)} is not a lowercase name of 1-63 letters, digits and dashes`
  try {
    peerIdFromString(c.head)
  } catch {
    return `head ${JSON.stringify(c.head)} is not a PeerId`
  }
  if (c.addrs.length > maxCertificateAddrs) return `more than ${maxCertificateAddrs} addresses`
  for (const a of c.addrs) {
    if (a.length > maxAddrLength) return `address longer than ${maxAddrLength} characters`
    try {
      multiaddr(a)
    } catch {
      return `address ${JSON.stringify(a)} is not a multiaddr`
    }
  }
  if (!Number.isFinite(c.notBefore.getTime()) || !Number.isFinite(c.expiresAt.getTime()))
    return 'not-before and expiry must be real dates'
  if (c.expiresAt.getTime() <= c.notBefore.getTime()) return 'expiry is not after not-before'
  return undefined
}

/** Signs a certificate with the authority key; returns its wire bytes. */
export async function issueRegionCertificate(
  authority: PrivateKey,
  init: IssueCertificateInit,
): Promise<Uint8Array> {
  const notBefore = init.notBefore ?? new Date()
  if (!(Number.isFinite(init.ttlMs) && init.ttlMs > 0 && init.ttlMs <= maxCertificateTtlMs)) {
    throw new RegionCertificateMalformedError(
      `cannot issue certificate: the validity must be more than 0 and at most ${maxCertificateTtlMs / 86_400_000} days`,
    )
  }
  const fields = {
    region: init.region,
    head: init.head,
    addrs: init.addrs,
    rayTrusted: init.rayTrusted ?? false,
    notBefore,
    expiresAt: new Date(notBefore.getTime() + init.ttlMs),
  }
  const problem = validateFields(fields)
  if (problem != null) throw new RegionCertificateMalformedError(`cannot issue certificate: ${problem}`)
  const payload = encodeCanonical({
    v: certificateFormatVersion,
    region: fields.region,
    head: fields.head,
    addrs: fields.addrs,
    flags: fields.rayTrusted ? CertificateFlags.rayTrusted : 0,
    nbf: toSeconds(fields.notBefore),
    exp: toSeconds(fields.expiresAt),
    iss: peerIdFromPrivateKey(authority).toString(),
  })
  const signature = await authority.sign(concat(signingDomain, payload))
  return encodeCanonical({ payload, sig: signature })
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.byteLength + b.byteLength)
  out.set(a, 0)
  out.set(b, a.byteLength)
  return out
}

interface Envelope {
  payload: Uint8Array
  sig: Uint8Array
}

function decodeEnvelope(bytes: Uint8Array): Envelope {
  if (bytes.byteLength > certificateMaxBytes) {
    throw new RegionCertificateMalformedError(
      `certificate is ${bytes.byteLength} bytes, limit ${certificateMaxBytes}`,
    )
  }
  let env: unknown
  try {
    env = decodeCanonical(bytes)
  } catch (err) {
    throw new RegionCertificateMalformedError(`certificate envelope: ${(err as Error).message}`)
  }
  if (!isPlainObject(env) || Object.keys(env).length !== 2) {
    throw new RegionCertificateMalformedError('certificate envelope must be a map of payload and sig')
  }
  const { payload, sig } = env
  if (!(payload instanceof Uint8Array) || !(sig instanceof Uint8Array)) {
    throw new RegionCertificateMalformedError('certificate envelope payload and sig must be byte strings')
  }
  return { payload, sig }
}

/** Reads a certificate without checking its signature or validity: for display only. */
export function decodeRegionCertificate(bytes: Uint8Array): RegionCertificate {
  const { payload } = decodeEnvelope(bytes)
  let p: unknown
  try {
    p = decodeCanonical(payload)
  } catch (err) {
    throw new RegionCertificateMalformedError(`certificate payload: ${(err as Error).message}`)
  }
  if (!isPlainObject(p)) throw new RegionCertificateMalformedError('certificate payload must be a map')
  if (p.v !== certificateFormatVersion) {
    throw new RegionCertificateVersionError(
      `certificate format version ${printable(p.v)} is not supported (want ${certificateFormatVersion})`,
    )
  }
  const keys = Object.keys(p).sort().join(',')
  if (keys !== 'addrs,exp,flags,head,iss,nbf,region,v') {
    throw new RegionCertificateMalformedError(`certificate payload has fields ${keys}`)
  }
  const { region, head, addrs, flags, nbf, exp, iss } = p
  if (typeof region !== 'string' || typeof head !== 'string' || typeof iss !== 'string') {
    throw new RegionCertificateMalformedError('certificate region, head and iss must be strings')
  }
  if (!Array.isArray(addrs) || !addrs.every((a): a is string => typeof a === 'string')) {
    throw new RegionCertificateMalformedError('certificate addrs must be a list of strings')
  }
  for (const n of [flags, nbf, exp]) {
    if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) {
      throw new RegionCertificateMalformedError('certificate flags, nbf and exp must be unsigned integers')
    }
  }
  const cert: RegionCertificate = {
    version: certificateFormatVersion,
    region,
    head,
    addrs,
    rayTrusted: ((flags as number) & CertificateFlags.rayTrusted) !== 0,
    notBefore: new Date((nbf as number) * 1000),
    expiresAt: new Date((exp as number) * 1000),
    issuer: iss,
  }
  const problem = validateFields(cert)
  if (problem != null) throw new RegionCertificateMalformedError(`certificate: ${problem}`)
  return cert
}

export interface VerifyCertificateOptions {
  /** The pinned federation authority: its PeerId string or PeerId. */
  authority: string | PeerId
  /** Reject a certificate for any other region. */
  region?: string
  /** Reject a certificate that names another head (the peer that served it). */
  head?: string | PeerId
  now?: Date
  clockSkewMs?: number
}

/**
 * Verifies a certificate against the pinned authority key. Throws a named RegionCertificate*Error
 * for each way it can be wrong; returns the certificate when all is well.
 */
export async function verifyRegionCertificate(
  bytes: Uint8Array,
  options: VerifyCertificateOptions,
): Promise<RegionCertificate> {
  const authority =
    typeof options.authority === 'string' ? peerIdFromString(options.authority) : options.authority
  if (authority.publicKey == null)
    throw new TypeError('the pinned authority must be an Ed25519 PeerId that embeds its public key')
  const cert = decodeRegionCertificate(bytes)
  if (cert.issuer !== authority.toString()) {
    throw new RegionCertificateWrongSignerError(
      `certificate is signed by ${cert.issuer}, not the pinned authority ${authority.toString()}`,
    )
  }
  const { payload, sig } = decodeEnvelope(bytes)
  let ok = false
  try {
    ok = await authority.publicKey.verify(concat(signingDomain, payload), sig)
  } catch {
    ok = false
  }
  if (!ok)
    throw new RegionCertificateSignatureError(
      'certificate signature does not verify: the bytes were altered or forged',
    )
  const now = (options.now ?? new Date()).getTime()
  const skew = options.clockSkewMs ?? defaultClockSkewMs
  if (now - skew >= cert.expiresAt.getTime()) {
    throw new RegionCertificateExpiredError(
      `certificate for ${cert.region} expired at ${cert.expiresAt.toISOString()}`,
    )
  }
  if (now + skew < cert.notBefore.getTime()) {
    throw new RegionCertificateNotYetValidError(
      `certificate for ${cert.region} is not valid before ${cert.notBefore.toISOString()}`,
    )
  }
  if (options.region != null && cert.region !== options.region) {
    throw new RegionCertificateWrongRegionError(
      `certificate is for region ${cert.region}, expected ${options.region}`,
    )
  }
  if (options.head != null && cert.head !== options.head.toString()) {
    throw new RegionCertificateHeadMismatchError(
      `certificate names head ${cert.head}, but ${options.head.toString()} served it`,
    )
  }
  return cert
}
