import type { AbortOptions, Connection, PeerId, Stream } from '@libp2p/interface'
import { decodeCanonical, encodeCanonical, printable } from '../core/cbor.ts'
import { isPlainObject } from '../core/guards.ts'
import { type Logger, silentLogger } from '../core/logger.ts'
import { assignmentTelemetryIntervalRangeMs } from './join-protocol.ts'
import { keptExchange, serveKept } from './kept-stream.ts'
import type { MeshNode } from './node.ts'
import {
  TELEMETRY_PROTOCOL,
  telemetryAckMaxBytes,
  telemetryExchangeTimeoutMs,
  telemetryMaxInboundStreams,
  telemetryMaxOutboundStreams,
  telemetryReportMaxBytes,
} from './protocols.ts'
import type { GpuTelemetry, NodeServingState, TelemetryReport } from './region-messages.ts'

/**
 * `/garage/telemetry/1.0.0`: one stream per report. The node sends one length-prefixed CBOR
 * TelemetryReport; the head answers `{ v: 1, ok: true }` or `{ v: 1, ok: false, code: 'not_joined' }`
 * (the node must join again, e.g. after a head restart) and both close.
 */

/** 'reassign': the head has other work for the node (a pipeline group's stage): join again. */
export type TelemetryAck = 'ok' | 'not_joined' | 'reassign'

/** The peer broke the protocol: a malformed report or answer. */
export class TelemetryProtocolError extends Error {
  override name = 'TelemetryProtocolError'
}

export const maxTelemetryModelLength = 128
const servingStates: ReadonlySet<string> = new Set<NodeServingState>([
  'starting',
  'serving',
  'paused',
  'draining',
])

function bad(message: string): never {
  throw new TelemetryProtocolError(`telemetry report: ${message}`)
}

function nonNegative(v: unknown, field: string, max = Number.MAX_VALUE): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || v > max) {
    bad(`${field} must be a finite number from 0 to ${max}`)
  }
  return v
}

/** Checks every field and returns a fresh copy with absent optionals dropped. Throws TelemetryProtocolError. */
export function parseTelemetryReport(value: unknown): TelemetryReport {
  if (!isPlainObject(value)) bad('must be a map')
  if (value.v !== 1) bad(`version ${printable(value.v)} is not supported (want 1)`)
  const required = [
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
  ]
  for (const k of required) if (value[k] === undefined) bad(`${k} is missing`)
  for (const k of Object.keys(value))
    if (!required.includes(k) && k !== 'gpu' && k !== 'ray') bad(`${k} is not a known field`)
  const { seq, state, model } = value
  if (typeof seq !== 'number' || !Number.isSafeInteger(seq) || seq < 0)
    bad('seq must be a non-negative integer')
  if (typeof state !== 'string' || !servingStates.has(state))
    bad(`state must be one of ${[...servingStates].join(', ')}`)
  if (typeof model !== 'string' || model.length > maxTelemetryModelLength) {
    bad(`model must be a string of at most ${maxTelemetryModelLength} characters`)
  }
  const report: TelemetryReport = {
    v: 1,
    seq,
    state: state as NodeServingState,
    model,
    tokensTotal: nonNegative(value.tokensTotal, 'tokensTotal'),
    promptTokensTotal: nonNegative(value.promptTokensTotal, 'promptTokensTotal'),
    tokensPerSecond: nonNegative(value.tokensPerSecond, 'tokensPerSecond'),
    running: nonNegative(value.running, 'running'),
    waiting: nonNegative(value.waiting, 'waiting'),
    kvCacheUsage: nonNegative(value.kvCacheUsage, 'kvCacheUsage', 1),
  }
  if (value.gpu !== undefined) {
    const gpu = value.gpu
    if (!isPlainObject(gpu)) bad('gpu must be a map')
    const keys = Object.keys(gpu).sort().join(',')
    if (keys !== 'powerW,temperatureC,utilizationPct') bad(`gpu has fields ${keys}`)
    const g: GpuTelemetry = {
      utilizationPct: nonNegative(gpu.utilizationPct, 'gpu.utilizationPct', 100),
      temperatureC: nonNegative(gpu.temperatureC, 'gpu.temperatureC'),
      powerW: nonNegative(gpu.powerW, 'gpu.powerW'),
    }
    report.gpu = g
  }
  if (value.ray !== undefined) {
    if (value.ray !== 'ready' && value.ray !== 'starting') bad('ray must be ready or starting')
    report.ray = value.ray
  }
  return report
}

export interface TelemetryHandlerInit {
  /**
   * Records a report from `peer`; 'not_joined' tells the node to join again. A head may answer with
   * the completion tokens it verified for the node since it joined (the node shows them as credits).
   */
  onReport: (
    report: TelemetryReport,
    peer: PeerId,
  ) => TelemetryAck | VerifiedAck | Promise<TelemetryAck | VerifiedAck>
  /** A malformed, oversized or stalled report; its stream was reset. */
  onBadRequest?: (err: Error, peer: PeerId) => void
  timeoutMs?: number
}

/**
 * The head quarantined the node (its answers failed integrity checks, docs/integrity.md) or is
 * hearing its appeal: sent with every 'ok' while it lasts, so the gamer sees it.
 */
export interface IntegrityStanding {
  state: 'quarantined' | 'appeal'
  /** At most integrityReasonMaxLength characters. */
  reason: string
}

export const integrityReasonMaxLength = 400

/** An 'ok' answer that also carries the head's verified token count for the node. */
export interface VerifiedAck {
  ack: 'ok'
  verified: number
  integrity?: IntegrityStanding | null
}

function ackMessage(ack: TelemetryAck | VerifiedAck): Record<string, unknown> {
  if (typeof ack === 'object')
    return {
      v: 1,
      ok: true,
      verified: Math.max(0, Math.floor(ack.verified)),
      ...(ack.integrity != null
        ? {
            integrity: {
              state: ack.integrity.state,
              reason: ack.integrity.reason.slice(0, integrityReasonMaxLength),
            },
          }
        : {}),
    }
  return ack === 'ok' ? { v: 1, ok: true } : { v: 1, ok: false, code: ack }
}

/** Receives telemetry. Malformed input resets only that stream; the head keeps serving. */
export async function handleTelemetryProtocol(node: MeshNode, init: TelemetryHandlerInit): Promise<void> {
  await node.handle(
    TELEMETRY_PROTOCOL,
    async (stream: Stream, connection: Connection) => {
      const timeoutMs = init.timeoutMs ?? telemetryExchangeTimeoutMs
      try {
        // Report after report on one stream, each within the longest interval an assignment may set.
        await serveKept(stream, {
          maxRequestBytes: telemetryReportMaxBytes,
          firstMs: timeoutMs,
          idleMs: keptStreamIdleMs,
          writeMs: timeoutMs,
          answer: async (bytes) => {
            const report = parseTelemetryReport(decodeCanonical(bytes))
            return encodeCanonical(ackMessage(await init.onReport(report, connection.remotePeer)))
          },
        })
      } catch (err) {
        init.onBadRequest?.(err as Error, connection.remotePeer)
        stream.abort(err as Error)
      }
    },
    {
      maxInboundStreams: telemetryMaxInboundStreams,
      maxOutboundStreams: telemetryMaxOutboundStreams,
      // Relayed nodes report too; a report is a few hundred bytes, well inside relay limits.
      runOnLimitedConnection: true,
    },
  )
}

function parseIntegrity(value: unknown): IntegrityStanding | null {
  if (
    isPlainObject(value) &&
    Object.keys(value).sort().join(',') === 'reason,state' &&
    (value.state === 'quarantined' || value.state === 'appeal') &&
    typeof value.reason === 'string' &&
    value.reason.length <= integrityReasonMaxLength
  )
    return { state: value.state, reason: value.reason }
  return null
}

function parseAck(value: unknown): {
  ack: TelemetryAck
  verified: number | null
  integrity: IntegrityStanding | null
} {
  if (isPlainObject(value) && value.v === 1) {
    const keys = Object.keys(value).sort().join(',')
    if (keys === 'ok,v' && value.ok === true) return { ack: 'ok', verified: null, integrity: null }
    const integrity = keys === 'integrity,ok,v,verified' ? parseIntegrity(value.integrity) : null
    if (
      (keys === 'ok,v,verified' || integrity != null) &&
      value.ok === true &&
      Number.isSafeInteger(value.verified) &&
      (value.verified as number) >= 0
    ) {
      return { ack: 'ok', verified: value.verified as number, integrity }
    }
    if (
      keys === 'code,ok,v' &&
      value.ok === false &&
      (value.code === 'not_joined' || value.code === 'reassign')
    ) {
      return { ack: value.code, verified: null, integrity: null }
    }
  }
  throw new TelemetryProtocolError(
    'telemetry answer must be { v: 1, ok: true [, verified [, integrity]] } or { v: 1, ok: false, code: "not_joined" | "reassign" }',
  )
}

/** A kept stream waits this long for the next report: the longest interval an assignment may set, and more. */
const keptStreamIdleMs = assignmentTelemetryIntervalRangeMs[1] + telemetryExchangeTimeoutMs

/**
 * Sends one report to `head`; resolves with its answer. Reports go one after another on one stream
 * that stays open between them (a stream per report cost the head most of a report's CPU); a head
 * that closes it after its answer (older heads) gets a new stream for each report.
 */
export async function sendTelemetry(
  node: MeshNode,
  head: PeerId,
  report: TelemetryReport,
  options: AbortOptions & {
    /** The head's verified count, and the node's integrity standing (null: in good standing). */
    onVerified?: (tokens: number, integrity: IntegrityStanding | null) => void
  } = {},
): Promise<TelemetryAck> {
  const bytes = encodeCanonical(parseTelemetryReport(report))
  if (bytes.byteLength > telemetryReportMaxBytes) {
    throw new TelemetryProtocolError(
      `telemetry report is ${bytes.byteLength} bytes, limit ${telemetryReportMaxBytes}`,
    )
  }
  const signal = AbortSignal.any([
    AbortSignal.timeout(telemetryExchangeTimeoutMs),
    ...(options.signal != null ? [options.signal] : []),
  ])
  const answer = parseAck(
    decodeCanonical(
      await keptExchange(node, head, bytes, {
        signal,
        protocol: TELEMETRY_PROTOCOL,
        maxAnswerBytes: telemetryAckMaxBytes,
        maxOutboundStreams: telemetryMaxOutboundStreams,
        runOnLimitedConnection: true,
      }),
    ),
  )
  if (answer.verified != null) options.onVerified?.(answer.verified, answer.integrity)
  return answer.ack
}

export type TelemetrySample = Omit<TelemetryReport, 'v' | 'seq'>

export interface TelemetryReporterInit {
  /** Sends one report (sendTelemetry bound to the head); the signal aborts when the reporter stops. */
  send: (report: TelemetryReport, options: { signal: AbortSignal }) => Promise<TelemetryAck>
  /** Reads the engine's metrics and the host state now. */
  collect: (options: { signal: AbortSignal }) => Promise<TelemetrySample>
  intervalMs: number
  /** The head forgot this node (called on every such answer): join again; the reporter keeps ticking. */
  onNotJoined: () => void
  /** A collect or send failed; the next tick tries again with a fresh report. */
  onError?: (err: Error) => void
  logger?: Logger
}

/**
 * The node side of telemetry: reports at once on start(), then every intervalMs. A tick that comes
 * while a report is still in flight is skipped, so reports never overlap.
 */
export class TelemetryReporter {
  private readonly init: TelemetryReporterInit
  private readonly log: Logger
  private timer: ReturnType<typeof setInterval> | null = null
  private controller: AbortController | null = null
  /** The controller of the run whose report is in flight; a restarted run does not wait for an aborted one. */
  private inFlight: AbortController | null = null
  private seq = 0

  constructor(init: TelemetryReporterInit) {
    if (!(Number.isFinite(init.intervalMs) && init.intervalMs > 0)) {
      throw new RangeError('telemetry intervalMs must be a positive number')
    }
    this.init = init
    this.log = (init.logger ?? silentLogger).child({ component: 'daemon:telemetry' })
  }

  get running(): boolean {
    return this.timer != null
  }

  start(): void {
    if (this.timer != null) return
    this.controller = new AbortController()
    this.timer = setInterval(() => void this.tick(), this.init.intervalMs)
    void this.tick()
  }

  stop(): void {
    if (this.timer == null) return
    clearInterval(this.timer)
    this.timer = null
    this.controller?.abort()
    this.controller = null
  }

  private async tick(): Promise<void> {
    const controller = this.controller
    if (controller == null || this.inFlight === controller) return
    this.inFlight = controller
    try {
      const sample = await this.init.collect({ signal: controller.signal })
      // seq counts attempts: the head ignores a number it has seen, and gaps are harmless.
      this.seq += 1
      const ack = await this.init.send({ ...sample, v: 1, seq: this.seq }, { signal: controller.signal })
      if (controller.signal.aborted) return
      // Keeps ticking: once the owner has joined again, the next report is answered 'ok'.
      if (ack === 'not_joined' || ack === 'reassign') this.init.onNotJoined()
    } catch (err) {
      if (controller.signal.aborted) return
      this.log.warn({ err }, 'telemetry report failed; retrying at the next tick')
      this.init.onError?.(err as Error)
    } finally {
      if (this.inFlight === controller) this.inFlight = null
    }
  }
}
