import type { PeerId } from '@libp2p/interface'
import { ApiError, apiError } from '../core/errors.ts'
import type { Logger } from '../core/logger.ts'
import { type InferResponse, sendInferRequest } from '../mesh/infer-protocol.ts'
import type { MeshNode } from '../mesh/node.ts'
import { PeerIdCache } from '../mesh/peer-ids.ts'
import { proxiedKind } from '../openai/endpoints.ts'
import type { AnswerCapture } from '../openai/integrity.ts'
import { type ProxyCall, type ProxyRoute, type ProxyTicket, proxyRequest, readText } from '../openai/proxy.ts'
import type { RelayOutcome } from '../openai/relay.ts'
import { tokenBudget } from '../openai/usage.ts'
import type { FederationRouter } from '../routing/region-router.ts'
import type { DirectAttempt, DirectPath } from './direct.ts'
import type { KeyInfo } from './keys.ts'
import type { UsageLedger } from './ledger.ts'
import type { FederationMetrics } from './metrics.ts'
import type { KeyLimiter } from './rate-limit.ts'

/**
 * Head answers that mean "try another region" while nothing has reached the client (404: the
 * region stopped serving the model since the last refresh).
 */
export const federationRetryableStatuses: ReadonlySet<number> = new Set([404, 429, 500, 502, 503, 504])

/** One request at the gateway: who pays, which region the client prefers, what the metrics say. */
export interface FederationCall extends ProxyCall {
  key: KeyInfo
  /** X-Garage-Region. */
  prefer: string | undefined
  /** Labels of the request's metrics, filled in as it goes. */
  labels: { model: string; region: string }
  /** The region of the attempt under way. */
  attemptRegion?: string
  /** The attempt's answer comes straight from a node (the direct path), not through its head. */
  direct?: DirectAttempt | null
  /** What the ledger has of this answer so far (a stream is billed as it streams). */
  billed?: { requests: number; completionTokens: number; servedBy: ReturnType<typeof servedByOf> }
}

export interface RegionRouteInit {
  maxAttempts: number
  firstByteTimeoutMs: number
  logger: Logger
}

export interface RegionRouteComponents {
  /** Sends to heads; null in tests that stub send(). */
  node: MeshNode | null
  router: FederationRouter
  /** The head of a region now (the directory's view). */
  headOf(region: string): string | null
  /** The direct path: requests straight to leased nodes; null sends everything through heads. */
  direct?: DirectPath | null
  ledger: Pick<UsageLedger, 'record'>
  limiter: Pick<KeyLimiter, 'record'>
  metrics: FederationMetrics
}

/**
 * How the federation runs the shared failover loop (openai/proxy.ts): over the regions that serve
 * the model, as the region router picks them; bills the key and credits the node that served.
 */
export class RegionRoute implements ProxyRoute<FederationCall> {
  readonly noun = 'region'
  readonly retryableStatuses = federationRetryableStatuses
  readonly unreachableCode = 'region_unreachable' as const
  readonly maxAttempts: number
  readonly #init: RegionRouteInit
  readonly #c: RegionRouteComponents
  readonly #headIds = new PeerIdCache(1024)

  constructor(init: RegionRouteInit, components: RegionRouteComponents) {
    this.#init = init
    this.#c = components
    this.maxAttempts = init.maxAttempts
  }

  pick(call: FederationCall, tried: ReadonlySet<string>): string | null {
    return this.#c.router.pick(call.model, {
      ...(call.prefer != null ? { prefer: call.prefer } : {}),
      exclude: tried,
    })
  }

  peerOf(region: string): PeerId | null {
    const head = this.#c.headOf(region)
    return head == null ? null : this.#headIds.get(head)
  }

  begin(region: string, call: FederationCall): ProxyTicket {
    const ticket = this.#c.router.begin(region)
    call.attemptRegion = region
    call.direct = null
    const direct = this.#c.direct
    return {
      firstByte: () => {
        if (call.direct != null) direct?.firstByte(call.direct)
      },
      end: (ok, completionTokens) => {
        ticket.end(ok)
        if (call.direct != null) direct?.ended(call.direct, ok, completionTokens)
        call.direct = null
      },
    }
  }

  success(region: string): void {
    this.#c.router.success(region)
  }

  failure(region: string): void {
    this.#c.router.failure(region)
  }

  async send(peer: PeerId, call: FederationCall, signal: AbortSignal): Promise<InferResponse> {
    const { node, direct } = this.#c
    if (node == null) throw new Error('the region route has no mesh node to send with')
    const request = proxyRequest(call)
    if (direct != null && call.attemptRegion != null) {
      // Straight to a node the head leased us; through the head when that cannot be.
      const got = await direct.send(
        call.attemptRegion,
        call.model,
        request,
        tokenBudget(call.prepared),
        signal,
      )
      if (got != null) {
        call.direct = got.attempt
        return got.response
      }
    }
    return sendInferRequest(node, peer, request, {
      signal,
      firstByteTimeoutMs: this.#init.firstByteTimeoutMs,
    })
  }

  retried(call: FederationCall, region: string, reason: string, err: Error | null): void {
    this.#c.metrics.failovers.inc({ reason })
    if (err != null)
      this.#init.logger.warn(
        { requestId: call.requestId, region, err: err.message },
        'region failed before the first byte',
      )
  }

  async refusal(_call: FederationCall, region: string, response: InferResponse): Promise<ApiError> {
    return passThroughError(response.status, await readText(response), region)
  }

  answerHeaders(call: FederationCall, region: string, response: InferResponse): Record<string, string> {
    const header = (name: string): string => response.headers.find(([k]) => k === name)?.[1] ?? ''
    const servedBy = header('x-garage-node')
    const shares = header('x-garage-node-shares')
    return {
      'x-request-id': call.requestId,
      'x-garage-region': region,
      // Straight from the node the head leased (`direct`), or through the region's head (`head`).
      'x-garage-path': call.direct != null ? 'direct' : 'head',
      ...(servedBy !== '' ? { 'x-garage-node': servedBy } : {}),
      ...(shares !== '' ? { 'x-garage-node-shares': shares } : {}),
    }
  }

  /**
   * A direct answer is sampled for the head's integrity check at its lease's rate (the head never
   * sees it); an answer through the head is the head's to sample.
   */
  capture(call: FederationCall): AnswerCapture | null {
    const kind = proxiedKind(call.path)
    if (call.direct == null || kind == null || this.#c.direct == null) return null
    return this.#c.direct.capture(call.direct, {
      kind,
      model: call.model,
      body: call.prepared.body,
      requestId: call.requestId,
    })
  }

  answering(call: FederationCall, region: string): void {
    call.labels.region = region
    this.#c.metrics.ttft.observe({ model: call.model, region }, (performance.now() - call.started) / 1000)
    if (call.prepared.stream) this.#c.metrics.activeStreams.value++
  }

  /**
   * Bills a stream as it is relayed, write by write, so a gateway killed mid-stream has billed what
   * its client received but for the writes not yet in the store (the ledger writes once a turn).
   */
  streamed(call: FederationCall, region: string, response: InferResponse, completionTokens: number): void {
    if (response.status === 200) this.#bill(call, region, response, 0, completionTokens)
  }

  /**
   * Records what the ledger does not have yet of this answer: the request (once), the completion
   * tokens past those billed so far, and `promptTokens`. The key is billed, the node credited.
   */
  #bill(
    call: FederationCall,
    region: string,
    response: InferResponse,
    promptTokens: number,
    completionTokens: number,
  ): void {
    // Who served it is read from the answer's head once, not at every write.
    call.billed ??= { requests: 0, completionTokens: 0, servedBy: servedByOf(response) }
    const billed = call.billed
    const more = Math.max(0, completionTokens - billed.completionTokens)
    if (billed.requests > 0 && more === 0 && promptTokens === 0) return
    this.#c.ledger.record({
      keyId: call.key.id,
      model: call.model,
      region,
      ...billed.servedBy,
      requests: billed.requests > 0 ? 0 : 1,
      promptTokens,
      completionTokens: more,
    })
    billed.requests = 1
    billed.completionTokens += more
  }

  answered(
    call: FederationCall,
    region: string,
    response: InferResponse,
    outcome: RelayOutcome | null,
  ): void {
    const { metrics } = this.#c
    if (outcome != null) {
      if (response.status === 200) {
        // The client received these tokens (what streamed was billed as it went: the rest, and the
        // prompt, now).
        this.#bill(call, region, response, outcome.promptTokens, outcome.completionTokens)
        this.#c.limiter.record(call.key.id, outcome.promptTokens + outcome.completionTokens)
        metrics.tokens.inc({ model: call.model, kind: 'prompt' }, outcome.promptTokens)
        metrics.tokens.inc({ model: call.model, kind: 'completion' }, outcome.completionTokens)
        const key = metrics.keyLabel(call.key.name)
        metrics.keyTokens.inc({ key, kind: 'prompt' }, outcome.promptTokens)
        metrics.keyTokens.inc({ key, kind: 'completion' }, outcome.completionTokens)
      }
      metrics.requests.inc({ model: call.model, region, status: String(response.status) })
      metrics.keyRequests.inc({ key: metrics.keyLabel(call.key.name), status: String(response.status) })
    }
    if (call.prepared.stream) metrics.activeStreams.value--
    metrics.e2e.observe({ model: call.model, region }, (performance.now() - call.started) / 1000)
  }

  noCapacity(call: FederationCall): ApiError {
    return apiError('no_capacity', `no region can take a ${call.model} request right now; retry shortly`, {
      headers: { 'retry-after': '2' },
    })
  }
}

/**
 * Who served an answer, as its head said: one node (`x-garage-node`), or a pipeline group's members
 * with their shares (`x-garage-node: a,b,c`, `x-garage-node-shares: 11,11,10`).
 */
function servedByOf(response: InferResponse): {
  node: string
  nodes?: Array<{ node: string; weight: number }>
} {
  const header = (name: string): string => response.headers.find(([k]) => k === name)?.[1] ?? ''
  const served = header('x-garage-node')
  if (!served.includes(',')) return { node: served }
  const members = served
    .split(',')
    .filter((n) => n !== '')
    .slice(0, 64)
  const shares = header('x-garage-node-shares').split(',').map(Number)
  return {
    node: members[0] ?? '',
    nodes: members.map((node, i) => ({ node, weight: shares[i] != null && shares[i]! > 0 ? shares[i]! : 1 })),
  }
}

/** A head's error answer, kept as the client will see it when no other region can help. */
export function passThroughError(status: number, text: string, region: string): ApiError {
  try {
    const body = JSON.parse(text) as { error?: { message?: string; code?: unknown; param?: string } }
    if (body.error?.message != null) {
      const code = body.error.code
      return new ApiError(status, `region ${region}: ${body.error.message}`, {
        ...(code != null ? { code: String(code) } : {}),
        ...(body.error.param != null ? { param: body.error.param } : {}),
        ...(status === 429 || status === 503 ? { headers: { 'retry-after': '1' } } : {}),
      })
    }
  } catch {
    // not JSON: fall through
  }
  return apiError('node_failed', `region ${region} answered ${status}`)
}
