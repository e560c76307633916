import { randomUUID } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import type { PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { Counter, Gauge, Histogram, Registry } from 'prom-client'
import { ApiError, sendError } from '../../daemon/engines/openai-errors.ts'
import { GarageError } from '../../mesh/errors.ts'
import {
  handleInferProtocol,
  InferConnectError,
  type InferResponse,
  sendInferRequest,
} from '../../mesh/infer-protocol.ts'
import { handleJoinProtocol, JoinRefusedError } from '../../mesh/join-protocol.ts'
import { type Logger, silentLogger } from '../../mesh/logger.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { bearerMatches, parseJson, readJsonBodyBytes, upstreamBody } from '../../mesh/openai-http.ts'
import { type AnswerSink, httpSink, inferSink, relayAnswer, sendApiError } from '../../mesh/openai-relay.ts'
import { inferRequestBodyMaxBytes, JOIN_PROTOCOL, TELEMETRY_PROTOCOL } from '../../mesh/protocols.ts'
import type { RayCredentials } from '../../mesh/region-messages.ts'
import { loadOrCreateSecret } from '../../mesh/secret-file.ts'
import { handleTelemetryProtocol } from '../../mesh/telemetry-protocol.ts'
import { prepareUpstreamRequest, VerifiedThroughput } from '../../mesh/token-accounting.ts'
import { chooseAssignment } from './assign.ts'
import type { RegionPolicy } from './policy.ts'
import { NodeRegistry } from './registry.ts'
import { RegionalRouter } from './router.ts'

export interface RegionalHeadOptions {
  /** The head's libp2p node: its PeerId is the one the region certificate names. */
  node: MeshNode
  region: string
  policy: RegionPolicy
  /** Where the API token file lives (`head-api.token`, 0600). */
  dataDir: string
  /** The HTTP API binds here: loopback unless the coordinator says otherwise. */
  httpHost?: string
  /** 0 picks a free port. */
  httpPort?: number
  logger?: Logger
  /** The region's Ray head, when the policy runs a trusted cluster: its credentials go into assignments. */
  ray?: { credentials(): RayCredentials } | null
  /** Silence after which a node is evicted (default: the protocol's telemetry deadline). */
  telemetryDeadlineMs?: number
  /** Nodes a request may try before its first byte (default 3). */
  maxAttempts?: number
  /** PeerIds of the federation gateways allowed to send requests over /garage/infer/1.0.0. */
  federationPeers?: string[]
  /** Timeouts of one hop to a node (tests shorten them). */
  firstByteTimeoutMs?: number
  idleTimeoutMs?: number
}

export interface RegionalHead {
  /** e.g. http://127.0.0.1:9471 */
  url: string
  /** Bearer token the /v1 endpoints need (from `<dataDir>/head-api.token`). */
  apiToken: string
  registry: NodeRegistry
  router: RegionalRouter
  verified: VerifiedThroughput
  metrics: Registry
  /** Handles one request of the HTTP API. */
  serve(req: IncomingMessage, res: ServerResponse): Promise<void>
  /** Trust another federation gateway from now on (its PeerId). */
  allowFederation(peerId: string): void
  stop(): Promise<void>
}

export const defaultHeadHttpPort = 9471
export const headApiTokenFile = 'head-api.token'
/** Node answers that mean "try someone else" when nothing has reached the client yet. */
const retryableStatuses = new Set([429, 500, 502, 503, 504])

/** Reads and drops a response we will not relay, so its stream can be reused. */
async function drainQuietly(response: InferResponse): Promise<void> {
  try {
    for await (const _ of response.body) {
      // discarded
    }
  } catch {
    // the stream is gone; nothing to reuse
  }
}

/**
 * The regional head: admits nodes on /garage/join/1.0.0 with an assignment from the region policy,
 * keeps their telemetry, routes OpenAI requests to them over /garage/infer/1.0.0, and counts the
 * tokens it proxied (verified throughput). docs/region.md describes it.
 */
export async function startRegionalHead(options: RegionalHeadOptions): Promise<RegionalHead> {
  const { node, region, policy } = options
  const log = (options.logger ?? silentLogger).child({ component: 'head', region })
  const self = node.peerId.toString()
  const maxAttempts = options.maxAttempts ?? 3
  const apiToken = await loadOrCreateSecret(join(options.dataDir, headApiTokenFile))

  const registry = new NodeRegistry(
    options.telemetryDeadlineMs != null ? { deadlineMs: options.telemetryDeadlineMs } : {},
  )
  const router = new RegionalRouter()
  const verified = new VerifiedThroughput()

  const metrics = new Registry()
  const requests = new Counter({
    name: 'garage_head_requests_total',
    help: 'OpenAI requests the head answered, by model and HTTP status',
    labelNames: ['model', 'status'] as const,
    registers: [metrics],
  })
  const retries = new Counter({
    name: 'garage_head_retries_total',
    help: 'Requests moved to another node before their first byte, by reason',
    labelNames: ['reason'] as const,
    registers: [metrics],
  })
  const streamErrors = new Counter({
    name: 'garage_head_stream_errors_total',
    help: 'Responses that failed after their first byte (ended with an SSE error event)',
    registers: [metrics],
  })
  const ttft = new Histogram({
    name: 'garage_head_time_to_first_byte_seconds',
    help: 'From the request reaching the head to the first response byte from a node',
    labelNames: ['model'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [metrics],
  })
  const duration = new Histogram({
    name: 'garage_head_request_duration_seconds',
    help: 'Whole request, first byte in to last byte out',
    labelNames: ['model'] as const,
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
    registers: [metrics],
  })
  const regionTokens = new Counter({
    name: 'garage_head_completion_tokens_total',
    help: 'Completion tokens the head proxied and verified, by model',
    labelNames: ['model'] as const,
    registers: [metrics],
  })
  new Gauge({
    name: 'garage_head_nodes',
    help: 'Joined nodes by state',
    labelNames: ['state'] as const,
    registers: [metrics],
    collect() {
      this.reset()
      const counts: Record<string, number> = { starting: 0, serving: 0, paused: 0, draining: 0 }
      for (const n of registry.nodes()) counts[n.state] = (counts[n.state] ?? 0) + 1
      for (const [state, count] of Object.entries(counts)) this.set({ state }, count)
    },
  })
  const perNode = (name: string, help: string, value: (peer: string) => number): void => {
    new Gauge({
      name,
      help,
      labelNames: ['node', 'model'] as const,
      registers: [metrics],
      collect() {
        this.reset()
        for (const n of registry.nodes())
          this.set({ node: n.peerId, model: n.assignment.model }, value(n.peerId))
      },
    })
  }
  perNode('garage_head_node_verified_tokens', 'Completion tokens the head proxied for the node', (p) =>
    verified.verified(p),
  )
  perNode(
    'garage_head_node_reported_tokens',
    'Completion tokens the node says it generated since it joined',
    (p) => registry.get(p)?.telemetry?.tokensTotal ?? 0,
  )
  perNode('garage_head_node_flagged', '1 when the node claims over 10% more tokens than verified', (p) =>
    verified.flagged(p) ? 1 : 0,
  )
  perNode('garage_head_node_capacity_tokens_per_second', 'Capacity the head measured', (p) =>
    router.capacity(p),
  )
  perNode('garage_head_node_inflight', 'Requests the head has outstanding at the node', (p) =>
    router.inflight(p),
  )

  /** Upper bound of tokens in flight per node: its telemetry may count them before the head has. */
  const pending = new Map<string, number>()
  const addPending = (peer: string, n: number): void => {
    const v = (pending.get(peer) ?? 0) + n
    if (v <= 0) pending.delete(peer)
    else pending.set(peer, v)
  }

  /** PeerIds of the nodes, parsed once: a PeerId from a string costs a base58 decode and a key. */
  const peerIds = new Map<string, PeerId>()
  const peerIdOf = (peer: string): PeerId => {
    let id = peerIds.get(peer)
    if (id == null) {
      id = peerIdFromString(peer) as PeerId
      peerIds.set(peer, id)
    }
    return id
  }

  // Registry → router: the registry is the truth about membership, the router follows it.
  registry.addEventListener('node:left', (evt) => {
    const { peerId, reason } = evt.detail
    router.remove(peerId)
    peerIds.delete(peerId)
    // A node that comes back reports from zero again.
    verified.remove(peerId)
    log.info({ node: peerId, reason }, 'node left the region')
  })

  await handleJoinProtocol(node, {
    region,
    async onJoin(report, peer) {
      const ray =
        policy.ray?.enabled && policy.ray.trusted ? (options.ray?.credentials() ?? undefined) : undefined
      const assignment = chooseAssignment(
        policy,
        report,
        registry.replicasByModel({ except: peer.toString() }),
        self,
        ray,
      )
      if (assignment == null) {
        throw new JoinRefusedError(
          'no_assignment',
          `no model of region ${region} fits this node (VRAM cap ${report.vramCapMiB} MiB, RAM cap ${report.ramCapMiB} MiB, engines ${report.engines.join(', ') || 'none'})`,
        )
      }
      verified.remove(peer.toString())
      registry.join(peer.toString(), report, assignment)
      router.upsert(peer.toString(), {
        model: assignment.model,
        slots: assignment.engineArgs.parallel ?? 1,
        state: 'starting',
      })
      log.info({ node: peer.toString(), model: assignment.model, engine: assignment.engine }, 'node joined')
      return assignment
    },
    async onLeave(peer) {
      registry.leave(peer.toString())
    },
    onBadRequest(err, peer) {
      log.debug({ node: peer.toString(), err: err.message }, 'bad join request')
    },
  })

  await handleTelemetryProtocol(node, {
    onReport(report, peer) {
      const id = peer.toString()
      const outcome = registry.report(id, report)
      if (outcome !== 'ok') return outcome
      router.updateTelemetry(id, {
        running: report.running,
        waiting: report.waiting,
        kvCacheUsage: report.kvCacheUsage,
        state: report.state,
      })
      const change = verified.compare(id, report.tokensTotal, pending.get(id) ?? 0)
      if (change?.flagged === true) {
        log.warn(
          { node: id, reported: report.tokensTotal, verified: verified.verified(id) },
          'node claims more tokens than the head proxied for it (over 10%): flagged',
        )
      } else if (change != null) log.info({ node: id }, 'node claims are within bounds again')
      // The node shows what the head verified as its credits.
      return { ack: 'ok', verified: verified.verified(id) }
    },
    onBadRequest(err, peer) {
      log.debug({ node: peer.toString(), err: err.message }, 'bad telemetry report')
    },
  })
  registry.start()

  /** One attempt at one node; resolves with the node's response head or throws before any byte. */
  const attempt = async (
    peer: string,
    path: string,
    body: Uint8Array,
    requestId: string,
    signal: AbortSignal,
  ): Promise<InferResponse> => {
    return sendInferRequest(
      node,
      peerIdOf(peer),
      {
        method: 'POST',
        path,
        headers: [
          ['content-type', 'application/json'],
          ['x-request-id', requestId],
        ],
        body,
      },
      {
        signal,
        ...(options.firstByteTimeoutMs != null ? { firstByteTimeoutMs: options.firstByteTimeoutMs } : {}),
        ...(options.idleTimeoutMs != null ? { idleTimeoutMs: options.idleTimeoutMs } : {}),
      },
    )
  }

  /** Answers one generation request from its parsed body: routes it to a node and relays the answer. */
  const answer = async (
    kind: 'chat' | 'completion',
    path: string,
    raw: { json: unknown; bytes: Uint8Array },
    sink: AnswerSink,
    requestId: string,
    seen: { model: string },
  ): Promise<void> => {
    const started = performance.now()
    const prepared = prepareUpstreamRequest(raw.json, kind)
    const model = prepared.model
    const known = router.models().some((m) => m.model === model)
    const assigned = !known && registry.nodes().some((n) => n.assignment.model === model)
    // Labelled only when the region knows the model: made-up names must not grow /metrics.
    if (known || assigned) seen.model = model
    if (!known) {
      if (assigned)
        throw new ApiError(503, `no node of region ${region} is serving ${model} right now; retry shortly`, {
          code: 'no_capacity',
          headers: { 'retry-after': '2' },
        })
      throw new ApiError(404, `the model ${JSON.stringify(model)} is not served in region ${region}`, {
        code: 'model_not_found',
        param: 'model',
      })
    }
    const body = upstreamBody(raw.bytes, prepared)
    const tried = new Set<string>()
    let lastError: ApiError | null = null
    for (let i = 0; i < maxAttempts && !sink.gone.aborted; i++) {
      const peer = router.pick(model, { exclude: tried })
      if (peer == null) break
      tried.add(peer)
      const ticket = router.begin(peer)
      let response: InferResponse
      try {
        response = await attempt(peer, path, body, requestId, sink.gone)
      } catch (err) {
        ticket.end({ ok: false, completionTokens: 0 })
        if (sink.gone.aborted) return
        router.failure(peer)
        const reason = (err as Error).name
        retries.inc({ reason })
        log.debug({ requestId, node: peer, err: (err as Error).message }, 'node failed before the first byte')
        lastError = new ApiError(502, `node ${peer} failed: ${(err as Error).message}`, {
          code: err instanceof InferConnectError ? 'node_unreachable' : 'node_failed',
        })
        continue
      }
      if (retryableStatuses.has(response.status)) {
        // Nothing reached the asker yet: another node may take it (a full queue, a draining engine).
        void drainQuietly(response)
        ticket.end({ ok: false, completionTokens: 0 })
        if (response.status >= 500) router.failure(peer)
        retries.inc({ reason: `status_${response.status}` })
        lastError = new ApiError(
          response.status === 429 ? 429 : 502,
          `node ${peer} answered ${response.status}`,
          {
            code: response.status === 429 ? 'region_overloaded' : 'node_failed',
            headers: { 'retry-after': '1' },
          },
        )
        continue
      }
      ttft.observe({ model }, (performance.now() - started) / 1000)
      const inFlight = (prepared.maxTokens ?? 4096) * prepared.n
      addPending(peer, inFlight)
      try {
        const outcome = await relayAnswer(
          response,
          sink,
          prepared,
          // Which volunteer served it: the federation credits it, and a consumer can cite it.
          { 'x-request-id': requestId, 'x-garage-node': peer, 'x-garage-region': region },
          () => ticket.firstByte(),
        )
        const tokens = outcome.completionTokens
        verified.add(peer, tokens)
        regionTokens.inc({ model }, tokens)
        if (outcome.interrupted != null) {
          streamErrors.inc()
          ticket.end({ ok: false, completionTokens: tokens })
          if (!sink.gone.aborted) {
            router.failure(peer)
            log.warn(
              { requestId, node: peer, err: outcome.interrupted.message },
              'stream failed after its first byte',
            )
          }
        } else {
          ticket.end({ ok: true, completionTokens: tokens })
          router.success(peer)
        }
        requests.inc({ model, status: String(response.status) })
      } catch (err) {
        ticket.end({ ok: false, completionTokens: 0 })
        if (!sink.gone.aborted) router.failure(peer)
        throw err
      } finally {
        addPending(peer, -inFlight)
        duration.observe({ model }, (performance.now() - started) / 1000)
      }
      return
    }
    if (sink.gone.aborted) return
    throw (
      lastError ??
      new ApiError(503, `no node of region ${region} can take a ${model} request right now`, {
        code: 'no_capacity',
        headers: { 'retry-after': '2' },
      })
    )
  }

  /** What the region serves now, with load: /v1/models for local callers and the federation. */
  const modelList = (): Record<string, unknown> => {
    const created = Math.floor(Date.now() / 1000)
    const snapshot = router.snapshot()
    return {
      object: 'list',
      data: router.models().map((m) => {
        const serving = snapshot.filter((n) => n.model === m.model && n.state === 'serving')
        return {
          id: m.model,
          object: 'model',
          created,
          owned_by: 'garage',
          garage: {
            region,
            nodes: m.nodes,
            // 0 until the head has measured a node: the federation then counts the region at other
            // regions' measured rate rather than at this pool's 1 tok/s stand-in.
            capacityTokensPerSecond: serving.some((n) => n.measured)
              ? Math.round(serving.reduce((sum, n) => sum + n.capacity, 0) * 10) / 10
              : 0,
            inflight: serving.reduce((sum, n) => sum + n.inflight, 0),
            slots: serving.reduce((sum, n) => sum + n.slots, 0),
          },
        }
      }),
    }
  }

  const health = (): Record<string, unknown> => {
    const states: Record<string, number> = { starting: 0, serving: 0, paused: 0, draining: 0 }
    for (const n of registry.nodes()) states[n.state] = (states[n.state] ?? 0) + 1
    return {
      status: 'ok',
      region,
      head: self,
      nodes: states,
      models: router.models(),
      flagged: registry
        .nodes()
        .filter((n) => verified.flagged(n.peerId))
        .map((n) => n.peerId),
    }
  }

  /** One OpenAI request, from either front: routes, answers, counts; errors become OpenAI errors. */
  const dispatch = async (
    method: string,
    path: string,
    body: () => Promise<{ json: unknown; bytes: Uint8Array }>,
    sink: AnswerSink,
    requestId: string,
  ): Promise<void> => {
    const seen = { model: 'unknown' }
    try {
      if (path === '/v1/models' && method === 'GET') {
        await sink.head(200, { 'content-type': 'application/json', 'x-request-id': requestId })
        await sink.end(JSON.stringify(modelList()))
        return
      }
      const kind = path === '/v1/chat/completions' ? 'chat' : path === '/v1/completions' ? 'completion' : null
      if (kind == null) throw new ApiError(404, `no such endpoint: ${method} ${path}`, { code: 'not_found' })
      if (method !== 'POST') throw new ApiError(405, `${path} takes POST`, { code: 'method_not_allowed' })
      await answer(kind, path, await body(), sink, requestId, seen)
    } catch (err) {
      const e =
        err instanceof ApiError
          ? err
          : new ApiError(500, `internal error: ${(err as Error).message}`, { code: 'internal_error' })
      if (!(err instanceof ApiError)) log.error({ err, requestId }, 'head request failed')
      requests.inc({ model: seen.model, status: String(e.status) })
      await sendApiError(sink, e, { 'x-request-id': requestId }).catch(() => {})
    }
  }

  const serve = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const requestId = randomUUID()
    res.setHeader('x-request-id', requestId)
    const path = (req.url ?? '/').split('?')[0] ?? '/'
    if (path === '/health' && req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(health()))
      return
    }
    if (path === '/metrics' && req.method === 'GET') {
      res.writeHead(200, { 'content-type': metrics.contentType }).end(await metrics.metrics())
      return
    }
    if (!bearerMatches(req.headers.authorization, apiToken)) {
      sendError(
        res,
        new ApiError(401, `a valid bearer token is required (the head's token is in ${headApiTokenFile})`, {
          code: 'invalid_api_key',
        }),
      )
      return
    }
    await dispatch(
      req.method ?? 'GET',
      path,
      () => readJsonBodyBytes(req, inferRequestBodyMaxBytes),
      httpSink(res),
      requestId,
    )
  }

  // The federation reaches the head over the mesh: the same API on /garage/infer/1.0.0, for the
  // federation peers this head was told to trust only.
  const federation = new Set(options.federationPeers ?? [])
  const unhandleInfer = await handleInferProtocol(node, {
    allow: (peer) => federation.has(peer.toString()),
    async handle(request, reply, signal) {
      const requestId =
        request.headers.find(([k]) => k.toLowerCase() === 'x-request-id')?.[1]?.slice(0, 128) ?? randomUUID()
      const path = request.path.split('?')[0] ?? '/'
      const parse = async (): Promise<{ json: unknown; bytes: Uint8Array }> => ({
        json: parseJson(request.body),
        bytes: request.body,
      })
      await dispatch(request.method, path, parse, inferSink(reply, signal), requestId)
    },
    onRejected(peer, reason) {
      log.debug({ peer: peer.toString(), err: reason.message }, 'infer stream refused')
    },
  })

  const server: Server = createServer((req, res) => {
    serve(req, res).catch((err: unknown) => {
      log.error({ err }, 'head request failed')
      sendError(
        res,
        new ApiError(500, `internal error: ${(err as Error).message}`, { code: 'internal_error' }),
      )
    })
  })
  server.headersTimeout = 10_000
  server.requestTimeout = 30_000
  server.keepAliveTimeout = 5_000
  const host = options.httpHost ?? '127.0.0.1'
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(options.httpPort ?? defaultHeadHttpPort, host, () => {
        server.off('error', reject)
        resolve()
      })
    })
  } catch (err) {
    registry.stop()
    await unhandleInfer()
    await node.unhandle([JOIN_PROTOCOL, TELEMETRY_PROTOCOL])
    throw new GarageError(
      `the head cannot listen for HTTP on ${host}: ${(err as Error).message}`,
      'HTTP_LISTEN',
      {
        cause: err,
      },
    )
  }
  const addr = server.address() as AddressInfo
  const url = `http://${addr.family === 'IPv6' ? `[${addr.address}]` : addr.address}:${addr.port}`
  log.info({ url, models: policy.models.map((m) => m.name) }, 'regional head started')

  let stopped = false
  return {
    url,
    apiToken,
    registry,
    router,
    verified,
    metrics,
    serve,
    allowFederation: (peerId) => {
      federation.add(peerId)
    },
    async stop() {
      if (stopped) return
      stopped = true
      registry.stop()
      await unhandleInfer().catch(() => {})
      await node.unhandle([JOIN_PROTOCOL, TELEMETRY_PROTOCOL]).catch(() => {})
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
      log.info('regional head stopped')
    },
  }
}
