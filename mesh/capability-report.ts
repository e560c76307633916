import type { PeerId, PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { decodeCanonical, encodeCanonical, printable } from '../core/cbor.ts'
import { GarageError } from '../core/errors.ts'
import { isPlainObject } from '../core/guards.ts'
import { regionNamePattern } from './certificate.ts'
import type { CapabilityReport, EngineFailure, GpuSummary } from './region-messages.ts'

/**
 * The signed capability report a node sends to join a region. Wire format in docs/region.md:
 * canonical CBOR `{ v: 1, report: bytes, sig: bytes }`, where `report` is the canonical CBOR of a
 * CapabilityReport and `sig` the node's Ed25519 signature over the signing domain and `report`.
 */

export const capabilityReportFormatVersion = 1
/** 16 GPUs with 128-character names in 3-byte UTF-8 stay under this. */
export const capabilityReportMaxBytes = 12 * 1024
export const maxReportGpus = 16
export const maxEngineFailures = 2
/** GPU names, daemon version, pause reason. */
export const maxReportStringLength = 128
/** Replays of an old report are refused; clocks on gamers' PCs drift, so the window is generous. */
export const capabilityReportMaxAgeMs = 5 * 60_000

/** Signatures cover this prefix and the report, so no other Garage signature can pass as one. */
export const capabilityReportSigningDomain = new TextEncoder().encode('garage/capability-report/v1\n')

const gpuVendors: ReadonlySet<string> = new Set<GpuSummary['vendor']>([
  'nvidia',
  'amd',
  'intel',
  'apple',
  'other',
])
const engineKinds: ReadonlySet<string> = new Set<CapabilityReport['engines'][number]>([
  'llamacpp',
  'vllm',
  'ray-worker',
])

/** Base of the named report errors; `code` is stable for logs and metrics. */
export class CapabilityReportError extends GarageError {}
export class CapabilityReportShapeError extends CapabilityReportError {
  constructor(message: string) {
    super(message, 'REPORT_SHAPE')
  }
}
export class CapabilityReportVersionError extends CapabilityReportError {
  constructor(message: string) {
    super(message, 'REPORT_VERSION')
  }
}
export class CapabilityReportPeerMismatchError extends CapabilityReportError {
  constructor(message: string) {
    super(message, 'REPORT_PEER_MISMATCH')
  }
}
export class CapabilityReportSignatureError extends CapabilityReportError {
  constructor(message: string) {
    super(message, 'REPORT_BAD_SIGNATURE')
  }
}
export class CapabilityReportRegionError extends CapabilityReportError {
  constructor(message: string) {
    super(message, 'REPORT_WRONG_REGION')
  }
}
export class CapabilityReportStaleError extends CapabilityReportError {
  constructor(message: string) {
    super(message, 'REPORT_STALE')
  }
}

function shape(message: string): never {
  throw new CapabilityReportShapeError(`capability report: ${message}`)
}

function checkKeys(obj: Record<string, unknown>, where: string, required: string[], optional: string[] = []) {
  for (const k of required) if (!(k in obj) || obj[k] === undefined) shape(`${where}${k} is missing`)
  for (const k of Object.keys(obj)) {
    if (!required.includes(k) && !optional.includes(k)) shape(`${where}${k} is not a known field`)
  }
}

function str(v: unknown, field: string, min = 1): string {
  if (typeof v !== 'string' || v.length < min || v.length > maxReportStringLength) {
    shape(`${field} must be a string of ${min}-${maxReportStringLength} characters`)
  }
  return v
}

function count(v: unknown, field: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
    shape(`${field} must be a non-negative integer`)
  return v
}

/**
 * Checks every field of a report and returns a fresh copy holding only the known fields (absent
 * optionals dropped, so the copy always encodes). Throws CapabilityReportShapeError/VersionError.
 */
export function parseCapabilityReport(value: unknown): CapabilityReport {
  if (!isPlainObject(value)) shape('must be a map')
  if (value.v !== capabilityReportFormatVersion) {
    throw new CapabilityReportVersionError(
      `capability report version ${printable(value.v)} is not supported (want ${capabilityReportFormatVersion})`,
    )
  }
  checkKeys(
    value,
    '',
    [
      'v',
      'peerId',
      'region',
      'daemonVersion',
      'issuedAt',
      'hardware',
      'engines',
      'vramCapMiB',
      'ramCapMiB',
      'hostPolicy',
      'rayOptIn',
    ],
    ['engineFailures'],
  )
  const region = str(value.region, 'region')
  if (!regionNamePattern.test(region)) shape(`region ${JSON.stringify(region)} is not a region name`)

  const hw = value.hardware
  if (!isPlainObject(hw)) shape('hardware must be a map')
  checkKeys(hw, 'hardware.', ['gpus', 'ramMiB', 'cpuCores'])
  if (!Array.isArray(hw.gpus) || hw.gpus.length > maxReportGpus) {
    shape(`hardware.gpus must be a list of at most ${maxReportGpus}`)
  }
  const gpus = hw.gpus.map((g: unknown, i: number): GpuSummary => {
    if (!isPlainObject(g)) shape(`hardware.gpus[${i}] must be a map`)
    checkKeys(g, `hardware.gpus[${i}].`, ['vendor', 'name', 'vramMiB'])
    if (typeof g.vendor !== 'string' || !gpuVendors.has(g.vendor)) {
      shape(`hardware.gpus[${i}].vendor must be one of ${[...gpuVendors].join(', ')}`)
    }
    return {
      vendor: g.vendor as GpuSummary['vendor'],
      name: str(g.name, `hardware.gpus[${i}].name`, 0),
      vramMiB: count(g.vramMiB, `hardware.gpus[${i}].vramMiB`),
    }
  })

  const engines = value.engines
  if (
    !Array.isArray(engines) ||
    !engines.every((e) => typeof e === 'string' && engineKinds.has(e)) ||
    new Set(engines).size !== engines.length
  ) {
    shape(`engines must be a list of distinct engines among ${[...engineKinds].join(', ')}`)
  }

  const hp = value.hostPolicy
  if (!isPlainObject(hp)) shape('hostPolicy must be a map')
  checkKeys(hp, 'hostPolicy.', ['state'], ['reason'])
  if (hp.state !== 'clear' && hp.state !== 'paused') shape('hostPolicy.state must be clear or paused')
  if (typeof value.rayOptIn !== 'boolean') shape('rayOptIn must be a boolean')
  const failures = value.engineFailures
  if (failures !== undefined && (!Array.isArray(failures) || failures.length > maxEngineFailures))
    shape(`engineFailures must be a list of at most ${maxEngineFailures}`)
  const engineFailures = (failures as unknown[] | undefined)?.map((f, i): EngineFailure => {
    if (!isPlainObject(f)) shape(`engineFailures[${i}] must be a map`)
    checkKeys(f, `engineFailures[${i}].`, ['engine', 'reason'])
    if (f.engine !== 'vllm' && f.engine !== 'llamacpp')
      shape(`engineFailures[${i}].engine must be vllm or llamacpp`)
    return { engine: f.engine, reason: str(f.reason, `engineFailures[${i}].reason`) }
  })

  return {
    v: 1,
    peerId: str(value.peerId, 'peerId'),
    region,
    daemonVersion: str(value.daemonVersion, 'daemonVersion'),
    issuedAt: count(value.issuedAt, 'issuedAt'),
    hardware: {
      gpus,
      ramMiB: count(hw.ramMiB, 'hardware.ramMiB'),
      cpuCores: count(hw.cpuCores, 'hardware.cpuCores'),
    },
    engines: [...engines] as CapabilityReport['engines'],
    vramCapMiB: count(value.vramCapMiB, 'vramCapMiB'),
    ramCapMiB: count(value.ramCapMiB, 'ramCapMiB'),
    hostPolicy:
      hp.reason === undefined
        ? { state: hp.state }
        : { state: hp.state, reason: str(hp.reason, 'hostPolicy.reason', 0) },
    rayOptIn: value.rayOptIn,
    ...(engineFailures != null && engineFailures.length > 0 ? { engineFailures } : {}),
  }
}

/** A hostile issuedAt can be past the largest Date; show the number then. */
function iso(ms: number): string {
  const d = new Date(ms)
  return Number.isNaN(d.getTime()) ? String(ms) : d.toISOString()
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.byteLength + b.byteLength)
  out.set(a, 0)
  out.set(b, a.byteLength)
  return out
}

/** Signs a report with the node's libp2p key; returns the envelope bytes to send on /garage/join. */
export async function signCapabilityReport(
  privateKey: PrivateKey,
  report: CapabilityReport,
): Promise<Uint8Array> {
  const clean = parseCapabilityReport(report)
  const signer = peerIdFromPrivateKey(privateKey).toString()
  if (clean.peerId !== signer) {
    throw new CapabilityReportPeerMismatchError(
      `report names peer ${clean.peerId}, but the key is ${signer}'s`,
    )
  }
  const bytes = encodeCanonical(clean)
  const sig = await privateKey.sign(concat(capabilityReportSigningDomain, bytes))
  const envelope = encodeCanonical({ v: capabilityReportFormatVersion, report: bytes, sig })
  if (envelope.byteLength > capabilityReportMaxBytes) {
    shape(`signed report is ${envelope.byteLength} bytes, limit ${capabilityReportMaxBytes}`)
  }
  return envelope
}

export interface VerifyCapabilityReportOptions {
  /** The connection's authenticated remote peer: the report must name it and be signed by it. */
  remotePeer: PeerId
  /** This head's region. */
  region: string
  /** Milliseconds since the epoch. */
  now?: number
  /** Largest distance between issuedAt and now, either way. */
  maxAgeMs?: number
}

/**
 * Verifies a signed report from `remotePeer`. Throws one named CapabilityReport*Error per failure,
 * checked in this order: size and shape, version, peer, signature, region, age.
 */
export async function verifyCapabilityReport(
  bytes: Uint8Array,
  options: VerifyCapabilityReportOptions,
): Promise<CapabilityReport> {
  if (bytes.byteLength > capabilityReportMaxBytes) {
    shape(`signed report is ${bytes.byteLength} bytes, limit ${capabilityReportMaxBytes}`)
  }
  let env: unknown
  try {
    env = decodeCanonical(bytes)
  } catch (err) {
    shape(`envelope: ${(err as Error).message}`)
  }
  if (!isPlainObject(env)) shape('envelope must be a map')
  if (env.v !== capabilityReportFormatVersion) {
    throw new CapabilityReportVersionError(
      `capability report envelope version ${printable(env.v)} is not supported (want ${capabilityReportFormatVersion})`,
    )
  }
  checkKeys(env, 'envelope.', ['v', 'report', 'sig'])
  const { report: payload, sig } = env
  if (!(payload instanceof Uint8Array) || !(sig instanceof Uint8Array)) {
    shape('envelope report and sig must be byte strings')
  }
  let decoded: unknown
  try {
    decoded = decodeCanonical(payload)
  } catch (err) {
    shape(`report: ${(err as Error).message}`)
  }
  const report = parseCapabilityReport(decoded)

  const peer = options.remotePeer.toString()
  if (report.peerId !== peer) {
    throw new CapabilityReportPeerMismatchError(`report names peer ${report.peerId}, but ${peer} sent it`)
  }
  const publicKey = options.remotePeer.publicKey
  let ok = false
  try {
    ok = publicKey != null && (await publicKey.verify(concat(capabilityReportSigningDomain, payload), sig))
  } catch {
    ok = false
  }
  if (!ok) {
    throw new CapabilityReportSignatureError(`report signature does not verify against ${peer}'s key`)
  }
  if (report.region !== options.region) {
    throw new CapabilityReportRegionError(
      `report is for region ${report.region}, this head serves ${options.region}`,
    )
  }
  const now = options.now ?? Date.now()
  const maxAge = options.maxAgeMs ?? capabilityReportMaxAgeMs
  if (Math.abs(now - report.issuedAt) > maxAge) {
    throw new CapabilityReportStaleError(
      `report was issued at ${iso(report.issuedAt)}, more than ${maxAge / 1000} s from the head's clock ${iso(now)}`,
    )
  }
  return report
}
