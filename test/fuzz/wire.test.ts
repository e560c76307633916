import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PrivateKey, Stream } from '@libp2p/interface'
import type { Multiaddr } from '@multiformats/multiaddr'
import fc from 'fast-check'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { decodeCanonical, encodeCanonical } from '../../core/cbor.ts'
import { isPlainObject } from '../../core/guards.ts'
import { signCapabilityReport } from '../../mesh/capability-report.ts'
import { issueRegionCertificate } from '../../mesh/certificate.ts'
import {
  encodeInferFrames,
  handleInferProtocol,
  type InferServerRequest,
  sendInferRequest,
  InferFrameType as T,
} from '../../mesh/infer-protocol.ts'
import { handleJoinProtocol, JoinRefusal, parseAssignment, requestJoin } from '../../mesh/join-protocol.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import {
  INFER_PROTOCOL,
  inferFrameMaxBytes,
  inferHeadMaxBytes,
  JOIN_PROTOCOL,
  joinRequestMaxBytes,
  joinResponseMaxBytes,
  REGION_PROTOCOL,
  regionRequestMaxBytes,
  regionResponseMaxBytes,
  TELEMETRY_PROTOCOL,
  telemetryAckMaxBytes,
  telemetryReportMaxBytes,
} from '../../mesh/protocols.ts'
import type { Assignment, TelemetryReport } from '../../mesh/region-messages.ts'
import { fetchRegionCertificate, handleRegionProtocol } from '../../mesh/region-protocol.ts'
import {
  handleTelemetryProtocol,
  parseTelemetryReport,
  sendTelemetry,
} from '../../mesh/telemetry-protocol.ts'
import { TestMesh } from '../helpers/mesh.ts'
import {
  announceFuzz,
  cborValue,
  concatBytes,
  cpuNodeReport,
  fuzzedMap,
  fuzzParams,
  fuzzTimeoutMs,
  hugeLengths,
  mutated,
  varint,
} from './fuzz.ts'
import {
  type Headers,
  type ReferenceOutcome,
  referenceRequest,
  referenceResponse,
} from './infer-reference.ts'

/** One exchange must settle well inside the protocols' own timeouts (5 s and up). */
const runTimeoutMs = 4_000

/** Errors of the stream and length-prefix layers under the protocol modules: named, expected. */
const streamErrors = [
  'UnexpectedEOFError',
  'InvalidDataLengthError',
  'InvalidDataLengthLengthError',
  'StreamResetError',
  'StreamAbortedError',
  'StreamStateError',
  'StreamClosedError',
]

interface Outcome {
  bytes: Uint8Array
  /** The other side reset the stream (a refusal); false when it closed it cleanly. */
  reset: boolean
}

async function readAll(stream: Stream): Promise<Outcome> {
  const chunks: Uint8Array[] = []
  try {
    for await (const chunk of stream) chunks.push(chunk.subarray())
    return { bytes: concatBytes(chunks), reset: false }
  } catch {
    return { bytes: concatBytes(chunks), reset: true }
  }
}

/** Sends `input` on a new stream, closes our side unless told not to, reads what comes back. */
async function exchange(
  node: MeshNode,
  peer: MeshNode,
  protocol: string,
  input: Uint8Array,
  closeWrite = true,
): Promise<Outcome> {
  const stream = await node.dialProtocol(peer.peerId, protocol, { runOnLimitedConnection: true })
  try {
    if (input.byteLength > 0 && !stream.send(input)) await stream.onDrain()
    if (closeWrite) await stream.close()
  } catch {
    // the other side reset it while we were still writing: readAll sees how
  }
  return readAll(stream)
}

/** Bytes as hex: compares Buffers and views by content, and fast (deep equality of big arrays is not). */
function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex')
}

function lp(bytes: Uint8Array): Uint8Array {
  return concatBytes([varint(bytes.byteLength), bytes])
}

/** The first length-prefixed message in `bytes` under `max`, as lpStream reads it; null if none. */
function firstMessage(bytes: Uint8Array, max: number): Uint8Array | null {
  let length = 0
  let i = 0
  for (;;) {
    if (i >= bytes.byteLength || i >= 8) return null
    const b = bytes[i]!
    length += (b & 0x7f) * 2 ** (7 * i)
    i++
    if ((b & 0x80) === 0) break
  }
  if (length > max || i + length > bytes.byteLength) return null
  return bytes.subarray(i, i + length)
}

function decodes(bytes: Uint8Array | null): unknown {
  if (bytes == null) return undefined
  try {
    return decodeCanonical(bytes)
  } catch {
    return undefined
  }
}

/** Lp messages of every kind: valid ones, mutated ones, wrong maps, random bytes, huge prefixes. */
function lpInputs(valid: fc.Arbitrary<Uint8Array>, limit: number): fc.Arbitrary<Uint8Array> {
  return fc.oneof(
    valid.map(lp),
    mutated(valid.map(lp)),
    cborValue.map((v) => lp(encodeCanonical(v))),
    fc.uint8Array({ maxLength: 64 }),
    fc
      .tuple(hugeLengths(limit), fc.uint8Array({ maxLength: 16 }))
      .map(([n, b]) => concatBytes([varint(n), b])),
  )
}

function expectNamed(err: unknown, own: string[]): void {
  expect(err).toBeInstanceOf(Error)
  expect([...own, ...streamErrors]).toContain((err as Error).name)
}

async function settle<T>(work: Promise<T>): Promise<{ value?: T; err?: unknown }> {
  try {
    return { value: await work }
  } catch (err) {
    return { err }
  }
}

describe('fuzz: the mesh protocols on the wire (region, join, telemetry, infer)', {
  timeout: fuzzTimeoutMs,
}, () => {
  const mesh = new TestMesh()
  const region = 'eu-north'
  let head: MeshNode
  let client: MeshNode
  let fake: MeshNode
  let fakeAddr: Multiaddr
  let clientKey: PrivateKey
  let certificate: Uint8Array
  let signedReport: Uint8Array
  let assignment: Assignment
  const bad: Record<string, Error[]> = { region: [], join: [], telemetry: [], infer: [] }
  const inferHandled: InferServerRequest[] = []
  const inferErrors: Error[] = []
  /** What the fake head answers on its next stream, and whether it then closes or resets. */
  let script: { bytes: Uint8Array; end: 'close' | 'reset' } = { bytes: new Uint8Array(), end: 'close' }

  beforeAll(async () => {
    announceFuzz('mesh protocols on the wire')
    const authority = await generateKeyPair('Ed25519')
    clientKey = await generateKeyPair('Ed25519')
    head = await mesh.node([])
    fake = await mesh.node([])
    client = await createMeshNode({
      privateKey: clientKey,
      listen: ['/ip4/127.0.0.1/tcp/0'],
      bootstrap: [],
      allowPrivateAddresses: true,
      relayReservation: false,
    })
    mesh.track(async () => {
      await client.stop()
    })
    fakeAddr = fake.getMultiaddrs()[0]!
    certificate = await issueRegionCertificate(authority, {
      region,
      head: head.peerId.toString(),
      addrs: [],
      ttlMs: 86_400_000,
    })
    assignment = {
      v: 1,
      region,
      head: head.peerId.toString(),
      model: 'garage-tiny',
      engine: 'llamacpp',
      source: { gguf: 'garage-tiny' },
      engineArgs: { parallel: 2 },
      telemetryIntervalMs: 2_000,
    }
    signedReport = await signCapabilityReport(clientKey, cpuNodeReport(client.peerId.toString(), region))
    await handleRegionProtocol(head, {
      certificate: () => certificate,
      onBadRequest: (e) => bad.region!.push(e),
    })
    await handleJoinProtocol(head, {
      region,
      onJoin: async () => assignment,
      onLeave: async () => {},
      onBadRequest: (e) => bad.join!.push(e),
    })
    await handleTelemetryProtocol(head, { onReport: () => 'ok', onBadRequest: (e) => bad.telemetry!.push(e) })
    mesh.track(
      await handleInferProtocol(head, {
        allow: (peer) => peer.equals(client.peerId),
        async handle(request, reply) {
          inferHandled.push(request)
          await reply.respond(200, [['x-method', request.method]], request.body)
        },
        onRejected: (_peer, reason) => bad.infer!.push(reason),
        onError: (_peer, err) => inferErrors.push(err),
      }),
    )
    for (const protocol of [REGION_PROTOCOL, JOIN_PROTOCOL, TELEMETRY_PROTOCOL, INFER_PROTOCOL]) {
      await fake.handle(
        protocol,
        (stream) => {
          const { bytes, end } = script
          let answered = false
          // Answers once the request starts to arrive; reads and drops the rest, so the stream closes.
          stream.addEventListener('message', () => {
            if (answered) return
            answered = true
            if (bytes.byteLength > 0) stream.send(bytes)
            if (end === 'close') stream.close().catch(() => {})
            else stream.abort(new Error('the fake head resets'))
          })
        },
        { runOnLimitedConnection: true, maxInboundStreams: 1024 },
      )
    }
    await client.dial(head.getMultiaddrs()[0]!)
    await client.dial(fakeAddr)
  })
  afterAll(() => mesh.cleanup())

  describe('the head reading what nodes send', () => {
    it('/garage/region/1.0.0 answers exactly { v: 1 } and resets everything else', async () => {
      const request = encodeCanonical({ v: 1 })
      await fc.assert(
        fc.asyncProperty(lpInputs(fc.constant(request), regionRequestMaxBytes), async (input) => {
          const before = bad.region!.length
          const out = await exchange(client, head, REGION_PROTOCOL, input)
          const asked = decodes(firstMessage(input, regionRequestMaxBytes))
          if (isPlainObject(asked) && Object.keys(asked).length === 1 && asked.v === 1) {
            expect(out.reset).toBe(false)
            const answer = decodes(firstMessage(out.bytes, regionResponseMaxBytes)) as {
              v: 1
              cert: Uint8Array
            }
            expect({ ...answer, cert: hex(answer.cert) }).toEqual({ v: 1, cert: hex(certificate) })
          } else {
            expect(out).toEqual({ bytes: new Uint8Array(), reset: true })
            expect(bad.region!.length).toBe(before + 1)
            expectNamed(bad.region!.at(-1), ['RegionProtocolError', 'CborDecodeError'])
          }
        }),
        fuzzParams(150, runTimeoutMs),
      )
      expect(hex(await fetchRegionCertificate(client, head.peerId))).toBe(hex(certificate))
    })

    it('/garage/join/1.0.0 refuses bad reports with a code, resets malformed requests', async () => {
      const join = encodeCanonical({ v: 1, join: signedReport })
      const leave = encodeCanonical({ v: 1, leave: true })
      const input = fc.oneof(
        lpInputs(fc.constantFrom(join, leave), joinRequestMaxBytes),
        // A well-formed request around a broken report: refused, not reset.
        mutated(fc.constant(signedReport)).map((r) => lp(encodeCanonical({ v: 1, join: r }))),
      )
      await fc.assert(
        fc.asyncProperty(input, async (bytes) => {
          const before = bad.join!.length
          const out = await exchange(client, head, JOIN_PROTOCOL, bytes)
          const asked = decodes(firstMessage(bytes, joinRequestMaxBytes))
          const kind =
            isPlainObject(asked) && asked.v === 1 && Object.keys(asked).length === 2
              ? asked.join instanceof Uint8Array
                ? 'join'
                : asked.leave === true
                  ? 'leave'
                  : null
              : null
          if (kind == null) {
            expect(out).toEqual({ bytes: new Uint8Array(), reset: true })
            expectNamed(bad.join!.at(-1), ['JoinProtocolError', 'CborDecodeError'])
            expect(bad.join!.length).toBe(before + 1)
            return
          }
          expect(out.reset).toBe(false)
          const answer = decodes(firstMessage(out.bytes, joinResponseMaxBytes)) as Record<string, unknown>
          if (kind === 'leave') expect(answer).toEqual({ v: 1, ok: true })
          else if (answer.ok === true) {
            expect(hex((asked as { join: Uint8Array }).join)).toBe(hex(signedReport))
            expect(answer).toEqual({ v: 1, ok: true, assignment })
          } else {
            expect(Object.values(JoinRefusal)).toContain(answer.code)
            expect(typeof answer.message).toBe('string')
            expect((answer.message as string).length).toBeGreaterThan(0)
          }
        }),
        fuzzParams(150, runTimeoutMs),
      )
    })

    it('/garage/telemetry/1.0.0 acknowledges valid reports and resets everything else', async () => {
      const report: TelemetryReport = {
        v: 1,
        seq: 1,
        state: 'serving',
        model: 'garage-tiny',
        tokensTotal: 10,
        promptTokensTotal: 5,
        tokensPerSecond: 12.5,
        running: 1,
        waiting: 0,
        kvCacheUsage: 0.25,
        gpu: { utilizationPct: 40, temperatureC: 61, powerW: 120 },
      }
      const fuzzed = fuzzedMap(
        Object.fromEntries(Object.entries(report).map(([k, v]) => [k, fc.constant(v)])),
      )
      await fc.assert(
        fc.asyncProperty(
          lpInputs(
            fc.oneof(fc.constant(encodeCanonical(report)), fuzzed.map(encodeCanonical)),
            telemetryReportMaxBytes,
          ),
          async (input) => {
            const before = bad.telemetry!.length
            const out = await exchange(client, head, TELEMETRY_PROTOCOL, input)
            const sent = decodes(firstMessage(input, telemetryReportMaxBytes))
            let valid = sent !== undefined
            try {
              parseTelemetryReport(sent)
            } catch {
              valid = false
            }
            if (valid) {
              expect(out.reset).toBe(false)
              expect(decodes(firstMessage(out.bytes, telemetryAckMaxBytes))).toEqual({ v: 1, ok: true })
            } else {
              expect(out).toEqual({ bytes: new Uint8Array(), reset: true })
              expect(bad.telemetry!.length).toBe(before + 1)
              expectNamed(bad.telemetry!.at(-1), ['TelemetryProtocolError', 'CborDecodeError'])
            }
          },
        ),
        fuzzParams(150, runTimeoutMs),
      )
    })

    it('refuses a length prefix over each limit as soon as it arrives, before any payload', async () => {
      const cases: Array<[string, number, string]> = [
        [REGION_PROTOCOL, regionRequestMaxBytes, 'region'],
        [JOIN_PROTOCOL, joinRequestMaxBytes, 'join'],
        [TELEMETRY_PROTOCOL, telemetryReportMaxBytes, 'telemetry'],
      ]
      const claims = fc
        .constantFrom(...cases)
        .chain(([protocol, limit, name]) => hugeLengths(limit).map((claim) => ({ protocol, name, claim })))
      await fc.assert(
        fc.asyncProperty(claims, async ({ protocol, name, claim }) => {
          const before = bad[name]!.length
          // Our side stays open: only the prefix can have made the head reset.
          const out = await exchange(client, head, protocol, varint(claim), false)
          expect(out).toEqual({ bytes: new Uint8Array(), reset: true })
          expect(bad[name]!.length).toBe(before + 1)
          expect(bad[name]!.at(-1)?.name).toMatch(/^InvalidDataLength(Length)?Error$/)
        }),
        fuzzParams(30, runTimeoutMs),
      )
      // At the limit exactly the message is read (and refused for what it says); one byte more is not.
      for (const [protocol, limit, name] of cases) {
        for (const [size, refusedAs] of [
          [limit, /^(CborDecodeError|RegionProtocolError|JoinProtocolError|TelemetryProtocolError)$/],
          [limit + 1, /^InvalidDataLengthError$/],
        ] as const) {
          const out = await exchange(client, head, protocol, lp(new Uint8Array(size).fill(0x61)))
          expect(out.reset, `${name} ${size}`).toBe(true)
          expect(bad[name]!.at(-1)?.name, `${name} ${size}`).toMatch(refusedAs)
        }
      }
    })

    it('/garage/infer/1.0.0 serves exactly the requests the docs allow and refuses the rest', async () => {
      const validRequest = inferRequest.map((r) =>
        encodeInferFrames([
          [T.RequestHead, encodeCanonical({ method: r.method, path: r.path, headers: r.headers })],
          ...dataFrames(r.body),
          [T.End],
        ]),
      )
      const input = fc.oneof(
        validRequest,
        mutated(validRequest),
        fc.array(anyFrame, { maxLength: 5 }).map((fs) => encodeInferFrames(fs)),
        fc.uint8Array({ maxLength: 64 }),
      )
      await fc.assert(
        fc.asyncProperty(input, async (bytes) => {
          const handledBefore = inferHandled.length
          const rejectedBefore = bad.infer!.length
          const out = await exchange(client, head, INFER_PROTOCOL, bytes)
          const expected = referenceRequest(bytes)
          expect(inferErrors).toEqual([])
          if (expected.kind === 'request') {
            const served = inferHandled[handledBefore]!
            expect({ ...served, body: hex(served.body) }).toEqual({
              method: expected.method,
              path: expected.path,
              headers: expected.headers,
              body: hex(expected.body),
            })
            // More bytes after a whole request: a second exchange, or a refusal that cancels the
            // first one's answer, depending on when they arrive.
            if (expected.rest > 0 && out.bytes.byteLength === 0) return
            const answer = referenceResponse(out.bytes)
            expect(answer).toMatchObject({ kind: 'response', status: 200, end: 'end' })
            expect(hex((answer as { body: Uint8Array }).body)).toBe(hex(expected.body))
            if (expected.rest === 0) expect(out.reset).toBe(false)
          } else if (bytes.byteLength === 0) {
            expect(out).toEqual({ bytes: new Uint8Array(), reset: false })
          } else {
            expect(inferHandled.length).toBe(handledBefore)
            expect(out).toEqual({ bytes: new Uint8Array(), reset: true })
            expect(bad.infer!.length).toBe(rejectedBefore + 1)
            expect(bad.infer!.at(-1)?.name).toBe('InferProtocolError')
          }
        }),
        fuzzParams(200, runTimeoutMs),
      )
    })

    it('refuses an infer frame over its limit on its header, before the payload is sent', async () => {
      const head16k = encodeCanonical({ method: 'POST', path: '/v1/x', headers: [] })
      const cases = fc.oneof(
        fc.integer({ min: inferHeadMaxBytes + 1, max: inferHeadMaxBytes + 1024 }).map((n) => ({
          prefix: new Uint8Array(),
          claim: n,
          type: T.RequestHead,
          want: `REQUEST_HEAD of ${n} bytes is over ${inferHeadMaxBytes}`,
        })),
        // One byte over 64 KiB is already over the largest frame any type may have.
        fc.integer({ min: inferFrameMaxBytes + 1, max: inferFrameMaxBytes + 1024 }).map((n) => ({
          prefix: encodeInferFrames([[T.RequestHead, head16k]]),
          claim: n,
          type: T.Data,
          want: `frame of ${n + 1} bytes is over ${inferFrameMaxBytes + 1}`,
        })),
        hugeLengths(inferFrameMaxBytes + 1).map((n) => ({
          prefix: new Uint8Array(),
          claim: n,
          type: T.RequestHead,
          want: /frame of \d+ bytes is over 65537|frame length prefix is too long/,
        })),
      )
      await fc.assert(
        fc.asyncProperty(cases, async ({ prefix, claim, type, want }) => {
          const before = bad.infer!.length
          const header = concatBytes([prefix, varint(claim + 1), Uint8Array.of(type)])
          const out = await exchange(client, head, INFER_PROTOCOL, header, false)
          expect(out).toEqual({ bytes: new Uint8Array(), reset: true })
          expect(bad.infer!.length).toBe(before + 1)
          expect(bad.infer!.at(-1)?.name).toBe('InferProtocolError')
          expect(bad.infer!.at(-1)?.message).toMatch(want)
        }),
        fuzzParams(40, runTimeoutMs),
      )
      // At the limits exactly: a 16 KiB head and a 64 KiB DATA frame are served.
      const bare = encodeCanonical({ method: 'POST', path: '/v1/x', headers: [['x-pad', '']] }).byteLength
      let pad = inferHeadMaxBytes - bare
      while (
        encodeCanonical({ method: 'POST', path: '/v1/x', headers: [['x-pad', 'a'.repeat(pad)]] }).byteLength >
        inferHeadMaxBytes
      )
        pad--
      const fullHead = encodeCanonical({
        method: 'POST',
        path: '/v1/x',
        headers: [['x-pad', 'a'.repeat(pad)]],
      })
      expect(fullHead.byteLength).toBe(inferHeadMaxBytes)
      const body = new Uint8Array(inferFrameMaxBytes).fill(7)
      const out = await exchange(
        client,
        head,
        INFER_PROTOCOL,
        encodeInferFrames([[T.RequestHead, fullHead], [T.Data, body], [T.End]]),
      )
      expect(referenceResponse(out.bytes)).toMatchObject({ kind: 'response', status: 200, end: 'end' })
      expect(hex((referenceResponse(out.bytes) as { body: Uint8Array }).body)).toBe(hex(body))
    })
  })

  describe('nodes reading what a head sends', () => {
    const scripted = (arb: fc.Arbitrary<Uint8Array>) =>
      fc.record({ bytes: arb, end: fc.constantFrom('close' as const, 'reset' as const) })

    it('fetchRegionCertificate takes only { v: 1, cert } and names everything else', async () => {
      const answers = fc.uint8Array({ maxLength: 64 }).map((cert) => encodeCanonical({ v: 1, cert }))
      await fc.assert(
        fc.asyncProperty(scripted(lpInputs(answers, regionResponseMaxBytes)), async (s) => {
          script = s
          const { value, err } = await settle(fetchRegionCertificate(client, fake.peerId))
          const sent = decodes(firstMessage(s.bytes, regionResponseMaxBytes))
          const valid = isPlainObject(sent) && sent.v === 1 && sent.cert instanceof Uint8Array
          if (value != null) {
            expect(valid).toBe(true)
            expect(hex(value)).toBe(hex((sent as { cert: Uint8Array }).cert))
          } else {
            expectNamed(err, ['RegionProtocolError', 'CborDecodeError'])
            if (s.end === 'close') expect(valid).toBe(false)
          }
        }),
        fuzzParams(150, runTimeoutMs),
      )
    })

    it('requestJoin takes only a valid assignment from the head it asked, and names everything else', async () => {
      const mine = { ...assignment, head: fake.peerId.toString() }
      const answers = fc.oneof(
        fc.constant(encodeCanonical({ v: 1, ok: true, assignment: mine })),
        fuzzedMap({
          v: fc.constant(1),
          ok: fc.constant(true),
          assignment: fuzzedMap(
            Object.fromEntries(Object.entries(mine).map(([k, v]) => [k, fc.constant(v)])),
          ),
        }).map(encodeCanonical),
        fuzzedMap({
          v: fc.constant(1),
          ok: fc.constant(false),
          code: fc.oneof(fc.constantFrom(...Object.values(JoinRefusal)), fc.string({ maxLength: 70 })),
          message: fc.string({ maxLength: 600 }),
        }).map(encodeCanonical),
      )
      await fc.assert(
        fc.asyncProperty(scripted(lpInputs(answers, joinResponseMaxBytes)), async (s) => {
          script = s
          const { value, err } = await settle(requestJoin(client, fake.peerId, signedReport))
          const sent = decodes(firstMessage(s.bytes, joinResponseMaxBytes)) as
            | Record<string, unknown>
            | undefined
          if (value != null) {
            expect(sent?.ok).toBe(true)
            expect(value).toEqual(parseAssignment(sent!.assignment))
            expect(value.head).toBe(fake.peerId.toString())
            return
          }
          expectNamed(err, ['JoinProtocolError', 'JoinRefusedError', 'CborDecodeError'])
          if ((err as Error).name === 'JoinRefusedError') {
            expect(sent?.ok).toBe(false)
            expect((err as { code: string }).code).toBe(sent!.code)
          }
        }),
        fuzzParams(150, runTimeoutMs),
      )
    })

    it('sendTelemetry takes only the documented acks and names everything else', async () => {
      const report: TelemetryReport = {
        v: 1,
        seq: 1,
        state: 'serving',
        model: 'garage-tiny',
        tokensTotal: 1,
        promptTokensTotal: 1,
        tokensPerSecond: 1,
        running: 0,
        waiting: 0,
        kvCacheUsage: 0,
      }
      const answers = fc.oneof(
        fc.constantFrom({ v: 1, ok: true }, { v: 1, ok: false, code: 'not_joined' }),
        fc.maxSafeNat().map((verified) => ({ v: 1, ok: true, verified })),
        fuzzedMap({
          v: fc.constant(1),
          ok: fc.boolean(),
          code: fc.constant('not_joined'),
          verified: fc.integer(),
        }),
      )
      await fc.assert(
        fc.asyncProperty(
          scripted(lpInputs(answers.map(encodeCanonical), telemetryAckMaxBytes)),
          async (s) => {
            script = s
            let verified: number | null = null
            const { value, err } = await settle(
              sendTelemetry(client, fake.peerId, report, { onVerified: (n) => (verified = n) }),
            )
            const sent = decodes(firstMessage(s.bytes, telemetryAckMaxBytes)) as
              | Record<string, unknown>
              | undefined
            if (value != null) {
              expect(value).toBe(sent?.ok === true ? 'ok' : 'not_joined')
              if (verified != null) expect(verified).toBe(sent?.verified)
              return
            }
            expectNamed(err, ['TelemetryProtocolError', 'CborDecodeError'])
          },
        ),
        fuzzParams(150, runTimeoutMs),
      )
    })

    it('sendInferRequest reads a response exactly as the docs say, or names what is wrong', async () => {
      const validResponse = inferResponse.map((r) =>
        encodeInferFrames([
          [T.ResponseHead, encodeCanonical({ status: r.status, headers: r.headers })],
          ...dataFrames(r.body),
          r.error != null ? [T.Error, encodeCanonical(r.error)] : [T.End],
        ]),
      )
      const remoteError = fc
        .record({
          code: fc.oneof(fc.stringMatching(/^[a-z][a-z0-9_]{0,63}$/), fc.string()),
          message: fc.string(),
        })
        .map((e) => encodeInferFrames([[T.Error, encodeCanonical(e)]]))
      const bytes = fc.oneof(
        validResponse,
        mutated(validResponse),
        remoteError,
        fc.array(anyFrame, { maxLength: 5 }).map((fs) => encodeInferFrames(fs)),
        fc.uint8Array({ maxLength: 64 }),
      )
      await fc.assert(
        fc.asyncProperty(scripted(bytes), async (s) => {
          script = s
          const expected = referenceResponse(s.bytes)
          // A multiaddr: a new stream each time, so no pooled stream carries one run into the next.
          const { value: res, err } = await settle(
            sendInferRequest(
              client,
              fakeAddr,
              { method: 'POST', path: '/v1/x', headers: [] },
              {
                firstByteTimeoutMs: runTimeoutMs,
                idleTimeoutMs: runTimeoutMs,
              },
            ),
          )
          if (res == null) {
            expectNamed(err, ['InferProtocolError', 'InferStreamError', 'InferRemoteError'])
            if (s.end === 'reset') return
            expect(expected.kind).not.toBe('response')
            const name = {
              protocol: 'InferProtocolError',
              remote: 'InferRemoteError',
              truncated: 'InferStreamError',
            }[expected.kind as 'protocol' | 'remote' | 'truncated']
            expect((err as Error).name).toBe(name)
            if (expected.kind === 'remote')
              expect(err).toMatchObject({ code: expected.code, message: expected.message })
            return
          }
          expect(expected.kind).toBe('response')
          const want = expected as Extract<ReferenceOutcome, { kind: 'response' }>
          expect({ status: res.status, headers: res.headers }).toEqual({
            status: want.status,
            headers: want.headers,
          })
          const chunks: Uint8Array[] = []
          let bodyErr: unknown = null
          try {
            for await (const c of res.body) chunks.push(c)
          } catch (e) {
            bodyErr = e
          }
          const body = concatBytes(chunks)
          if (s.end === 'reset') {
            // Whatever arrived before the reset is a prefix of what was sent.
            expect(hex(want.body.subarray(0, body.byteLength))).toBe(hex(body))
            if (bodyErr != null) expectNamed(bodyErr, ['InferStreamError'])
            return
          }
          expect(hex(body)).toBe(hex(want.body))
          if (want.end === 'end') expect(bodyErr).toBeNull()
          else {
            expect(bodyErr).toMatchObject({
              name: 'InferStreamError',
              code: typeof want.end === 'string' ? want.end : want.end.code,
            })
          }
        }),
        fuzzParams(200, runTimeoutMs),
      )
    })

    it('round-trips every valid request and response through the real head and node', async () => {
      await fc.assert(
        fc.asyncProperty(inferRequest, async (r) => {
          const handledBefore = inferHandled.length
          const res = await sendInferRequest(client, head.peerId, r)
          const served = inferHandled[handledBefore]!
          expect({ ...served, body: hex(served.body) }).toEqual({ ...r, body: hex(r.body) })
          expect(res.status).toBe(200)
          expect(res.headers).toEqual([['x-method', r.method]])
          const chunks: Uint8Array[] = []
          for await (const c of res.body) chunks.push(c)
          expect(hex(concatBytes(chunks))).toBe(hex(r.body))
        }),
        fuzzParams(60, runTimeoutMs),
      )
    })
  })
})

const headerValue = fc
  .array(
    fc.oneof(fc.constant('\t'), fc.integer({ min: 0x20, max: 0x7e }), fc.integer({ min: 0x80, max: 0xff })),
    { maxLength: 24 },
  )
  .map((cs) => cs.map((c) => (typeof c === 'string' ? c : String.fromCharCode(c))).join(''))
const headers: fc.Arbitrary<Headers> = fc.array(
  fc.tuple(fc.stringMatching(/^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,20}$/), headerValue),
  { maxLength: 6 },
)
const body = fc.oneof(
  { weight: 8, arbitrary: fc.uint8Array({ maxLength: 512 }) },
  // Over one DATA frame now and then: the sender cuts it, the reader joins it.
  {
    weight: 1,
    arbitrary: fc
      .integer({ min: inferFrameMaxBytes - 2, max: inferFrameMaxBytes * 2 + 3 })
      .map((n) => new Uint8Array(n).fill(n & 255)),
  },
)

const inferRequest = fc.record({
  method: fc.stringMatching(/^[A-Z]{1,16}$/),
  path: fc.stringMatching(/^\/[\x21-\x7e]{0,60}$/),
  headers,
  body,
})

const inferResponse = fc.record({
  status: fc.integer({ min: 200, max: 599 }),
  headers,
  body,
  error: fc.option(fc.record({ code: fc.stringMatching(/^[a-z][a-z0-9_]{0,20}$/), message: fc.string() }), {
    nil: undefined,
  }),
})

function dataFrames(bytes: Uint8Array): Array<[number, Uint8Array]> {
  const frames: Array<[number, Uint8Array]> = []
  for (let o = 0; o < bytes.byteLength; o += inferFrameMaxBytes)
    frames.push([T.Data, bytes.subarray(o, o + inferFrameMaxBytes)])
  return frames
}

/** Any frame: every type (known or not), payloads that are CBOR maps of the right keys or not. */
const anyFrame: fc.Arbitrary<[number, Uint8Array]> = fc.tuple(
  fc.oneof(
    fc.constantFrom(T.RequestHead, T.Data, T.End, T.ResponseHead, T.Error),
    fc.integer({ min: 0, max: 255 }),
  ),
  fc.oneof(
    fc.uint8Array({ maxLength: 32 }),
    fuzzedMap({ method: fc.constant('GET'), path: fc.constant('/v1/x'), headers: headers }).map(
      encodeCanonical,
    ),
    fuzzedMap({ status: fc.integer({ min: 100, max: 700 }), headers }).map(encodeCanonical),
    fuzzedMap({ code: fc.constant('engine_error'), message: fc.string() }).map(encodeCanonical),
  ),
)
