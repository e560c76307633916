import { request as httpRequest } from 'node:http'
import type { PeerId } from '@libp2p/interface'
import { type ApiError, apiError } from '../../core/errors.ts'
import type { Logger } from '../../core/logger.ts'
import { InferConnectError, type InferResponse, sendInferRequest } from '../../mesh/infer-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { PeerIdCache } from '../../mesh/peer-ids.ts'
import { chatCompletionsPath as chatPath, proxiedKind } from '../../openai/endpoints.ts'
import { AnswerCapture, buildSample, sampleDecision } from '../../openai/integrity.ts'
import {
  drainQuietly,
  type ProxyCall,
  type ProxyRoute,
  type ProxyTicket,
  proxyRequest,
} from '../../openai/proxy.ts'
import type { RelayOutcome } from '../../openai/relay.ts'
import { tokenBudget, type VerifiedThroughput } from '../../openai/usage.ts'
import type { RegionalRouter } from '../../routing/node-router.ts'
import type { PendingTokens } from './admission.ts'
import { isGroupTarget, type RayGroups } from './groups.ts'
import type { IntegrityChecker } from './integrity.ts'
import type { HeadMetrics } from './metrics.ts'

/** A group's vLLM answers its first byte within this, as a node does over the mesh. */
const defaultGroupFirstByteTimeoutMs = 60_000

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
  /** The region's pipeline groups (their vLLM listens on this machine); null when it has none. */
  groups?: RayGroups | null
  router: RegionalRouter
  verified: VerifiedThroughput
  pending: PendingTokens
  metrics: HeadMetrics
  /** Result integrity: which answers to sample, and where samples go; null: nothing is checked. */
  integrity?: IntegrityChecker | null
}

/** Per request: the tokens it may still produce, held against its node's telemetry check. */
interface HeadCall extends ProxyCall {
  inFlight?: number
  /** The answer's text, kept only when an integrity check sampled it. */
  capture?: AnswerCapture
}

/** Where a target is reached: a node over the mesh, or a pipeline group's vLLM on this machine. */
export type HeadTarget =
  | { kind: 'node'; peer: PeerId }
  | { kind: 'group'; target: string; baseUrl: string; apiKey: string }

/**
 * How the regional head runs the shared failover loop (openai/proxy.ts): over the nodes of the
 * model's pool (and the model's pipeline group), as the router picks them, counting verified tokens
 * for each.
 */
export class HeadRoute implements ProxyRoute<HeadCall, HeadTarget> {
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

  peerOf(target: string): HeadTarget | null {
    if (isGroupTarget(target)) {
      const endpoint = this.#c.groups?.endpoint(target)
      return endpoint == null
        ? null
        : { kind: 'group', target, baseUrl: endpoint.baseUrl, apiKey: endpoint.apiKey }
    }
    return { kind: 'node', peer: this.#peerIds.get(target) }
  }

  begin(target: string, call: HeadCall): ProxyTicket {
    const ticket = this.#c.router.begin(target)
    // The node may generate from the moment it has the request: its budget is pending from here,
    // not from the first byte, which a slow link delays while tokens are made (an honest node's
    // report then ran ahead of what the head had seen, and it was flagged for a moment).
    const budget = tokenBudget(call.prepared)
    call.inFlight = budget
    this.#c.pending.add(target, budget)
    let ended = false
    return {
      firstByte: () => ticket.firstByte(),
      end: (ok, completionTokens) => {
        if (!ended) this.#c.pending.add(target, -budget)
        ended = true
        ticket.end({ ok, completionTokens })
      },
    }
  }

  success(target: string): void {
    this.#c.router.success(target)
  }

  failure(target: string): void {
    this.#c.router.failure(target)
  }

  send(to: HeadTarget, call: HeadCall, signal: AbortSignal): Promise<InferResponse> {
    if (to.kind === 'group') return this.#sendToGroup(to, call, signal)
    const { node } = this.#c
    if (node == null) throw new Error('the head route has no mesh node to send with')
    return sendInferRequest(node, to.peer, proxyRequest(call), {
      signal,
      ...(this.#init.firstByteTimeoutMs != null ? { firstByteTimeoutMs: this.#init.firstByteTimeoutMs } : {}),
      ...(this.#init.idleTimeoutMs != null ? { idleTimeoutMs: this.#init.idleTimeoutMs } : {}),
    })
  }

  /** A pipeline group's vLLM, on this machine's loopback, with its key. */
  #sendToGroup(
    to: { baseUrl: string; apiKey: string },
    call: HeadCall,
    signal: AbortSignal,
  ): Promise<InferResponse> {
    const request = proxyRequest(call)
    const firstByteMs = this.#init.firstByteTimeoutMs ?? defaultGroupFirstByteTimeoutMs
    return new Promise((resolve, reject) => {
      const req = httpRequest(
        `${to.baseUrl}${request.path}`,
        {
          method: request.method,
          headers: Object.fromEntries([...request.headers, ['authorization', `Bearer ${to.apiKey}`]]),
          signal,
        },
        (res) => {
          clearTimeout(timer)
          resolve({
            status: res.statusCode ?? 502,
            headers: [['content-type', String(res.headers['content-type'] ?? 'application/json')]],
            body: (async function* () {
              for await (const chunk of res) yield chunk as Uint8Array
            })(),
          })
        },
      )
      const timer = setTimeout(
        () => req.destroy(new Error(`no answer within ${firstByteMs} ms`)),
        firstByteMs,
      )
      req.on('error', (err) => {
        clearTimeout(timer)
        reject(new InferConnectError(`the group's vLLM did not answer: ${err.message}`, { cause: err }))
      })
      req.end(request.body)
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
    // Which volunteer served it: the federation credits it, and a consumer can cite it. A group's
    // answer names every member, with the share of the tokens each stage earns.
    if (isGroupTarget(target)) {
      const members = this.#c.groups?.members(target) ?? []
      return {
        'x-request-id': call.requestId,
        'x-garage-node': members.map((m) => m.node).join(','),
        'x-garage-node-shares': members.map((m) => String(m.weight)).join(','),
        'x-garage-region': this.#init.region,
      }
    }
    return { 'x-request-id': call.requestId, 'x-garage-node': target, 'x-garage-region': this.#init.region }
  }

  /** Samples the answer for an integrity check at the node's rate (decided before it is relayed). */
  capture(call: HeadCall, target: string): AnswerCapture | null {
    const integrity = this.#c.integrity
    const kind = proxiedKind(call.path)
    if (integrity == null || kind == null || isGroupTarget(target)) return null
    if (!sampleDecision(kind, call.prepared.body, integrity.rateFor(target))) return null
    call.capture = new AnswerCapture()
    return call.capture
  }

  answering(call: HeadCall, _target: string): void {
    this.#c.metrics.ttft.observe({ model: call.model }, (performance.now() - call.started) / 1000)
  }

  answered(call: HeadCall, target: string, response: InferResponse, outcome: RelayOutcome | null): void {
    const { metrics } = this.#c
    if (outcome != null) {
      const tokens = outcome.completionTokens
      this.#c.verified.add(target, tokens)
      if (isGroupTarget(target)) this.#c.groups?.served(target, tokens)
      metrics.regionTokens.inc({ model: call.model }, tokens)
      // Cut mid-stream (its client left, the hop to it broke): the node generated on until the
      // reset reached it, unseen.
      if (outcome.interrupted != null) this.#c.verified.abandoned(target, (call.inFlight ?? 0) - tokens)
      if (outcome.interrupted != null) {
        metrics.streamErrors.inc()
        if (!call.sink.gone.aborted)
          this.#init.logger.warn(
            { requestId: call.requestId, node: target, err: outcome.interrupted.message },
            'stream failed after its first byte',
          )
      }
      metrics.requests.inc({ model: call.model, status: String(response.status) })
      try {
        this.#sampled(call, target, response, outcome)
      } catch (err) {
        // A check is the head's own business: it never fails the answer it looks at.
        this.#init.logger.warn({ err, requestId: call.requestId }, 'integrity sample failed')
      }
    }
    // Relaying it threw: nothing was counted, and the node may have generated up to the reset.
    if (outcome == null) this.#c.verified.abandoned(target, call.inFlight ?? 0)
    metrics.duration.observe({ model: call.model }, (performance.now() - call.started) / 1000)
  }

  /** Hands a sampled, whole answer to the integrity check; counts what the node was credited. */
  #sampled(call: HeadCall, target: string, response: InferResponse, outcome: RelayOutcome): void {
    const integrity = this.#c.integrity
    if (integrity == null || isGroupTarget(target)) return
    integrity.credited(target, outcome.completionTokens)
    const output = call.capture?.output()
    if (output == null || outcome.interrupted != null || response.status !== 200) return
    const sample = buildSample({
      model: call.model,
      node: target,
      operator: target,
      endpoint: call.path === chatPath ? 'chat' : 'completion',
      request: call.prepared.body,
      output,
      requestId: call.requestId,
      at: Date.now(),
    })
    if (sample != null) integrity.consider(sample)
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
