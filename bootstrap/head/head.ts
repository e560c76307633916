import { randomUUID } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { join } from 'node:path'
import type { Registry } from 'prom-client'
import { ApiError, apiError, internalError } from '../../core/errors.ts'
import {
  bearerMatches,
  closeServer,
  listen,
  parseJson,
  readJsonBodyBytes,
  requestPath,
  sendError,
} from '../../core/http.ts'
import { type Logger, silentLogger } from '../../core/logger.ts'
import { loadOrCreateSecret } from '../../core/secret-file.ts'
import { handleInferProtocol } from '../../mesh/infer-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { inferRequestBodyMaxBytes } from '../../mesh/protocols.ts'
import type { RayCredentials } from '../../mesh/region-messages.ts'
import {
  chatCompletionsPath,
  modelIdOf,
  modelsPath,
  type ProxiedKind,
  proxiedKind,
  responsesPath,
} from '../../openai/endpoints.ts'
import { proxyWithFailover } from '../../openai/proxy.ts'
import { type AnswerSink, httpSink, inferSink, sendApiError } from '../../openai/relay.ts'
import { prepareUpstreamRequest, upstreamBody } from '../../openai/request.ts'
import { OutputItemStore, responsesSink, responsesToChat } from '../../openai/responses.ts'
import { VerifiedThroughput } from '../../openai/usage.ts'
import { RegionalRouter } from '../../routing/node-router.ts'
import { HeadAdmission, PendingTokens } from './admission.ts'
import { type GroupEngine, type GroupEngineInit, RayGroups } from './groups.ts'
import { IntegrityChecker, type IntegrityCheckerInit } from './integrity.ts'
import { LeaseDesk } from './leases.ts'
import { type HeadMetrics, headMetrics } from './metrics.ts'
import type { RegionPolicy } from './policy.ts'
import { NodeRegistry } from './registry.ts'
import { HeadRoute } from './route.ts'

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
  /**
   * Makes a pipeline group's vLLM on the Ray cluster (the composition layer passes a VllmEngine);
   * without it the policy's group models are not served.
   */
  groupEngine?: ((init: GroupEngineInit) => GroupEngine) | null
  /** Silence after which a node is evicted (default: the protocol's telemetry deadline). */
  telemetryDeadlineMs?: number
  /** Nodes a request may try before its first byte (default 3). */
  maxAttempts?: number
  /** PeerIds of the federation gateways allowed to send requests over /garage/infer/1.0.0. */
  federationPeers?: string[]
  /**
   * Grant the federation leases to send straight to nodes (default true); off, every request comes
   * through the head.
   */
  directPath?: boolean
  /** Timeouts of one hop to a node (tests shorten them). */
  firstByteTimeoutMs?: number
  idleTimeoutMs?: number
  /**
   * Result integrity (docs/integrity.md): sampling rates, a trusted engine, the statistic's
   * options; `false` turns the checks off. Default: on, with the defaults there.
   */
  integrity?: Omit<IntegrityCheckerInit, 'region' | 'logger'> | false
}

export interface RegionalHead {
  /** e.g. http://127.0.0.1:9471 */
  url: string
  /** Bearer token the /v1 endpoints need (from `<dataDir>/head-api.token`). */
  apiToken: string
  registry: NodeRegistry
  router: RegionalRouter
  verified: VerifiedThroughput
  /** Result integrity: reputations, quarantines; null when turned off. */
  integrity: IntegrityChecker | null
  /** The direct path's leases and the gateways' reports; null when the direct path is off. */
  leases: LeaseDesk | null
  /** The region's pipeline groups on its Ray cluster. */
  groups: RayGroups
  metrics: Registry
  /** Handles one request of the HTTP API. */
  serve(req: IncomingMessage, res: ServerResponse): Promise<void>
  /** Trust another federation gateway from now on (its PeerId). */
  allowFederation(peerId: string): void
  stop(): Promise<void>
}

export const defaultHeadHttpPort = 9471
export const headApiTokenFile = 'head-api.token'

/** A parsed request body and the bytes it came from. */
type RawBody = { json: unknown; bytes: Uint8Array }

/**
 * The regional head: admits nodes on /garage/join/1.0.0 with an assignment from the region policy,
 * keeps their telemetry, routes OpenAI requests to them over /garage/infer/1.0.0, and counts the
 * tokens it proxied (verified throughput). docs/region.md describes it; docs/architecture.md says
 * which file handles each step.
 */
export async function startRegionalHead(options: RegionalHeadOptions): Promise<RegionalHead> {
  const { node, region, policy } = options
  const log = (options.logger ?? silentLogger).child({ component: 'head', region })
  const apiToken = await loadOrCreateSecret(join(options.dataDir, headApiTokenFile))

  const registry = new NodeRegistry(
    options.telemetryDeadlineMs != null ? { deadlineMs: options.telemetryDeadlineMs } : {},
  )
  const router = new RegionalRouter()
  const verified = new VerifiedThroughput()
  const pending = new PendingTokens()
  const groups = new RayGroups(
    { region, policy, ray: options.ray ?? null, createEngine: options.groupEngine ?? null, logger: log },
    router,
  )
  const metrics = headMetrics(registry, router, verified, groups)
  const integrity =
    options.integrity === false
      ? null
      : new IntegrityChecker(
          {
            region,
            logger: log,
            vocabularySize: (model) => policy.models.find((m) => m.name === model)?.vocabularySize,
            ...options.integrity,
          },
          { node, registry, router, verified, checks: metrics.integrityChecks },
        )
  integrity?.start()
  const route = new HeadRoute(
    {
      region,
      maxAttempts: options.maxAttempts ?? 3,
      logger: log,
      ...(options.firstByteTimeoutMs != null ? { firstByteTimeoutMs: options.firstByteTimeoutMs } : {}),
      ...(options.idleTimeoutMs != null ? { idleTimeoutMs: options.idleTimeoutMs } : {}),
    },
    { node, router, verified, pending, metrics, groups, integrity },
  )

  // Registry → router: the registry is the truth about membership, the router follows it.
  registry.addEventListener('node:left', (evt) => {
    const { peerId, reason } = evt.detail
    router.remove(peerId)
    route.forget(peerId)
    // A node that comes back reports from zero again.
    verified.remove(peerId)
    groups.left(peerId)
    log.info({ node: peerId, reason }, 'node left the region')
  })
  registry.addEventListener('node:state', (evt) => groups.state(evt.detail.peerId, evt.detail.state))

  // The federation gateways this head trusts: they send requests over /garage/infer/1.0.0 and
  // hold leases for the direct path.
  const federation = new Set(options.federationPeers ?? [])
  const leases =
    options.directPath === false
      ? null
      : new LeaseDesk(
          { logger: log },
          {
            node,
            router,
            verified,
            metrics,
            allowed: (peer) => federation.has(peer),
            // A node the integrity check quarantined (or is hearing) gets no leases.
            usable: (peer) =>
              !verified.flagged(peer) &&
              registry.get(peer)?.state === 'serving' &&
              integrity?.standing(peer) == null,
            integrity,
          },
        )
  registry.addEventListener('node:left', (evt) => leases?.forget(evt.detail.peerId))
  await leases?.start()
  const admission = new HeadAdmission(
    { region, policy, ray: options.ray ?? null, logger: log },
    { node, registry, router, verified, pending, groups, integrity, leases },
  )
  await admission.start()
  registry.start()

  const api = new HeadApi(
    { region, self: node.peerId.toString(), logger: log },
    { registry, router, verified, route, groups, requests: metrics.requests, integrity },
  )

  const serve = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const requestId = randomUUID()
    res.setHeader('x-request-id', requestId)
    const path = requestPath(req)
    if (path === '/health' && req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(api.health()))
      return
    }
    if (path === '/metrics' && req.method === 'GET') {
      res
        .writeHead(200, { 'content-type': metrics.registry.contentType })
        .end(await metrics.registry.metrics())
      return
    }
    if (!bearerMatches(req.headers.authorization, apiToken)) {
      sendError(
        res,
        apiError(
          'invalid_api_key',
          `a valid bearer token is required (the head's token is in ${headApiTokenFile})`,
        ),
      )
      return
    }
    await api.dispatch(
      req.method ?? 'GET',
      path,
      () => readJsonBodyBytes(req, inferRequestBodyMaxBytes),
      httpSink(res),
      requestId,
    )
  }

  // The federation reaches the head over the mesh: the same API on /garage/infer/1.0.0, for the
  // federation peers this head was told to trust only.
  const unhandleInfer = await handleInferProtocol(node, {
    allow: (peer) => federation.has(peer.toString()),
    async handle(request, reply, signal) {
      const requestId =
        request.headers.find(([k]) => k.toLowerCase() === 'x-request-id')?.[1]?.slice(0, 128) ?? randomUUID()
      const path = request.path.split('?')[0] ?? '/'
      const parse = async (): Promise<RawBody> => ({ json: parseJson(request.body), bytes: request.body })
      await api.dispatch(request.method, path, parse, inferSink(reply, signal), requestId)
    },
    onRejected(peer, reason) {
      log.debug({ peer: peer.toString(), err: reason.message }, 'infer stream refused')
    },
  })

  const server: Server = createServer((req, res) => {
    serve(req, res).catch((err: unknown) => {
      log.error({ err }, 'head request failed')
      sendError(res, internalError(err))
    })
  })
  const host = options.httpHost ?? '127.0.0.1'
  let url: string
  try {
    url = await listen(server, options.httpPort ?? defaultHeadHttpPort, host, { what: 'the head' })
  } catch (err) {
    registry.stop()
    integrity?.stop()
    await unhandleInfer()
    await admission.stop()
    await leases?.stop()
    throw err
  }
  log.info({ url, models: policy.models.map((m) => m.name) }, 'regional head started')

  let stopped = false
  return {
    url,
    apiToken,
    registry,
    router,
    verified,
    integrity,
    leases,
    groups,
    metrics: metrics.registry,
    serve,
    allowFederation: (peerId) => {
      federation.add(peerId)
    },
    async stop() {
      if (stopped) return
      stopped = true
      registry.stop()
      integrity?.stop()
      await unhandleInfer().catch(() => {})
      await admission.stop()
      await leases?.stop()
      await groups.stop()
      await closeServer(server)
      log.info('regional head stopped')
    },
  }
}

/**
 * The head's OpenAI API, the same from either front (HTTP, or the federation over the mesh): the
 * models the region serves, and generation requests routed to its nodes through the shared
 * failover loop.
 */
export class HeadApi {
  private readonly region: string
  private readonly self: string
  private readonly log: Logger
  private readonly registry: NodeRegistry
  private readonly router: RegionalRouter
  private readonly verified: VerifiedThroughput
  private readonly route: HeadRoute
  private readonly groups: RayGroups
  private readonly requests: HeadMetrics['requests']
  private readonly integrity: IntegrityChecker | null
  /** Output items of answers given, for Responses item_reference. */
  private readonly items = new OutputItemStore()

  constructor(
    init: { region: string; self: string; logger: Logger },
    components: {
      registry: NodeRegistry
      router: RegionalRouter
      verified: VerifiedThroughput
      route: HeadRoute
      groups: RayGroups
      requests: HeadMetrics['requests']
      integrity?: IntegrityChecker | null
    },
  ) {
    this.region = init.region
    this.self = init.self
    this.log = init.logger
    this.registry = components.registry
    this.router = components.router
    this.verified = components.verified
    this.route = components.route
    this.groups = components.groups
    this.requests = components.requests
    this.integrity = components.integrity ?? null
  }

  /** One OpenAI request: routes, answers, counts; errors become OpenAI errors. */
  async dispatch(
    method: string,
    path: string,
    body: () => Promise<RawBody>,
    sink: AnswerSink,
    requestId: string,
  ): Promise<void> {
    const seen = { model: 'unknown' }
    try {
      if (path === modelsPath && method === 'GET') return await this.json(sink, requestId, this.modelList())
      const modelId = modelIdOf(path)
      if (modelId != null) {
        if (method !== 'GET') throw apiError('method_not_allowed', `${path} takes GET`)
        const card = (this.modelList().data as Array<{ id: string }>).find((m) => m.id === modelId)
        if (card == null)
          throw apiError(
            'model_not_found',
            `the model ${JSON.stringify(modelId)} is not served in region ${this.region}`,
            {
              param: 'model',
            },
          )
        return await this.json(sink, requestId, card)
      }
      const kind = path === responsesPath ? 'responses' : proxiedKind(path)
      if (kind == null) throw apiError('not_found', `no such endpoint: ${method} ${path}`)
      if (method !== 'POST') throw apiError('method_not_allowed', `${path} takes POST`)
      const raw = await body()
      if (kind === 'responses') {
        // Served on chat completions: the request translated here, the answer on its way back.
        const { chat, request } = responsesToChat(raw.json, { items: this.items, scope: 'head' })
        const translated = { json: chat, bytes: Buffer.from(JSON.stringify(chat)) }
        await this.generate(
          'chat',
          chatCompletionsPath,
          translated,
          responsesSink(sink, request, this.items),
          requestId,
          seen,
        )
      } else await this.generate(kind, path, raw, sink, requestId, seen)
    } catch (err) {
      const e = err instanceof ApiError ? err : internalError(err)
      if (!(err instanceof ApiError)) this.log.error({ err, requestId }, 'head request failed')
      this.requests.inc({ model: seen.model, status: String(e.status) })
      await sendApiError(sink, e, { 'x-request-id': requestId }).catch(() => {})
    }
  }

  private async json(sink: AnswerSink, requestId: string, body: unknown): Promise<void> {
    await sink.head(200, { 'content-type': 'application/json', 'x-request-id': requestId })
    await sink.end(JSON.stringify(body))
  }

  /** Answers one request from its parsed body: routes it to a node and relays the answer. */
  private async generate(
    kind: ProxiedKind,
    path: string,
    raw: RawBody,
    sink: AnswerSink,
    requestId: string,
    seen: { model: string },
  ): Promise<void> {
    const started = performance.now()
    const prepared = prepareUpstreamRequest(raw.json, kind)
    const model = prepared.model
    const known = this.router.models().some((m) => m.model === model)
    const assigned =
      !known &&
      (this.registry.nodes().some((n) => n.assignment.model === model) ||
        this.groups.views().some((g) => g.model === model && g.members.length > 0))
    // Labelled only when the region knows the model: made-up names must not grow /metrics.
    if (known || assigned) seen.model = model
    if (!known) {
      if (assigned)
        throw apiError(
          'no_capacity',
          `no node of region ${this.region} is serving ${model} right now; retry shortly`,
          {
            headers: { 'retry-after': '2' },
          },
        )
      throw apiError(
        'model_not_found',
        `the model ${JSON.stringify(model)} is not served in region ${this.region}`,
        {
          param: 'model',
        },
      )
    }
    const body = upstreamBody(raw.bytes, prepared)
    await proxyWithFailover({ model, path, body, prepared, requestId, sink, started }, this.route)
  }

  /** What the region serves now, with load: /v1/models for local callers and the federation. */
  modelList(): Record<string, unknown> {
    const created = Math.floor(Date.now() / 1000)
    const snapshot = this.router.snapshot()
    return {
      object: 'list',
      // Nodes the integrity check quarantined: the federation's ledger holds their unverified credits.
      garage: {
        region: this.region,
        held: (this.integrity?.quarantined() ?? []).map((e) => ({
          node: e.node,
          since: e.since,
          reason: e.reason ?? 'quarantined',
          tokens: e.heldTokens,
        })),
      },
      data: this.router
        .models()
        .map((m) => {
          const serving = snapshot.filter((n) => n.model === m.model && n.state === 'serving')
          return {
            id: m.model,
            object: 'model',
            created,
            owned_by: 'garage',
            garage: {
              region: this.region,
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
        })
        .concat(
          // A pipeline group forming again after a loss: known, with no node serving it now, so
          // the federation answers 503 no_capacity (retry) rather than 404 while it re-forms.
          this.groups
            .views()
            .filter((g) => g.state !== 'serving' && g.formations > 0 && g.members.length > 0)
            .map((g) => ({
              id: g.model,
              object: 'model',
              created,
              owned_by: 'garage',
              garage: { region: this.region, nodes: 0, capacityTokensPerSecond: 0, inflight: 0, slots: 0 },
            })),
        ),
    }
  }

  health(): Record<string, unknown> {
    return {
      status: 'ok',
      region: this.region,
      head: this.self,
      nodes: this.registry.countByState(),
      models: this.router.models(),
      flagged: this.registry
        .nodes()
        .filter((n) => this.verified.flagged(n.peerId))
        .map((n) => n.peerId),
      // Engines nodes have but could not run (they serve on another one): what to look at first.
      engineFailures: this.registry
        .nodes()
        .flatMap((n) => (n.report.engineFailures ?? []).map((f) => ({ node: n.peerId, ...f }))),
      // Pipeline groups on the region's Ray cluster: members, state, time to form, tokens.
      groups: this.groups.views(),
      // Nodes whose answers failed integrity checks beyond chance: no traffic, credits held back.
      quarantined: (this.integrity?.quarantined() ?? []).map((e) => ({
        node: e.node,
        state: e.state,
        since: new Date(e.since).toISOString(),
        reason: e.reason,
        heldTokens: e.heldTokens,
        checks: e.checks,
        fails: e.fails,
      })),
    }
  }
}
