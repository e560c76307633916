import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PeerId, PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import fc from 'fast-check'
import { beforeAll, describe, expect, it } from 'vitest'
import { CborDecodeError, decodeCanonical, encodeCanonical } from '../../core/cbor.ts'
import {
  CapabilityReportError,
  capabilityReportMaxBytes,
  capabilityReportSigningDomain,
  maxReportGpus,
  maxReportStringLength,
  parseCapabilityReport,
  signCapabilityReport,
  verifyCapabilityReport,
} from '../../mesh/capability-report.ts'
import {
  certificateMaxBytes,
  decodeRegionCertificate,
  type IssueCertificateInit,
  issueRegionCertificate,
  maxAddrLength,
  maxCertificateAddrs,
  maxCertificateTtlMs,
  RegionCertificateError,
  regionNamePattern,
  verifyRegionCertificate,
} from '../../mesh/certificate.ts'
import {
  assignmentTelemetryIntervalRangeMs,
  JoinProtocolError,
  maxModelNameLength,
  maxModelSourceLength,
  maxRayAddressLength,
  maxRayTokenLength,
  parseAssignment,
} from '../../mesh/join-protocol.ts'
import type { Assignment, CapabilityReport, TelemetryReport } from '../../mesh/region-messages.ts'
import {
  maxTelemetryModelLength,
  parseTelemetryReport,
  TelemetryProtocolError,
} from '../../mesh/telemetry-protocol.ts'
import {
  announceFuzz,
  cborValue,
  concatBytes,
  fuzzedMap,
  fuzzParams,
  fuzzTimeoutMs,
  hugeLengths,
  mutated,
} from './fuzz.ts'

/** Runs `fn`; returns what it threw (null when it returned). */
async function thrown(fn: () => unknown): Promise<unknown> {
  try {
    await fn()
    return null
  } catch (err) {
    return err
  }
}

function boundedText(min: number, max: number): fc.Arbitrary<string> {
  return fc.string({ unit: 'grapheme', minLength: min, maxLength: max }).filter((s) => s.length <= max)
}

const regionName = fc.stringMatching(regionNamePattern)

/** CBOR heads (major type, 4- and 8-byte lengths) that claim near 2^32 or 2^53 items or bytes. */
function hugeCborHead(major: number, n: number): Uint8Array {
  if (n < 2 ** 32)
    return Uint8Array.from([(major << 5) | 26, n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255])
  const hi = Math.floor(n / 2 ** 32)
  return Uint8Array.from([
    (major << 5) | 27,
    (hi >>> 24) & 255,
    (hi >>> 16) & 255,
    (hi >>> 8) & 255,
    hi & 255,
    n >>> 24,
    (n >>> 16) & 255,
    (n >>> 8) & 255,
    n & 255,
  ])
}

/** Containers around the claim, so it sits where a field would: [x], {"a": x}, [0, x]. */
const cborContainer = fc.constantFrom([0x81], [0xa1, 0x61, 0x61], [0x82, 0x00]).map((b) => Uint8Array.from(b))

const hugeClaim: fc.Arbitrary<Uint8Array> = fc
  .tuple(
    fc.array(cborContainer, { maxLength: 3 }),
    fc.constantFrom(2, 3, 4, 5),
    hugeLengths(16 * 1024),
    fc.uint8Array({ maxLength: 64 }),
  )
  .map(([outer, major, n, tail]) => concatBytes([...outer, hugeCborHead(major, n), tail]))

/** Arrays or maps nested up to 16 K deep (a 16 KiB message holds that many): recursion's limit. */
const deepCbor: fc.Arbitrary<Uint8Array> = fc
  .tuple(cborContainer, fc.integer({ min: 1, max: 16_000 }))
  .map(([open, depth]) => concatBytes([...Array.from({ length: depth }, () => open), Uint8Array.of(0)]))

describe('fuzz: canonical CBOR (core/cbor.ts)', { timeout: fuzzTimeoutMs }, () => {
  beforeAll(() => announceFuzz('canonical CBOR'))

  it('decodes any bytes to a value or a CborDecodeError, and accepts only the canonical form', () => {
    fc.assert(
      fc.property(
        fc.oneof(fc.uint8Array({ maxLength: 256 }), mutated(cborValue.map(encodeCanonical))),
        (bytes) => {
          let value: unknown
          try {
            value = decodeCanonical(bytes)
          } catch (err) {
            expect(err).toBeInstanceOf(CborDecodeError)
            return
          }
          expect(Buffer.from(encodeCanonical(value)).equals(Buffer.from(bytes))).toBe(true)
        },
      ),
      fuzzParams(2_000),
    )
  })

  // Regression: maps nested about 2 750 to 6 500 deep decoded, then re-encoding them ran out of stack
  // and a RangeError escaped decodeCanonical.
  it('regression: names maps nested thousands deep with CborDecodeError', () => {
    // Every depth a 16 KiB message can hold; where the stack gives out varies, the window is wide.
    for (let depth = 250; depth <= 5_400; depth += 50) {
      const nestedMaps = concatBytes([
        ...Array.from({ length: depth }, () => Uint8Array.of(0xa1, 0x61, 0x61)),
        Uint8Array.of(0),
      ])
      try {
        decodeCanonical(nestedMaps)
      } catch (err) {
        expect(err, `maps nested ${depth} deep`).toBeInstanceOf(CborDecodeError)
      }
    }
  })

  it('names CBOR nested as deep as a message can hold in every decoder of signed peer input', async () => {
    const peer = peerIdFromPrivateKey(await generateKeyPair('Ed25519'))
    await fc.assert(
      fc.asyncProperty(deepCbor, async (deep) => {
        const certificate = encodeCanonical({ payload: deep, sig: new Uint8Array(64) })
        expect(
          await thrown(() => verifyRegionCertificate(certificate, { authority: peer.toString() })),
        ).toBeInstanceOf(RegionCertificateError)
        const report = encodeCanonical({ v: 1, report: deep, sig: new Uint8Array(64) })
        expect(
          await thrown(() => verifyCapabilityReport(report, { remotePeer: peer, region: 'eu-north' })),
        ).toBeInstanceOf(CapabilityReportError)
      }),
      fuzzParams(100, 5_000),
    )
  })

  it('round-trips every value a peer can send', () => {
    fc.assert(
      fc.property(cborValue, (value) => {
        expect(decodeCanonical(encodeCanonical(value))).toEqual(value)
      }),
      fuzzParams(1_000),
    )
  })

  it('refuses lengths near 2^32 and 2^53 without allocating them', () => {
    const before = process.memoryUsage().arrayBuffers
    fc.assert(
      fc.property(hugeClaim, (bytes) => {
        expect(() => decodeCanonical(bytes)).toThrow(CborDecodeError)
      }),
      fuzzParams(500),
    )
    // A decoder that sized a buffer from the claim would have taken gigabytes here.
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(64 * 1024 * 1024)
  })
})

type CertInit = Required<IssueCertificateInit>

describe('fuzz: region certificates (mesh/certificate.ts)', { timeout: fuzzTimeoutMs }, () => {
  const signingDomain = new TextEncoder().encode('garage/region-certificate/v1\n')
  let authority: PrivateKey
  let authorityId: string
  let other: PrivateKey
  let heads: string[]
  let validInit: fc.Arbitrary<CertInit>

  const octet = fc.integer({ min: 0, max: 255 })
  const port = fc.integer({ min: 1, max: 65_535 })
  const multiaddrText = fc.oneof(
    fc.tuple(octet, octet, octet, octet, port).map(([a, b, c, d, p]) => `/ip4/${a}.${b}.${c}.${d}/tcp/${p}`),
    fc
      .tuple(fc.stringMatching(/^[a-z][a-z0-9-]{0,30}(\.[a-z]{2,6}){1,3}$/), port)
      .map(([name, p]) => `/dns4/${name}/tcp/${p}`),
    port.map((p) => `/ip6/::1/tcp/${p}/ws`),
  )

  beforeAll(async () => {
    announceFuzz('region certificates')
    authority = await generateKeyPair('Ed25519')
    authorityId = peerIdFromPrivateKey(authority).toString()
    other = await generateKeyPair('Ed25519')
    heads = await Promise.all(
      [1, 2, 3].map(async () => peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString()),
    )
    validInit = fc.record({
      region: regionName,
      head: fc.constantFrom(...heads),
      addrs: fc.array(multiaddrText, { maxLength: maxCertificateAddrs }),
      rayTrusted: fc.boolean(),
      // Whole seconds: the wire carries seconds.
      notBefore: fc.integer({ min: 0, max: 4_000_000_000 }).map((s) => new Date(s * 1000)),
      ttlMs: fc.integer({ min: 1, max: maxCertificateTtlMs / 1000 }).map((s) => s * 1000),
    })
  })

  it('round-trips every valid certificate through issue, decode and verify', async () => {
    await fc.assert(
      fc.asyncProperty(validInit, fc.double({ min: 0, max: 1, noNaN: true }), async (init, at) => {
        const bytes = await issueRegionCertificate(authority, init)
        expect(bytes.byteLength).toBeLessThanOrEqual(certificateMaxBytes)
        const expected = {
          version: 1,
          region: init.region,
          head: init.head,
          addrs: init.addrs,
          rayTrusted: init.rayTrusted,
          notBefore: init.notBefore,
          expiresAt: new Date(init.notBefore.getTime() + init.ttlMs),
          issuer: authorityId,
        }
        expect(decodeRegionCertificate(bytes)).toEqual(expected)
        // Any moment inside the window verifies.
        const now = new Date(init.notBefore.getTime() + Math.floor(at * (init.ttlMs - 1)))
        await expect(
          verifyRegionCertificate(bytes, {
            authority: authorityId,
            region: init.region,
            head: init.head,
            now,
          }),
        ).resolves.toEqual(expected)
      }),
      fuzzParams(200, 2_000),
    )
  })

  it('rejects every mutation of a valid certificate with a named certificate error', async () => {
    const now = new Date('2026-11-24T12:00:00Z')
    const base: CertInit = {
      region: 'eu-north',
      head: '',
      addrs: ['/dns4/eu-north.example.net/tcp/4001', '/ip4/198.51.100.7/tcp/4001'],
      rayTrusted: true,
      notBefore: new Date('2026-11-01T00:00:00Z'),
      ttlMs: 60 * 86_400_000,
    }
    const original = await issueRegionCertificate(authority, { ...base, head: heads[0]! })
    await fc.assert(
      fc.asyncProperty(mutated(fc.constant(original)), async (bytes) => {
        fc.pre(Buffer.compare(Buffer.from(bytes), Buffer.from(original)) !== 0)
        const err = await thrown(() => verifyRegionCertificate(bytes, { authority: authorityId, now }))
        expect(err).toBeInstanceOf(RegionCertificateError)
        expect((err as RegionCertificateError).code).toMatch(/^CERT_[A-Z_]+$/)
      }),
      fuzzParams(1_000, 2_000),
    )
  })

  it('throws only named certificate errors for arbitrary bytes, and refuses past 8 KiB by size alone', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.uint8Array({ maxLength: 512 }),
          hugeClaim,
          fc.integer({ min: 1, max: 64 }).map((k) => new Uint8Array(certificateMaxBytes + k)),
        ),
        async (bytes) => {
          const err = await thrown(() => verifyRegionCertificate(bytes, { authority: authorityId }))
          expect(err).toBeInstanceOf(RegionCertificateError)
          if (bytes.byteLength > certificateMaxBytes) {
            expect((err as Error).message).toBe(
              `certificate is ${bytes.byteLength} bytes, limit ${certificateMaxBytes}`,
            )
          }
        },
      ),
      fuzzParams(1_000, 2_000),
    )
  })

  /**
   * Certificates the authority signed over any payload, with faults chosen so the expected error is
   * known: the first failing check in the order verifyRegionCertificate documents wins.
   */
  it('names the first failing check for any combination of faults, in the documented order', async () => {
    const now = new Date('2026-11-24T12:00:00Z')
    const nowS = now.getTime() / 1000
    type Fault =
      | 'version'
      | 'extraField'
      | 'missingField'
      | 'badRegionName'
      | 'badHead'
      | 'tooManyAddrs'
      | 'longAddr'
      | 'notMultiaddr'
      | 'backwards'
      | 'wrongSigner'
      | 'badSignature'
      | 'expired'
      | 'notYetValid'
      | 'wrongRegion'
      | 'headMismatch'
    const order: Array<[Fault[], string, RegExp]> = [
      [['version'], 'RegionCertificateVersionError', /version 2 is not supported/],
      [['extraField', 'missingField'], 'RegionCertificateMalformedError', /payload has fields/],
      [['badRegionName'], 'RegionCertificateMalformedError', /region .* is not a lowercase name/],
      [['badHead'], 'RegionCertificateMalformedError', /head .* is not a PeerId/],
      [['tooManyAddrs'], 'RegionCertificateMalformedError', /more than 16 addresses/],
      [['longAddr'], 'RegionCertificateMalformedError', /address longer than 256/],
      [['notMultiaddr'], 'RegionCertificateMalformedError', /is not a multiaddr/],
      [['backwards'], 'RegionCertificateMalformedError', /expiry is not after not-before/],
      [['wrongSigner'], 'RegionCertificateWrongSignerError', /not the pinned authority/],
      [['badSignature'], 'RegionCertificateSignatureError', /does not verify/],
      [['expired'], 'RegionCertificateExpiredError', /expired at/],
      [['notYetValid'], 'RegionCertificateNotYetValidError', /not valid before/],
      [['wrongRegion'], 'RegionCertificateWrongRegionError', /expected other-region/],
      [['headMismatch'], 'RegionCertificateHeadMismatchError', /served it/],
    ]
    const faults = fc
      .subarray(order.flatMap(([f]) => f))
      // One way to break the validity window at a time: together they contradict each other.
      .filter(
        (f) =>
          [f.includes('expired'), f.includes('notYetValid'), f.includes('backwards')].filter(Boolean)
            .length <= 1,
      )
    await fc.assert(
      fc.asyncProperty(faults, regionName, fc.constantFrom(0, 1), async (chosen, region, headIndex) => {
        fc.pre(region !== 'other-region')
        const has = (f: Fault): boolean => chosen.includes(f)
        const head = heads[headIndex]!
        const payload: Record<string, unknown> = {
          v: has('version') ? 2 : 1,
          region: has('badRegionName') ? `${region.toUpperCase()}_` : region,
          head: has('badHead') ? `${head}x` : head,
          addrs: has('tooManyAddrs')
            ? Array.from({ length: maxCertificateAddrs + 1 }, (_, i) => `/ip4/10.0.0.${i}/tcp/1`)
            : has('longAddr')
              ? [`/dns4/${'a'.repeat(maxAddrLength)}/tcp/1`]
              : has('notMultiaddr')
                ? ['/no-such-protocol/1']
                : ['/ip4/198.51.100.7/tcp/4001'],
          flags: 0,
          nbf: has('notYetValid') ? nowS + 3600 : has('backwards') ? nowS - 100 : nowS - 86_400,
          exp: has('expired') ? nowS - 3600 : has('backwards') ? nowS - 200 : nowS + 86_400 * 2,
          iss: has('wrongSigner') ? peerIdFromPrivateKey(other).toString() : authorityId,
        }
        if (has('extraField')) payload.extra = 1
        if (has('missingField')) delete payload.flags
        const payloadBytes = encodeCanonical(payload)
        const signer = has('wrongSigner') || has('badSignature') ? other : authority
        const sig = await signer.sign(concatBytes([signingDomain, payloadBytes]))
        const bytes = encodeCanonical({ payload: payloadBytes, sig })
        const err = await thrown(() =>
          verifyRegionCertificate(bytes, {
            authority: authorityId,
            region: has('wrongRegion') ? 'other-region' : region,
            head: has('headMismatch') ? heads[2]! : head,
            now,
          }),
        )
        const first = order.find(([fs]) => fs.some(has))
        if (first == null) {
          expect(err).toBeNull()
          return
        }
        expect(err).toBeInstanceOf(RegionCertificateError)
        expect((err as Error).name).toBe(first[1])
        expect((err as Error).message).toMatch(first[2])
      }),
      fuzzParams(500, 2_000),
    )
  })

  it('accepts a signed payload only when every documented field rule holds', async () => {
    const now = new Date('2026-11-24T12:00:00Z')
    const nowS = now.getTime() / 1000
    const payloads = fuzzedMap({
      v: fc.constant(1),
      region: regionName,
      head: fc.constantFrom(heads[0]!, heads[1]!),
      addrs: fc.array(multiaddrText, { maxLength: maxCertificateAddrs + 1 }),
      flags: fc.nat(3),
      nbf: fc.integer({ min: nowS - 86_400, max: nowS }),
      exp: fc.integer({ min: nowS, max: nowS + 86_400 }),
      iss: fc.constant(authorityId),
    })
    await fc.assert(
      fc.asyncProperty(payloads, async (payload) => {
        const payloadBytes = encodeCanonical(payload)
        const sig = await authority.sign(concatBytes([signingDomain, payloadBytes]))
        const bytes = encodeCanonical({ payload: payloadBytes, sig })
        const err = await thrown(() => verifyRegionCertificate(bytes, { authority: authorityId, now }))
        if (err != null) {
          expect(err).toBeInstanceOf(RegionCertificateError)
          return
        }
        expect(Object.keys(payload).sort()).toEqual([
          'addrs',
          'exp',
          'flags',
          'head',
          'iss',
          'nbf',
          'region',
          'v',
        ])
        expect(payload.v).toBe(1)
        expect(payload.region).toMatch(regionNamePattern)
        expect(heads).toContain(payload.head)
        expect((payload.addrs as string[]).length).toBeLessThanOrEqual(maxCertificateAddrs)
        expect(Number.isSafeInteger(payload.flags) && (payload.flags as number) >= 0).toBe(true)
        expect(payload.exp as number).toBeGreaterThan(payload.nbf as number)
      }),
      fuzzParams(500, 2_000),
    )
  })
})

describe('fuzz: capability reports (mesh/capability-report.ts)', { timeout: fuzzTimeoutMs }, () => {
  let key: PrivateKey
  let peer: PeerId
  let validReport: fc.Arbitrary<CapabilityReport>

  beforeAll(async () => {
    announceFuzz('capability reports')
    key = await generateKeyPair('Ed25519')
    peer = peerIdFromPrivateKey(key)
    validReport = fc.record({
      v: fc.constant(1 as const),
      peerId: fc.constant(peer.toString()),
      region: regionName,
      daemonVersion: boundedText(1, maxReportStringLength),
      issuedAt: fc.maxSafeNat(),
      hardware: fc.record({
        gpus: fc.array(
          fc.record({
            vendor: fc.constantFrom('nvidia', 'amd', 'intel', 'apple', 'other'),
            name: boundedText(0, maxReportStringLength),
            vramMiB: fc.maxSafeNat(),
          }),
          { maxLength: maxReportGpus },
        ),
        ramMiB: fc.maxSafeNat(),
        cpuCores: fc.maxSafeNat(),
      }),
      engines: fc.shuffledSubarray(['llamacpp', 'vllm', 'ray-worker'] as const),
      vramCapMiB: fc.maxSafeNat(),
      ramCapMiB: fc.maxSafeNat(),
      hostPolicy: fc.oneof(
        fc.constant({ state: 'clear' as const }),
        fc.record({ state: fc.constant('paused' as const), reason: boundedText(0, maxReportStringLength) }),
      ),
      rayOptIn: fc.boolean(),
    }) as fc.Arbitrary<CapabilityReport>
  })

  it('round-trips every valid report through sign and verify', async () => {
    await fc.assert(
      fc.asyncProperty(validReport, async (report) => {
        const bytes = await signCapabilityReport(key, report)
        expect(bytes.byteLength).toBeLessThanOrEqual(capabilityReportMaxBytes)
        const verified = await verifyCapabilityReport(bytes, {
          remotePeer: peer,
          region: report.region,
          now: report.issuedAt,
        })
        expect(verified).toEqual(report)
      }),
      fuzzParams(200, 2_000),
    )
  })

  it('rejects every mutation of a signed report with a named report error', async () => {
    const report = fc.sample(validReport, { seed: 7, numRuns: 1 })[0]!
    const original = await signCapabilityReport(key, report)
    await fc.assert(
      fc.asyncProperty(mutated(fc.constant(original)), async (bytes) => {
        fc.pre(Buffer.compare(Buffer.from(bytes), Buffer.from(original)) !== 0)
        const err = await thrown(() =>
          verifyCapabilityReport(bytes, { remotePeer: peer, region: report.region, now: report.issuedAt }),
        )
        expect(err).toBeInstanceOf(CapabilityReportError)
        expect((err as CapabilityReportError).code).toMatch(/^REPORT_[A-Z_]+$/)
      }),
      fuzzParams(1_000, 2_000),
    )
  })

  it('throws only named report errors for arbitrary bytes and envelopes; refuses past 12 KiB by size', async () => {
    const envelopes = fc
      .tuple(
        fuzzedMap({
          v: fc.constant(1),
          report: fc.uint8Array({ maxLength: 64 }),
          sig: fc.uint8Array({ maxLength: 64 }),
        }),
      )
      .map(([e]) => encodeCanonical(e))
    const oversized = fc.integer({ min: 1, max: 64 }).map((k) => new Uint8Array(capabilityReportMaxBytes + k))
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(fc.uint8Array({ maxLength: 256 }), envelopes, hugeClaim, oversized),
        async (bytes) => {
          const err = await thrown(() =>
            verifyCapabilityReport(bytes, { remotePeer: peer, region: 'eu-north' }),
          )
          expect(err).toBeInstanceOf(CapabilityReportError)
          if (bytes.byteLength > capabilityReportMaxBytes)
            expect((err as Error).message).toMatch(/limit 12288/)
        },
      ),
      fuzzParams(1_000, 2_000),
    )
  })

  it('names the field when one field of a report is wrong, signed or not', async () => {
    const paths = [
      ['v'],
      ['peerId'],
      ['region'],
      ['daemonVersion'],
      ['issuedAt'],
      ['hardware'],
      ['hardware', 'gpus'],
      ['hardware', 'ramMiB'],
      ['hardware', 'cpuCores'],
      ['engines'],
      ['vramCapMiB'],
      ['ramCapMiB'],
      ['hostPolicy'],
      ['hostPolicy', 'state'],
      ['rayOptIn'],
    ]
    await fc.assert(
      fc.asyncProperty(validReport, fc.constantFrom(...paths), cborValue, async (report, path, value) => {
        const broken = structuredClone(report) as unknown as Record<string, Record<string, unknown>>
        if (path.length === 1) (broken as Record<string, unknown>)[path[0]!] = value
        else broken[path[0]!]![path[1]!] = value
        let err: unknown = null
        try {
          parseCapabilityReport(broken)
        } catch (e) {
          err = e
        }
        if (err == null) return
        expect(err).toBeInstanceOf(CapabilityReportError)
        // The version error names the version; the others name the field (or one inside it).
        const field = path[0] === 'v' ? 'version' : path.join('.')
        expect((err as Error).message).toContain(field)
        // Signed, the same report gets the same error from the head.
        const payload = encodeCanonical(broken)
        const sig = await key.sign(concatBytes([capabilityReportSigningDomain, payload]))
        const envelope = encodeCanonical({ v: 1, report: payload, sig })
        const verr = await thrown(() =>
          verifyCapabilityReport(envelope, { remotePeer: peer, region: report.region, now: report.issuedAt }),
        )
        expect(verr).toBeInstanceOf(CapabilityReportError)
      }),
      fuzzParams(500, 2_000),
    )
  })
})

describe('fuzz: assignments (mesh/join-protocol.ts)', { timeout: fuzzTimeoutMs }, () => {
  beforeAll(() => announceFuzz('assignments'))
  const [minInterval, maxInterval] = assignmentTelemetryIntervalRangeMs
  const validAssignment: fc.Arbitrary<Assignment> = fc
    .record({
      v: fc.constant(1 as const),
      region: regionName,
      head: boundedText(1, 128),
      model: boundedText(1, maxModelNameLength),
      engine: fc.constantFrom('llamacpp' as const, 'vllm' as const),
      gguf: fc.option(boundedText(1, maxModelSourceLength), { nil: undefined }),
      hf: fc.option(boundedText(1, maxModelSourceLength), { nil: undefined }),
      engineArgs: fc.record(
        {
          parallel: fc.integer({ min: 1, max: 1024 }),
          contextLength: fc.integer({ min: 1, max: 16 * 1024 * 1024 }),
          gpuMemoryUtilization: fc.double({ min: Number.MIN_VALUE, max: 1, noNaN: true }),
        },
        { requiredKeys: [] },
      ),
      telemetryIntervalMs: fc.integer({ min: minInterval, max: maxInterval }),
      ray: fc.option(
        fc.record({ address: boundedText(1, maxRayAddressLength), token: boundedText(1, maxRayTokenLength) }),
        { nil: undefined },
      ),
    })
    .map(({ gguf, hf, ray, ...rest }) => {
      const source =
        rest.engine === 'llamacpp'
          ? { gguf: gguf ?? 'garage-tiny', ...(hf != null ? { hf } : {}) }
          : { hf: hf ?? 'org/model', ...(gguf != null ? { gguf } : {}) }
      return { ...rest, source, ...(ray != null ? { ray } : {}) }
    })

  it('round-trips every valid assignment through its wire encoding', () => {
    fc.assert(
      fc.property(validAssignment, (a) => {
        expect(parseAssignment(decodeCanonical(encodeCanonical(a)))).toEqual(a)
      }),
      fuzzParams(1_000),
    )
  })

  it('throws only JoinProtocolError for any map, naming the wrong field', () => {
    const fields = ['region', 'head', 'model', 'engine', 'source', 'engineArgs', 'telemetryIntervalMs', 'ray']
    fc.assert(
      fc.property(
        validAssignment,
        fc.constantFrom(...fields),
        cborValue,
        fuzzedMap({}),
        (a, field, value, extra) => {
          const broken = { ...a, [field]: value }
          try {
            parseAssignment(broken)
          } catch (err) {
            expect(err).toBeInstanceOf(JoinProtocolError)
            expect((err as Error).message).toContain(field)
          }
          try {
            parseAssignment({ ...extra, ...a, ...extra })
          } catch (err) {
            expect(err).toBeInstanceOf(JoinProtocolError)
            expect((err as Error).message).toMatch(/^assignment: /)
          }
        },
      ),
      fuzzParams(1_000),
    )
  })
})

describe('fuzz: telemetry reports (mesh/telemetry-protocol.ts)', { timeout: fuzzTimeoutMs }, () => {
  beforeAll(() => announceFuzz('telemetry reports'))
  const finite = (max = Number.MAX_VALUE): fc.Arbitrary<number> =>
    fc.oneof(fc.nat(), fc.double({ min: 0, max, noNaN: true, noDefaultInfinity: true }))
  const validReport: fc.Arbitrary<TelemetryReport> = fc.record(
    {
      v: fc.constant(1 as const),
      seq: fc.maxSafeNat(),
      state: fc.constantFrom('starting' as const, 'serving' as const, 'paused' as const, 'draining' as const),
      model: fc
        .string({ maxLength: maxTelemetryModelLength })
        .filter((s) => s.length <= maxTelemetryModelLength),
      tokensTotal: finite(),
      promptTokensTotal: finite(),
      tokensPerSecond: finite(),
      running: finite(),
      waiting: finite(),
      kvCacheUsage: finite(1).filter((x) => x <= 1),
      gpu: fc.record({
        utilizationPct: finite(100).filter((x) => x <= 100),
        temperatureC: finite(),
        powerW: finite(),
      }),
    },
    {
      requiredKeys: [
        'v',
        'seq',
        'state',
        'model',
        'tokensTotal',
        'promptTokensTotal',
        'tokensPerSecond',
        'running',
        'waiting',
        'kvCacheUsage',
      ],
    },
  )

  it('round-trips every valid report through its wire encoding', () => {
    fc.assert(
      fc.property(validReport, (r) => {
        expect(parseTelemetryReport(decodeCanonical(encodeCanonical(r)))).toEqual(r)
      }),
      fuzzParams(1_000),
    )
  })

  it('throws only TelemetryProtocolError for any map, naming the wrong field', () => {
    const fields = [
      'seq',
      'state',
      'model',
      'tokensTotal',
      'promptTokensTotal',
      'tokensPerSecond',
      'running',
      'waiting',
      'kvCacheUsage',
      'gpu',
    ]
    fc.assert(
      fc.property(validReport, fc.constantFrom(...fields), cborValue, (r, field, value) => {
        try {
          parseTelemetryReport({ ...r, [field]: value })
        } catch (err) {
          expect(err).toBeInstanceOf(TelemetryProtocolError)
          expect((err as Error).message).toContain(field)
        }
      }),
      fuzzParams(1_000),
    )
  })

  it('decodes arbitrary bytes to a report or a named error', () => {
    fc.assert(
      fc.property(
        fc.oneof(fc.uint8Array({ maxLength: 128 }), mutated(validReport.map(encodeCanonical)), hugeClaim),
        (bytes) => {
          try {
            parseTelemetryReport(decodeCanonical(bytes))
          } catch (err) {
            expect([CborDecodeError, TelemetryProtocolError].some((c) => err instanceof c)).toBe(true)
          }
        },
      ),
      fuzzParams(1_000),
    )
  })
})

describe('fuzz regressions: decoded maps whose values cannot be printed', { timeout: fuzzTimeoutMs }, () => {
  // { v: { toString: 1 } }: String() of that map throws a TypeError, which the version checks used to
  // build their messages with; every decoder must still answer its own named error.
  const toStringMap = decodeCanonical(Uint8Array.from(Buffer.from('a16176a168746f537472696e6701', 'hex')))
  const named = (name: string): unknown =>
    expect.objectContaining({ name, message: expect.stringMatching(/version a map is not supported/) })

  it('a certificate, report, envelope, assignment or telemetry report with v = { toString: 1 }', async () => {
    const certificate = encodeCanonical({ payload: encodeCanonical(toStringMap), sig: new Uint8Array(64) })
    expect(() => decodeRegionCertificate(certificate)).toThrow(named('RegionCertificateVersionError'))
    expect(() => parseCapabilityReport(toStringMap)).toThrow(named('CapabilityReportVersionError'))
    const peer = peerIdFromPrivateKey(await generateKeyPair('Ed25519'))
    await expect(
      verifyCapabilityReport(encodeCanonical(toStringMap), { remotePeer: peer, region: 'eu-north' }),
    ).rejects.toThrow(named('CapabilityReportVersionError'))
    expect(() => parseAssignment(toStringMap)).toThrow(named('JoinProtocolError'))
    expect(() => parseTelemetryReport(toStringMap)).toThrow(named('TelemetryProtocolError'))
  })
})
