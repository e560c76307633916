import type { PeerId } from '@libp2p/interface'
import { type ApiError, apiError, type HttpErrorCodeName } from '../core/errors.ts'
import { InferConnectError, type InferResponse } from '../mesh/infer-protocol.ts'
import type { AnswerCapture } from './integrity.ts'
import { type AnswerSink, type RelayOutcome, relayAnswer } from './relay.ts'
import type { PreparedRequest } from './request.ts'

/**
 * The one proxy-with-failover loop: the regional head runs it over its nodes, the federation over
 * regions. Each attempt picks a target, sends the request over /garage/infer/1.0.0 and, when the
 * target fails or answers with a retryable status before any byte reached the asker, tries the next
 * one (at most `maxAttempts`). Once an answer starts, it is relayed to the end: after the first byte
 * nothing is retried, and a broken stream ends with an SSE error event (relay.ts).
 *
 * What differs between the roles is a `ProxyRoute`: how a target is picked and reached, which
 * statuses mean "try another", what the asker sees when none is left, and what is counted.
 */

/** One request on its way through a hop. */
export interface ProxyCall {
  model: string
  path: string
  /** The body to send on (openai/request.ts upstreamBody). */
  body: Uint8Array
  prepared: PreparedRequest
  requestId: string
  sink: AnswerSink
  /** performance.now() when the request reached this hop. */
  started: number
}

/** A target's in-flight request, as its router counts it. */
export interface ProxyTicket {
  /** The first streamed byte arrived (decode time starts here). */
  firstByte(): void
  /** Ends the request (idempotent); ok only when the answer went through whole. */
  end(ok: boolean, completionTokens: number): void
}

/** `A`: how a target is reached (a PeerId over the mesh; a head also reaches its groups' local vLLM). */
export interface ProxyRoute<C extends ProxyCall = ProxyCall, A = PeerId> {
  /** How messages name a target: 'node', 'region'. */
  readonly noun: string
  readonly maxAttempts: number
  /** Statuses that mean "try another target" while nothing has reached the asker. */
  readonly retryableStatuses: ReadonlySet<number>
  /** The code when a target could not be dialled: `node_unreachable`, `region_unreachable`. */
  readonly unreachableCode: HttpErrorCodeName
  /** The next target for the call, not one of `tried`; null when none is left. */
  pick(call: C, tried: ReadonlySet<string>): string | null
  /** Where the target is reached; null skips it (it vanished since it was picked). */
  peerOf(target: string): A | null
  /** The call is sent to the target now; the ticket ends it whatever happens (exactly once). */
  begin(target: string, call: C): ProxyTicket
  /** The target proved healthy or broken (never called when the asker left or sent a bad request). */
  success(target: string): void
  failure(target: string): void
  /** An attempt failed before the first byte and the loop moves on; `err` when it threw. */
  retried(call: C, target: string, reason: string, err: Error | null): void
  /** The error the asker gets if no other target helps, from a retryable answer (read or drain its body). */
  refusal(call: C, target: string, response: InferResponse): Promise<ApiError>
  /** Headers the asker gets with the answer. */
  answerHeaders(call: C, target: string, response: InferResponse): Record<string, string>
  /**
   * The answer is about to be relayed: a capture when an integrity check sampled it (its text is
   * kept as it passes), null otherwise (optional; openai/integrity.ts).
   */
  capture?(call: C, target: string, response: InferResponse): AnswerCapture | null
  /** The answer starts: its head arrived. */
  answering(call: C, target: string, response: InferResponse): void
  /** A streamed answer was written on: `completionTokens` relayed so far (optional). */
  streamed?(call: C, target: string, response: InferResponse, completionTokens: number): void
  /** The answer ended: `outcome` null when relaying it threw. Always called once after answering(). */
  answered(call: C, target: string, response: InferResponse, outcome: RelayOutcome | null): void
  /** What the asker gets when no target was left to try. */
  noCapacity(call: C): ApiError
  /** Sends the request to a target (sendInferRequest over the hop's mesh node). */
  send(peer: A, call: C, signal: AbortSignal): Promise<InferResponse>
}

/** The request as it goes to the next hop. */
export function proxyRequest(call: ProxyCall): {
  method: string
  path: string
  headers: Array<[string, string]>
  body: Uint8Array
} {
  return {
    method: 'POST',
    path: call.path,
    headers: [
      ['content-type', 'application/json'],
      ['x-request-id', call.requestId],
    ],
    body: call.body,
  }
}

/**
 * Routes `call` through `route` and relays the answer to `call.sink`. Resolves once the answer was
 * relayed (or the asker left); throws the ApiError the asker should get when every attempt failed
 * before its first byte.
 */
export async function proxyWithFailover<C extends ProxyCall, A = PeerId>(
  call: C,
  route: ProxyRoute<C, A>,
): Promise<void> {
  const { sink } = call
  const tried = new Set<string>()
  let lastError: ApiError | null = null
  for (let i = 0; i < route.maxAttempts && !sink.gone.aborted; i++) {
    const target = route.pick(call, tried)
    if (target == null) break
    tried.add(target)
    const peer = route.peerOf(target)
    if (peer == null) continue
    const ticket = route.begin(target, call)
    let response: InferResponse
    try {
      response = await route.send(peer, call, sink.gone)
    } catch (err) {
      ticket.end(false, 0)
      if (sink.gone.aborted) return
      route.failure(target)
      const e = err as Error
      route.retried(call, target, e.name, e)
      lastError =
        err instanceof InferConnectError
          ? apiError(route.unreachableCode, `${route.noun} ${target} could not be reached: ${e.message}`)
          : apiError('node_failed', `${route.noun} ${target} failed: ${e.message}`)
      continue
    }
    if (route.retryableStatuses.has(response.status)) {
      // Nothing reached the asker yet: another target may take it (a full queue, a draining engine).
      const refusal = await route.refusal(call, target, response)
      ticket.end(false, 0)
      if (response.status >= 500) route.failure(target)
      route.retried(call, target, `status_${response.status}`, null)
      lastError = refusal
      continue
    }
    route.answering(call, target, response)
    let outcome: RelayOutcome
    try {
      outcome = await relayAnswer(
        response,
        sink,
        call.prepared,
        route.answerHeaders(call, target, response),
        ticket.firstByte,
        route.streamed != null ? (tokens) => route.streamed!(call, target, response, tokens) : undefined,
        route.capture?.(call, target, response) ?? null,
      )
    } catch (err) {
      ticket.end(false, 0)
      if (!sink.gone.aborted) route.failure(target)
      route.answered(call, target, response, null)
      throw err
    }
    const ok = outcome.interrupted == null
    ticket.end(ok, outcome.completionTokens)
    if (ok) route.success(target)
    else if (!sink.gone.aborted) route.failure(target)
    route.answered(call, target, response, outcome)
    return
  }
  if (sink.gone.aborted) return
  throw lastError ?? route.noCapacity(call)
}

/** Reads and drops an answer that will not be relayed, so its stream can be reused. */
export async function drainQuietly(response: InferResponse): Promise<void> {
  try {
    for await (const _ of response.body) {
      // discarded
    }
  } catch {
    // the stream is gone; nothing to reuse
  }
}

/** The first `maxBytes` of an answer's body as text (an error body to quote). */
export async function readText(response: InferResponse, maxBytes = 64 * 1024): Promise<string> {
  const chunks: Uint8Array[] = []
  let size = 0
  try {
    for await (const chunk of response.body) {
      size += chunk.byteLength
      if (size > maxBytes) break
      chunks.push(chunk)
    }
  } catch {
    // an error body cut short: what arrived is enough to quote
  }
  return Buffer.concat(chunks).toString('utf8')
}
