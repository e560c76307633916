import type { PeerId } from '@libp2p/interface'
import { type ApiError, apiError } from '../../core/errors.ts'
import type { Logger } from '../../core/logger.ts'
import { type InferResponse, sendInferRequest } from '../../mesh/infer-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { PeerIdCache } from '../../mesh/peer-ids.ts'
import {
  drainQuietly,
  type ProxyCall,
  type ProxyRoute,
  type ProxyTicket,
  proxyRequest,
} from '../../openai/proxy.ts'
import type { RelayOutcome } from '../../openai/relay.ts'
import type { VerifiedThroughput } from '../../openai/usage.ts'
import type { RegionalRouter } from '../../routing/node-router.ts'
import type { PendingTokens } from './admission.ts'
import type { HeadMetrics } from './metrics.ts'

/** Node answers that mean "try someone else" when nothing has reached the asker yet. */
export const headRetryableStatuses: ReadonlySet<number> = new Set([429, 500, 502, 503, 504])

export interface HeadRouteInit {
  region: string
  /** Nodes a request may try before its first byte. */
  maxAttempts: number
  /** Timeouts of one hop to a node. */
  firstByteTimeoutMs?: number
  idleTimeoutMs?: number
  logger: Logger
}

export interface HeadRouteComponents {
  /** Sends to nodes; null in tests that stub send(). */
  node: MeshNode | null
  router: RegionalRouter
  verified: VerifiedThroughput
  pending: PendingTokens
  metrics: HeadMetrics
}

/** Per request: the tokens it may still produce, held against its node's telemetry check. */
interface HeadCall extends ProxyCall {
  inFlight?: number
}

/**
 * How the regional head runs the shared failover loop (openai/proxy.ts): over the nodes of the
 * model's pool, as the router picks them, counting verified tokens for each node.
 */
export class HeadRoute implements ProxyRoute<HeadCall> {
  readonly noun = 'node'
  readonly retryableStatuses = headRetryableStatuses
  readonly unreachableCode = 'node_unreachable' as const
  readonly maxAttempts: number
  readonly #init: HeadRouteInit
  readonly #c: HeadRouteComponents
  readonly #peerIds = new PeerIdCache()

  constructor(init: HeadRouteInit, components: HeadRouteComponents) {
    this.#init = init
    this.#c = components
    this.maxAttempts = init.maxAttempts
  }

  /** Forgets a node's parsed PeerId (it left). */
  forget(peer: string): void {
    this.#peerIds.delete(peer)
  }

  pick(call: HeadCall, tried: ReadonlySet<string>): string | null {
    return this.#c.router.pick(call.model, { exclude: tried })
  }

  peerOf(target: string): PeerId {
    return this.#peerIds.get(target)
  }

  begin(target: string): ProxyTicket {
    const ticket = this.#c.router.begin(target)
    return {
      firstByte: () => ticket.firstByte(),
      end: (ok, completionTokens) => ticket.end({ ok, completionTokens }),
    }
  }

  success(target: string): void {
    this.#c.router.success(target)
  }

  failure(target: string): void {
    this.#c.router.failure(target)
  }

  send(peer: PeerId, call: HeadCall, signal: AbortSignal): Promise<InferResponse> {
    const { node } = this.#c
    if (node == null) throw new Error('the head route has no mesh node to send with')
    return sendInferRequest(node, peer, proxyRequest(call), {
      signal,
      ...(this.#init.firstByteTimeoutMs != null ? { firstByteTimeoutMs: this.#init.firstByteTimeoutMs } : {}),
      ...(this.#init.idleTimeoutMs != null ? { idleTimeoutMs: this.#init.idleTimeoutMs } : {}),
    })
  }

  retried(call: HeadCall, target: string, reason: string, err: Error | null): void {
    this.#c.metrics.retries.inc({ reason })
    if (err != null)
      this.#init.logger.debug(
        { requestId: call.requestId, node: target, err: err.message },
        'node failed before the first byte',
      )
  }

  async refusal(_call: HeadCall, target: string, response: InferResponse): Promise<ApiError> {
    void drainQuietly(response)
    return response.status === 429
      ? apiError('region_overloaded', `node ${target} answered ${response.status}`, {
          headers: { 'retry-after': '1' },
        })
      : apiError('node_failed', `node ${target} answered ${response.status}`, {
          headers: { 'retry-after': '1' },
        })
  }

  answerHeaders(call: HeadCall, target: string): Record<string, string> {
    // Which volunteer served it: the federation credits it, and a consumer can cite it.
    return { 'x-request-id': call.requestId, 'x-garage-node': target, 'x-garage-region': this.#init.region }
  }

  answering(call: HeadCall, target: string): void {
    this.#c.metrics.ttft.observe({ model: call.model }, (performance.now() - call.started) / 1000)
    call.inFlight = (call.prepared.maxTokens ?? 4096) * call.prepared.n
    this.#c.pending.add(target, call.inFlight)
  }

  answered(call: HeadCall, target: string, response: InferResponse, outcome: RelayOutcome | null): void {
    const { metrics } = this.#c
    if (outcome != null) {
      const tokens = outcome.completionTokens
      this.#c.verified.add(target, tokens)
      metrics.regionTokens.inc({ model: call.model }, tokens)
      if (outcome.interrupted != null) {
        metrics.streamErrors.inc()
        if (!call.sink.gone.aborted)
          this.#init.logger.warn(
            { requestId: call.requestId, node: target, err: outcome.interrupted.message },
            'stream failed after its first byte',
          )
      }
      metrics.requests.inc({ model: call.model, status: String(response.status) })
    }
    this.#c.pending.add(target, -(call.inFlight ?? 0))
    metrics.duration.observe({ model: call.model }, (performance.now() - call.started) / 1000)
  }

  noCapacity(call: HeadCall): ApiError {
    return apiError(
      'no_capacity',
      `no node of region ${this.#init.region} can take a ${call.model} request right now`,
      {
        headers: { 'retry-after': '2' },
      },
    )
  }
}
