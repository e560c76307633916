import { randomUUID } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import type { PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { Counter, Gauge, Histogram, Registry } from 'prom-client'
import { ApiError, sendError } from '../../daemon/engines/openai-errors.ts'
import { GarageError } from '../../mesh/errors.ts'
import { InferConnectError, type InferResponse, sendInferRequest } from '../../mesh/infer-protocol.ts'
import { handleJoinProtocol, JoinRefusedError } from '../../mesh/join-protocol.ts'
import { type Logger, silentLogger } from '../../mesh/logger.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { bearerMatches, readJsonBody } from '../../mesh/openai-http.ts'
import { inferRequestBodyMaxBytes, JOIN_PROTOCOL, TELEMETRY_PROTOCOL } from '../../mesh/protocols.ts'
import type { RayCredentials } from '../../mesh/region-messages.ts'
import { loadOrCreateSecret } from '../../mesh/secret-file.ts'
import { handleTelemetryProtocol } from '../../mesh/telemetry-protocol.ts'
import {
  countNonStreamed,
  prepareUpstreamRequest,
  StreamTokenCounter,
  VerifiedThroughput,
} from './accounting.ts'
import { chooseAssignment } from './assign.ts'
import type { RegionPolicy } from './policy.ts'
import { NodeRegistry } from './registry.ts'
import { RegionalRouter } from './router.ts'
import { SseSplitter } from './sse.ts'

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
  /** Handles one OpenAI request as the HTTP API does (the federation's libp2p hop will use it too). */
  serve(req: IncomingMessage, res: ServerResponse): Promise<void>
  stop(): Promise<void>
}

export const defaultHeadHttpPort = 9471
export const headApiTokenFile = 'head-api.token'
/** A non-streamed answer is buffered to count its tokens; past this it is not an LLM answer. */
const maxBufferedResponseBytes = 16 * 1024 * 1024
/** Node answers that mean "try someone else" when nothing has reached the client yet. */
const retryableStatuses = new Set([429, 500, 502, 503, 504])

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

  // Registry → router: the registry is the truth about membership, the router follows it.
  registry.addEventListener('node:left', (evt) => {
    const { peerId, reason } = evt.detail
    router.remove(peerId)
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
      return 'ok'
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
    signal: AbortSignal,
  ): Promise<InferResponse> => {
    return sendInferRequest(
      node,
      peerIdFromString(peer) as PeerId,
      {
        method: 'POST',
        path,
        headers: [['content-type', 'application/json']],
        body,
      },
      {
        signal,
        ...(options.firstByteTimeoutMs != null ? { firstByteTimeoutMs: options.firstByteTimeoutMs } : {}),
        ...(options.idleTimeoutMs != null ? { idleTimeoutMs: options.idleTimeoutMs } : {}),
      },
    )
  }

  const generate = async (
    kind: 'chat' | 'completion',
    path: string,
    req: IncomingMessage,
    res: ServerResponse,
    requestId: string,
    seen: { model: string },
  ): Promise<void> => {
    const started = performance.now()
    const raw = await readJsonBody(req, inferRequestBodyMaxBytes)
    const prepared = prepareUpstreamRequest(raw, kind)
    const model = prepared.model
    const known = router.models().some((m) => m.model === model)
    const assigned = registry.nodes().some((n) => n.assignment.model === model)
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
    const body = Buffer.from(JSON.stringify(prepared.body))
    const gone = new AbortController()
    res.on('close', () => {
      if (!res.writableFinished) gone.abort()
    })
    const tried = new Set<string>()
    let lastError: ApiError | null = null
    for (let i = 0; i < maxAttempts && !gone.signal.aborted; i++) {
      const peer = router.pick(model, { exclude: tried })
      if (peer == null) break
      tried.add(peer)
      const ticket = router.begin(peer)
      const hop = new AbortController()
      const onGone = (): void => hop.abort()
      gone.signal.addEventListener('abort', onGone, { once: true })
      let response: InferResponse
      try {
        response = await attempt(peer, path, body, hop.signal)
      } catch (err) {
        gone.signal.removeEventListener('abort', onGone)
        ticket.end({ ok: false, completionTokens: 0 })
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
        // Nothing reached the client yet: another node may take it (a full queue, a draining engine).
        hop.abort()
        gone.signal.removeEventListener('abort', onGone)
        ticket.end({ ok: false, completionTokens: 0 })
        if (response.status >= 500) router.failure(peer)
        retries.inc({ reason: `status_${response.status}` })
        lastError = new ApiError(
          response.status === 429 ? 429 : 503,
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
        const tokens = await relay(response, res, prepared, requestId, peer, () => ticket.firstByte())
        ticket.end({ ok: true, completionTokens: tokens })
        router.success(peer)
        verified.add(peer, tokens)
        regionTokens.inc({ model }, tokens)
        requests.inc({ model, status: String(response.status) })
      } catch (err) {
        ticket.end({ ok: false, completionTokens: 0 })
        if (!gone.signal.aborted) router.failure(peer)
        throw err
      } finally {
        addPending(peer, -inFlight)
        gone.signal.removeEventListener('abort', onGone)
        duration.observe({ model }, (performance.now() - started) / 1000)
      }
      return
    }
    if (gone.signal.aborted) return
    throw (
      lastError ??
      new ApiError(503, `no node of region ${region} can take a ${model} request right now`, {
        code: 'no_capacity',
        headers: { 'retry-after': '2' },
      })
    )
  }

  /** Passes a node's response to the client and returns the completion tokens the head verified. */
  const relay = async (
    response: InferResponse,
    res: ServerResponse,
    prepared: ReturnType<typeof prepareUpstreamRequest>,
    requestId: string,
    peer: string,
    /** Called when decoding starts (a stream's head): the router times the node's speed from there. */
    decodeStarted: () => void,
  ): Promise<number> => {
    const contentType = response.headers.find(([k]) => k.toLowerCase() === 'content-type')?.[1] ?? ''
    const headers: Record<string, string> = {
      'content-type': contentType || 'application/json',
      'x-request-id': requestId,
      // Which volunteer served it: for the consumer's support tickets and the tests' share counts.
      'x-garage-node': peer,
    }
    if (!contentType.startsWith('text/event-stream')) {
      const chunks: Uint8Array[] = []
      let size = 0
      for await (const chunk of response.body) {
        size += chunk.byteLength
        if (size > maxBufferedResponseBytes)
          throw new Error(`node ${peer} sent a response over ${size} bytes`)
        chunks.push(chunk)
      }
      const text = Buffer.concat(chunks)
      let tokens = 0
      if (response.status === 200) {
        try {
          tokens = countNonStreamed(JSON.parse(text.toString('utf8')), prepared.maxTokens, prepared.n)
        } catch {
          tokens = 0
        }
      }
      res.writeHead(response.status, headers).end(text)
      return tokens
    }
    decodeStarted()
    res.writeHead(response.status, { ...headers, 'cache-control': 'no-cache', connection: 'keep-alive' })
    res.flushHeaders()
    const splitter = new SseSplitter()
    const counter = new StreamTokenCounter({
      clientWantsUsage: prepared.clientWantsUsage,
      maxTokens: prepared.maxTokens,
      n: prepared.n,
    })
    try {
      for await (const chunk of response.body) {
        let out = ''
        for (const event of splitter.push(chunk)) {
          if (counter.feed(event.data)) out += event.raw
        }
        if (out.length > 0 && !res.write(out)) {
          await new Promise<void>((resolve) => {
            const done = (): void => {
              res.off('drain', done)
              res.off('close', done)
              resolve()
            }
            res.on('drain', done)
            res.on('close', done)
          })
        }
      }
    } catch (err) {
      // Past the first byte there is no retry: end the stream as OpenAI does, with an error event.
      streamErrors.inc()
      log.warn({ requestId, node: peer, err: (err as Error).message }, 'stream failed after its first byte')
      if (!res.destroyed) {
        const event = {
          error: {
            message: `the node serving this request failed mid-stream: ${(err as Error).message}`,
            type: 'server_error',
            param: null,
            code: 'stream_interrupted',
          },
        }
        res.end(`data: ${JSON.stringify(event)}\n\ndata: [DONE]\n\n`)
      }
      return counter.verifiedTokens()
    }
    res.end()
    return counter.verifiedTokens()
  }

  const serve = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const requestId = randomUUID()
    res.setHeader('x-request-id', requestId)
    const path = (req.url ?? '/').split('?')[0] ?? '/'
    if (path === '/health' && req.method === 'GET') {
      const states: Record<string, number> = { starting: 0, serving: 0, paused: 0, draining: 0 }
      for (const n of registry.nodes()) states[n.state] = (states[n.state] ?? 0) + 1
      res.writeHead(200, { 'content-type': 'application/json' }).end(
        JSON.stringify({
          status: 'ok',
          region,
          head: self,
          nodes: states,
          models: router.models(),
          flagged: registry
            .nodes()
            .filter((n) => verified.flagged(n.peerId))
            .map((n) => n.peerId),
        }),
      )
      return
    }
    if (path === '/metrics' && req.method === 'GET') {
      res.writeHead(200, { 'content-type': metrics.contentType }).end(await metrics.metrics())
      return
    }
    if (!bearerMatches(req.headers.authorization, apiToken)) {
      throw new ApiError(
        401,
        `a valid bearer token is required (the head's token is in ${headApiTokenFile})`,
        {
          code: 'invalid_api_key',
        },
      )
    }
    if (path === '/v1/models' && req.method === 'GET') {
      const created = Math.floor(Date.now() / 1000)
      res.writeHead(200, { 'content-type': 'application/json' }).end(
        JSON.stringify({
          object: 'list',
          data: router.models().map((m) => ({
            id: m.model,
            object: 'model',
            created,
            owned_by: 'garage',
            garage: { region, nodes: m.nodes },
          })),
        }),
      )
      return
    }
    const kind = path === '/v1/chat/completions' ? 'chat' : path === '/v1/completions' ? 'completion' : null
    if (kind == null)
      throw new ApiError(404, `no such endpoint: ${req.method} ${path}`, { code: 'not_found' })
    if (req.method !== 'POST') throw new ApiError(405, `${path} takes POST`, { code: 'method_not_allowed' })
    const seen = { model: 'unknown' }
    try {
      await generate(kind, path, req, res, requestId, seen)
    } catch (err) {
      if (err instanceof ApiError) requests.inc({ model: seen.model, status: String(err.status) })
      throw err
    }
  }

  const server: Server = createServer((req, res) => {
    serve(req, res).catch((err: unknown) => {
      const e =
        err instanceof ApiError
          ? err
          : new ApiError(500, `internal error: ${(err as Error).message}`, { code: 'internal_error' })
      if (!(err instanceof ApiError)) log.error({ err }, 'head request failed')
      sendError(res, e)
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
    async stop() {
      if (stopped) return
      stopped = true
      registry.stop()
      await node.unhandle([JOIN_PROTOCOL, TELEMETRY_PROTOCOL]).catch(() => {})
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
      log.info('regional head stopped')
    },
  }
}
