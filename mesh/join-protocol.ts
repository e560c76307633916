import type { AbortOptions, Connection, PeerId, Stream } from '@libp2p/interface'
import { lpStream } from '@libp2p/utils'
import { decodeCanonical, encodeCanonical, printable } from '../core/cbor.ts'
import { GarageError } from '../core/errors.ts'
import { isPlainObject } from '../core/guards.ts'
import {
  CapabilityReportError,
  CapabilityReportRegionError,
  CapabilityReportStaleError,
  verifyCapabilityReport,
} from './capability-report.ts'
import { regionNamePattern } from './certificate.ts'
import type { MeshNode } from './node.ts'
import {
  JOIN_PROTOCOL,
  joinExchangeTimeoutMs,
  joinMaxInboundStreams,
  joinMaxOutboundStreams,
  joinRequestMaxBytes,
  joinResponseMaxBytes,
} from './protocols.ts'
import type { Assignment, CapabilityReport, ModelSource } from './region-messages.ts'
import { ticketKeyBytes } from './ticket.ts'

/**
 * `/garage/join/1.0.0`: the node sends one length-prefixed CBOR map, `{ v: 1, join: signedReport }`
 * or `{ v: 1, leave: true }`; the head answers `{ v: 1, ok: true, assignment }`, `{ v: 1, ok: true }`
 * (leave) or `{ v: 1, ok: false, code, message }`, and both close. docs/region.md has the details.
 */

/** The peer broke the protocol: a malformed message, or an assignment no node should run. */
export class JoinProtocolError extends Error {
  override name = 'JoinProtocolError'
}

/** The head understood the request and said no; `code` says why (`region_mismatch`, `no_assignment`, ...). */
export class JoinRefusedError extends GarageError {
  constructor(code: string, message: string) {
    super(message, code)
  }
}

/** Refusal codes the head sends; a head may add others, so nodes treat unknown ones as a refusal. */
export const JoinRefusal = Object.freeze({
  regionMismatch: 'region_mismatch',
  noAssignment: 'no_assignment',
  badReport: 'bad_report',
  staleReport: 'stale_report',
  internalError: 'internal_error',
})

const refusalCodePattern = /^[a-z][a-z0-9_]{0,63}$/
export const refusalMessageMaxLength = 512
export const maxModelNameLength = 128
export const maxModelSourceLength = 1024
export const maxRayAddressLength = 256
export const maxRayTokenLength = 1024
/** A hostile head must not make a node report in a busy loop or go silent for hours. */
export const assignmentTelemetryIntervalRangeMs = [500, 60_000] as const

function bad(message: string): never {
  throw new JoinProtocolError(`assignment: ${message}`)
}

function exactKeys(obj: Record<string, unknown>, where: string, required: string[], optional: string[] = []) {
  for (const k of required) if (obj[k] === undefined) bad(`${where}${k} is missing`)
  for (const k of Object.keys(obj)) {
    if (!required.includes(k) && !optional.includes(k)) bad(`${where}${k} is not a known field`)
  }
}

function boundedString(v: unknown, field: string, max: number): string {
  if (typeof v !== 'string' || v.length === 0 || v.length > max) {
    bad(`${field} must be a string of 1-${max} characters`)
  }
  return v
}

function intIn(v: unknown, field: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
    bad(`${field} must be an integer from ${min} to ${max}`)
  }
  return v
}

/**
 * Checks an assignment field by field (the node runs what it says, so a hostile head gets nothing
 * past this) and returns a fresh copy with absent optionals dropped. Throws JoinProtocolError.
 */
/** The most pipeline stages a group may have. */
export const maxGroupSize = 16

export function parseAssignment(value: unknown): Assignment {
  if (!isPlainObject(value)) bad('must be a map')
  if (value.v !== 1) bad(`version ${printable(value.v)} is not supported (want 1)`)
  exactKeys(
    value,
    '',
    ['v', 'region', 'head', 'model', 'engine', 'source', 'engineArgs', 'telemetryIntervalMs'],
    ['ray', 'task', 'group'],
  )
  const region = boundedString(value.region, 'region', 63)
  if (!regionNamePattern.test(region)) bad(`region ${JSON.stringify(region)} is not a region name`)
  const engine = value.engine
  if (engine !== 'llamacpp' && engine !== 'vllm' && engine !== 'ray')
    bad('engine must be llamacpp, vllm or ray')

  const src = value.source
  if (!isPlainObject(src)) bad('source must be a map')
  exactKeys(src, 'source.', [], ['gguf', 'hf'])
  const source: ModelSource = {}
  if (src.gguf !== undefined) source.gguf = boundedString(src.gguf, 'source.gguf', maxModelSourceLength)
  if (src.hf !== undefined) source.hf = boundedString(src.hf, 'source.hf', maxModelSourceLength)
  if (engine === 'llamacpp' && source.gguf == null) bad('engine llamacpp needs source.gguf')
  if ((engine === 'vllm' || engine === 'ray') && source.hf == null) bad(`engine ${engine} needs source.hf`)

  const args = value.engineArgs
  if (!isPlainObject(args)) bad('engineArgs must be a map')
  exactKeys(args, 'engineArgs.', [], ['parallel', 'contextLength', 'gpuMemoryUtilization'])
  const engineArgs: Assignment['engineArgs'] = {}
  if (args.parallel !== undefined) engineArgs.parallel = intIn(args.parallel, 'engineArgs.parallel', 1, 1024)
  if (args.contextLength !== undefined) {
    engineArgs.contextLength = intIn(args.contextLength, 'engineArgs.contextLength', 1, 16 * 1024 * 1024)
  }
  if (args.gpuMemoryUtilization !== undefined) {
    const u = args.gpuMemoryUtilization
    if (typeof u !== 'number' || !(u > 0 && u <= 1)) bad('engineArgs.gpuMemoryUtilization must be in (0, 1]')
    engineArgs.gpuMemoryUtilization = u
  }

  const [minInterval, maxInterval] = assignmentTelemetryIntervalRangeMs
  const assignment: Assignment = {
    v: 1,
    region,
    head: boundedString(value.head, 'head', 128),
    model: boundedString(value.model, 'model', maxModelNameLength),
    engine,
    source,
    engineArgs,
    telemetryIntervalMs: intIn(value.telemetryIntervalMs, 'telemetryIntervalMs', minInterval, maxInterval),
  }
  if (value.task !== undefined) {
    if (value.task !== 'generate' && value.task !== 'embed') bad('task must be generate or embed')
    if (value.task === 'embed') assignment.task = 'embed'
  }
  if (value.ray !== undefined) {
    const ray = value.ray
    if (!isPlainObject(ray)) bad('ray must be a map')
    exactKeys(ray, 'ray.', ['address', 'token'], ['image'])
    assignment.ray = {
      address: boundedString(ray.address, 'ray.address', maxRayAddressLength),
      token: boundedString(ray.token, 'ray.token', maxRayTokenLength),
      ...(ray.image !== undefined
        ? { image: boundedString(ray.image, 'ray.image', maxModelSourceLength) }
        : {}),
    }
  }
  if (value.group !== undefined) {
    const g = value.group
    if (!isPlainObject(g)) bad('group must be a map')
    exactKeys(g, 'group.', ['size', 'rank'])
    const size = intIn(g.size, 'group.size', 2, maxGroupSize)
    assignment.group = { size, rank: intIn(g.rank, 'group.rank', 0, size - 1) }
  }
  if (engine === 'ray' && (assignment.group == null || assignment.ray == null))
    bad('engine ray needs group and ray (the cluster to join)')
  return assignment
}

type JoinRequest = { kind: 'join'; report: Uint8Array } | { kind: 'leave' }

function parseRequest(value: unknown): JoinRequest {
  if (isPlainObject(value) && value.v === 1 && Object.keys(value).length === 2) {
    if (value.join instanceof Uint8Array) return { kind: 'join', report: value.join }
    if (value.leave === true) return { kind: 'leave' }
  }
  throw new JoinProtocolError('join request must be { v: 1, join: bytes } or { v: 1, leave: true }')
}

/** The direct path's key for this join (mesh/ticket.ts), and the head's clock when it sent it. */
interface DirectGrantWire {
  key: Uint8Array
  now: number
}

/** What a node keeps of its join's direct-path grant. */
export interface DirectGrant {
  /** The HMAC key of this node's tickets, fresh at every join. */
  key: Uint8Array
  /** The head's clock minus this machine's (ms), measured at join. */
  clockOffsetMs: number
}

type JoinResponse =
  | { v: 1; ok: true; assignment?: Assignment; direct?: DirectGrantWire }
  | { v: 1; ok: false; code: string; message: string }

function refusal(code: string, message: string): JoinResponse {
  return { v: 1, ok: false, code, message: message.slice(0, refusalMessageMaxLength) }
}

export interface JoinHandlerInit {
  /** This head's region; reports for another are refused with `region_mismatch`. */
  region: string
  /** Decides the node's assignment; throw JoinRefusedError(code, message) to refuse. */
  onJoin: (report: CapabilityReport, peer: PeerId, options: AbortOptions) => Promise<Assignment>
  /**
   * The key of the node's direct-path tickets for this join (a head that does not grant a direct
   * path returns null or leaves this out); sent with the assignment.
   */
  directKey?: (peer: PeerId) => Uint8Array | null
  /** The node drains and leaves; called whether or not it had joined. */
  onLeave: (peer: PeerId, options: AbortOptions) => Promise<void>
  /** A malformed request (stream reset) or a report that fails verification (refused). */
  onBadRequest?: (err: Error, peer: PeerId) => void
  /** onJoin or onLeave failed with something other than a refusal; the node gets `internal_error`. */
  onError?: (err: Error, peer: PeerId) => void
  now?: () => number
  maxReportAgeMs?: number
  /** Whole exchange, onJoin included; a peer that stalls is reset after this. */
  timeoutMs?: number
}

function refusalCodeFor(err: CapabilityReportError): string {
  if (err instanceof CapabilityReportRegionError) return JoinRefusal.regionMismatch
  if (err instanceof CapabilityReportStaleError) return JoinRefusal.staleReport
  return JoinRefusal.badReport
}

async function respond(
  request: JoinRequest,
  peer: PeerId,
  init: JoinHandlerInit,
  options: AbortOptions & { signal: AbortSignal },
): Promise<JoinResponse> {
  if (request.kind === 'join') {
    let report: CapabilityReport
    try {
      report = await verifyCapabilityReport(request.report, {
        remotePeer: peer,
        region: init.region,
        ...(init.now != null ? { now: init.now() } : {}),
        ...(init.maxReportAgeMs != null ? { maxAgeMs: init.maxReportAgeMs } : {}),
      })
    } catch (err) {
      if (!(err instanceof CapabilityReportError)) throw err
      init.onBadRequest?.(err, peer)
      return refusal(refusalCodeFor(err), err.message)
    }
    try {
      // Re-checked so a head bug surfaces here, not as a node refusing a broken assignment.
      const assignment = parseAssignment(await init.onJoin(report, peer, options))
      const key = init.directKey?.(peer) ?? null
      return key == null
        ? { v: 1, ok: true, assignment }
        : { v: 1, ok: true, assignment, direct: { key, now: Date.now() } }
    } catch (err) {
      if (err instanceof JoinRefusedError) return refusal(err.code, err.message)
      if (options.signal.aborted) throw err
      init.onError?.(err as Error, peer)
      return refusal(JoinRefusal.internalError, 'the head could not process the join; try again later')
    }
  }
  try {
    await init.onLeave(peer, options)
    return { v: 1, ok: true }
  } catch (err) {
    if (options.signal.aborted) throw err
    init.onError?.(err as Error, peer)
    return refusal(JoinRefusal.internalError, 'the head could not process the leave; try again later')
  }
}

async function serve(
  stream: Stream,
  connection: Connection,
  init: JoinHandlerInit,
  options: AbortOptions & { signal: AbortSignal },
): Promise<void> {
  const lp = lpStream(stream, { maxDataLength: joinRequestMaxBytes })
  const request = parseRequest(decodeCanonical((await lp.read(options)).subarray()))
  const response = await respond(request, connection.remotePeer, init, options)
  await lp.write(encodeCanonical(response), options)
  await stream.close(options)
}

/** Serves joins and leaves. Malformed input resets only that stream; the head keeps serving. */
export async function handleJoinProtocol(node: MeshNode, init: JoinHandlerInit): Promise<void> {
  await node.handle(
    JOIN_PROTOCOL,
    async (stream: Stream, connection: Connection) => {
      const signal = AbortSignal.timeout(init.timeoutMs ?? joinExchangeTimeoutMs)
      try {
        await serve(stream, connection, init, { signal })
      } catch (err) {
        init.onBadRequest?.(err as Error, connection.remotePeer)
        stream.abort(err as Error)
      }
    },
    {
      maxInboundStreams: joinMaxInboundStreams,
      maxOutboundStreams: joinMaxOutboundStreams,
      // A node behind NAT joins over the relay before DCUtR gives it a direct connection.
      runOnLimitedConnection: true,
    },
  )
}

function parseResponse(value: unknown, kind: JoinRequest['kind']): JoinResponse {
  if (!isPlainObject(value) || value.v !== 1)
    throw new JoinProtocolError('join response must be a map with v: 1')
  const keys = Object.keys(value).sort().join(',')
  if (value.ok === false && keys === 'code,message,ok,v') {
    const { code, message } = value
    if (typeof code !== 'string' || !refusalCodePattern.test(code)) {
      throw new JoinProtocolError('join refusal code must be a short snake_case string')
    }
    if (typeof message !== 'string' || message.length > refusalMessageMaxLength) {
      throw new JoinProtocolError(
        `join refusal message must be a string of at most ${refusalMessageMaxLength}`,
      )
    }
    return { v: 1, ok: false, code, message }
  }
  if (value.ok === true && kind === 'join' && keys === 'assignment,ok,v') {
    return { v: 1, ok: true, assignment: parseAssignment(value.assignment) }
  }
  if (value.ok === true && kind === 'join' && keys === 'assignment,direct,ok,v') {
    const d = value.direct
    if (
      !isPlainObject(d) ||
      Object.keys(d).sort().join(',') !== 'key,now' ||
      !(d.key instanceof Uint8Array) ||
      d.key.byteLength !== ticketKeyBytes ||
      typeof d.now !== 'number' ||
      !Number.isSafeInteger(d.now) ||
      d.now < 0
    )
      throw new JoinProtocolError(
        `join response's direct must be { key: ${ticketKeyBytes} bytes, now: uint }`,
      )
    return {
      v: 1,
      ok: true,
      assignment: parseAssignment(value.assignment),
      direct: { key: d.key, now: d.now },
    }
  }
  if (value.ok === true && kind === 'leave' && keys === 'ok,v') return { v: 1, ok: true }
  throw new JoinProtocolError(`join response to a ${kind} has fields ${keys}`)
}

async function exchange(
  node: MeshNode,
  head: PeerId,
  request: Record<string, unknown>,
  kind: JoinRequest['kind'],
  options: AbortOptions,
): Promise<JoinResponse & { sentAt: number; receivedAt: number }> {
  const bytes = encodeCanonical(request)
  if (bytes.byteLength > joinRequestMaxBytes) {
    throw new JoinProtocolError(`join request is ${bytes.byteLength} bytes, limit ${joinRequestMaxBytes}`)
  }
  const signal = AbortSignal.any([
    AbortSignal.timeout(joinExchangeTimeoutMs),
    ...(options.signal != null ? [options.signal] : []),
  ])
  const stream = await node.dialProtocol(head, JOIN_PROTOCOL, {
    signal,
    runOnLimitedConnection: true,
    maxOutboundStreams: joinMaxOutboundStreams,
  })
  try {
    const lp = lpStream(stream, { maxDataLength: joinResponseMaxBytes })
    const sentAt = Date.now()
    await lp.write(bytes, { signal })
    const response = parseResponse(decodeCanonical((await lp.read({ signal })).subarray()), kind)
    const receivedAt = Date.now()
    await stream.close({ signal })
    return { ...response, sentAt, receivedAt }
  } catch (err) {
    stream.abort(err as Error)
    throw err
  }
}

/**
 * Asks `head` to join its region with a report from signCapabilityReport. Resolves with the checked
 * assignment; throws JoinRefusedError (with `.code`) when the head says no, JoinProtocolError when it
 * answers something malformed, or the stream's error.
 */
export async function requestJoin(
  node: MeshNode,
  head: PeerId,
  signedReport: Uint8Array,
  options: AbortOptions & {
    /** Called with the join's direct-path grant, when the head sent one. */
    onDirect?: (grant: DirectGrant) => void
  } = {},
): Promise<Assignment> {
  const response = await exchange(node, head, { v: 1, join: signedReport }, 'join', options)
  if (!response.ok) throw new JoinRefusedError(response.code, response.message)
  const assignment = response.assignment as Assignment
  if (assignment.head !== head.toString()) {
    throw new JoinProtocolError(`assignment names head ${assignment.head}, but ${head.toString()} sent it`)
  }
  if (response.direct != null)
    options.onDirect?.({
      key: response.direct.key,
      // The head stamped its clock about halfway through the exchange.
      clockOffsetMs: Math.round(response.direct.now - (response.sentAt + response.receivedAt) / 2),
    })
  return assignment
}

/** Tells `head` this node drains and leaves its region. */
export async function requestLeave(node: MeshNode, head: PeerId, options: AbortOptions = {}): Promise<void> {
  const response = await exchange(node, head, { v: 1, leave: true }, 'leave', options)
  if (!response.ok) throw new JoinRefusedError(response.code, response.message)
}
