import { randomUUID } from 'node:crypto'
import type { IncomingMessage, ServerResponse } from 'node:http'
import { ApiError, apiError, internalError } from '../core/errors.ts'
import { bearerMatches, header, readJsonBodyBytes, requestPath, sendError } from '../core/http.ts'
import type { Logger } from '../core/logger.ts'
import { inferRequestBodyMaxBytes } from '../mesh/protocols.ts'
import {
  chatCompletionsPath,
  modelIdOf,
  modelsPath,
  type ProxiedKind,
  proxiedKind,
  responsesPath,
} from '../openai/endpoints.ts'
import { proxyWithFailover } from '../openai/proxy.ts'
import { type AnswerSink, httpSink } from '../openai/relay.ts'
import { prepareUpstreamRequest, upstreamBody } from '../openai/request.ts'
import { type OutputItemStore, responsesSink, responsesToChat } from '../openai/responses.ts'
import type { DirectPath } from './direct.ts'
import type { ApiKeyStore, KeyInfo } from './keys.ts'
import { LedgerDateError, type UsageLedger } from './ledger.ts'
import { errorCodeLabel, type FederationMetrics } from './metrics.ts'
import type { KeyLimiter } from './rate-limit.ts'
import type { RegionDirectory } from './regions.ts'
import type { FederationCall, RegionRoute } from './route.ts'
import { type FederationStore, FederationStoreUnavailableError } from './store.ts'

/** Retry-After of a 503 store_unavailable: the store is probed every second. */
export const storeRetryAfterSeconds = 1

export const adminTokenFile = 'admin.token'

export interface FederationApiInit {
  adminToken: string
  /** The gateway's PeerId (heads are told to trust it). */
  peerId: string
  logger: Logger
}

export interface FederationApiComponents {
  /** Whether the database can be reached now (a PostgreSQL store that lost its server says no). */
  store: Pick<FederationStore, 'available' | 'kind'>
  keys: ApiKeyStore
  ledger: UsageLedger
  limiter: KeyLimiter
  directory: RegionDirectory
  route: RegionRoute
  metrics: FederationMetrics
  /** Output items of answers given, for Responses item_reference. */
  items: OutputItemStore
  /** The direct path (null when off): its leases show in /health. */
  direct?: DirectPath | null
}

/**
 * The federation's HTTP API: /v1 for API consumers (a key, its limits, then the request routed
 * across regions through the shared failover loop), /admin for the operator, /health and /metrics.
 */
export class FederationApi {
  private readonly init: FederationApiInit
  private readonly c: FederationApiComponents

  constructor(init: FederationApiInit, components: FederationApiComponents) {
    this.init = init
    this.c = components
  }

  private async authenticate(req: IncomingMessage): Promise<KeyInfo> {
    const m = /^Bearer (.+)$/.exec(header(req, 'authorization') ?? '')
    const key = m?.[1] != null ? await this.c.keys.authenticate(m[1]) : null
    if (key == null) {
      throw apiError(
        'invalid_api_key',
        'a valid API key is required: Authorization: Bearer gk_... (garage keys create makes one)',
      )
    }
    return key
  }

  /**
   * Routes one request to a region: `raw` is its body as a chat, completion or embeddings request
   * (a Responses request arrives here translated, with a sink that translates the answer back).
   */
  private async generate(
    kind: ProxiedKind,
    path: string,
    raw: { json: unknown; bytes: Uint8Array },
    req: IncomingMessage,
    sink: AnswerSink,
    key: KeyInfo,
    requestId: string,
    labels: { model: string; region: string },
  ): Promise<void> {
    const started = performance.now()
    const prepared = prepareUpstreamRequest(raw.json, kind)
    const model = prepared.model
    // What modelsUnion() lists, without building it.
    if (!this.c.directory.regions().some((r) => r.reachable && (r.models.get(model)?.nodes ?? 0) > 0)) {
      // A gateway that just (re)started has not heard from the regions yet: "try again", not "no such model".
      if (!this.c.directory.warm)
        throw apiError(
          'no_capacity',
          'the gateway is starting and has not heard from the regions yet; retry shortly',
          {
            headers: { 'retry-after': '1' },
          },
        )
      // A region knows the model but has nothing serving it this moment (a pipeline group re-forming).
      if (this.c.directory.regions().some((r) => r.reachable && r.models.has(model)))
        throw apiError(
          'no_capacity',
          `no region can serve ${JSON.stringify(model)} right now; retry shortly`,
          {
            headers: { 'retry-after': '2' },
          },
        )
      throw apiError('model_not_found', `no region serves the model ${JSON.stringify(model)} now`, {
        param: 'model',
      })
    }
    labels.model = model
    const call: FederationCall = {
      model,
      path,
      body: upstreamBody(raw.bytes, prepared),
      prepared,
      requestId,
      sink,
      started,
      key,
      prefer: header(req, 'x-garage-region'),
      labels,
    }
    await proxyWithFailover(call, this.c.route)
  }

  private async admin(
    req: IncomingMessage,
    res: ServerResponse,
    path: string,
    method: string,
  ): Promise<void> {
    if (!bearerMatches(header(req, 'authorization'), this.init.adminToken)) {
      throw apiError('unauthorized', `the admin endpoints need the admin token (${adminTokenFile})`)
    }
    if (path === '/admin/ledger' && method === 'GET') {
      const query = new URL(req.url ?? '/', 'http://x').searchParams
      const range = {
        ...(query.get('since') != null ? { since: query.get('since')! } : {}),
        ...(query.get('until') != null ? { until: query.get('until')! } : {}),
      }
      let body: string
      try {
        body = JSON.stringify({
          usage: await this.c.ledger.usageByKey(range),
          credits: await this.c.ledger.creditsByNode(range),
          totals: await this.c.ledger.totals(range),
        })
      } catch (err) {
        if (err instanceof LedgerDateError) throw apiError('invalid_value', err.message)
        throw err
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end(body)
      return
    }
    if (path === '/admin/keys' && method === 'GET') {
      res
        .writeHead(200, { 'content-type': 'application/json' })
        .end(JSON.stringify({ keys: await this.c.keys.list() }))
      return
    }
    throw apiError('not_found', `no such endpoint: ${method} ${path}`)
  }

  private health(res: ServerResponse): void {
    const regions = this.c.directory.regions()
    const ok = regions.some((r) => r.reachable)
    res.writeHead(ok ? 200 : 503, { 'content-type': 'application/json' }).end(
      JSON.stringify({
        status: ok ? 'ok' : 'no-region',
        peerId: this.init.peerId,
        store: { kind: this.c.store.kind, available: this.c.store.available },
        regions: regions.map((r) => ({
          region: r.region,
          head: r.head,
          reachable: r.reachable,
          rttMs: r.rttMs,
          models: [...r.models.keys()],
        })),
        direct:
          this.c.direct == null
            ? null
            : { regions: this.c.direct.view(), requests: { ...this.c.direct.counts } },
      }),
    )
  }

  /** GET /v1/models/{id}: a model some region serves now. */
  private modelCard(res: ServerResponse, id: string): void {
    const m = this.c.directory.modelsUnion().find((u) => u.model === id)
    if (m == null)
      throw apiError('model_not_found', `no region serves the model ${JSON.stringify(id)} now`, {
        param: 'model',
      })
    res.writeHead(200, { 'content-type': 'application/json' }).end(
      JSON.stringify({
        id: m.model,
        object: 'model',
        created: Math.floor(Date.now() / 1000),
        owned_by: 'garage',
        garage: { regions: m.regions, nodes: m.nodes },
      }),
    )
  }

  private modelList(res: ServerResponse): void {
    const created = Math.floor(Date.now() / 1000)
    res.writeHead(200, { 'content-type': 'application/json' }).end(
      JSON.stringify({
        object: 'list',
        data: this.c.directory.modelsUnion().map((m) => ({
          id: m.model,
          object: 'model',
          created,
          owned_by: 'garage',
          garage: { regions: m.regions, nodes: m.nodes },
        })),
      }),
    )
  }

  /** One request of the public API. */
  async serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const requestId = randomUUID()
    res.setHeader('x-request-id', requestId)
    const path = requestPath(req)
    const method = req.method ?? 'GET'
    const labels = { model: 'unknown', region: 'none' }
    try {
      if (path === '/health' && method === 'GET') return this.health(res)
      if (path === '/metrics' && method === 'GET') {
        res
          .writeHead(200, { 'content-type': this.c.metrics.registry.contentType })
          .end(await this.c.metrics.registry.metrics())
        return
      }
      if (path.startsWith('/admin/')) return await this.admin(req, res, path, method)
      const key = await this.authenticate(req)
      if (path === modelsPath) {
        if (method !== 'GET') throw apiError('method_not_allowed', `${path} takes GET`)
        return this.modelList(res)
      }
      const modelId = modelIdOf(path)
      if (modelId != null) {
        if (method !== 'GET') throw apiError('method_not_allowed', `${path} takes GET`)
        return this.modelCard(res, modelId)
      }
      const kind = path === responsesPath ? 'responses' : proxiedKind(path)
      if (kind == null) throw apiError('not_found', `no such endpoint: ${method} ${path}`)
      if (method !== 'POST') throw apiError('method_not_allowed', `${path} takes POST`)
      // Usage must be written: no new request while the store is away or its unwritten sums are at their bound.
      if (!this.c.store.available || this.c.ledger.backlogFull) throw storeUnavailable()
      const admitted = await this.c.limiter.check(key)
      for (const [k, v] of Object.entries(admitted.headers)) res.setHeader(k, v)
      if (!admitted.ok) {
        this.c.metrics.rateLimited.inc({ reason: admitted.reason })
        throw apiError(
          'rate_limit_exceeded',
          `the key ${key.name} is over its ${admitted.reason} limit; retry in ${admitted.retryAfterSeconds} s`,
          { headers: { 'retry-after': String(admitted.retryAfterSeconds) } },
        )
      }
      try {
        const raw = await readJsonBodyBytes(req, inferRequestBodyMaxBytes)
        if (kind === 'responses') {
          // Served on chat completions: the request translated here, the answer on its way back.
          const { chat, request } = responsesToChat(raw.json, { items: this.c.items, scope: key.id })
          const bytes = Buffer.from(JSON.stringify(chat))
          const sink = responsesSink(httpSink(res), request, this.c.items)
          await this.generate(
            'chat',
            chatCompletionsPath,
            { json: chat, bytes },
            req,
            sink,
            key,
            requestId,
            labels,
          )
        } else await this.generate(kind, path, raw, req, httpSink(res), key, requestId, labels)
      } finally {
        admitted.release()
      }
    } catch (err) {
      const e =
        err instanceof ApiError
          ? err
          : err instanceof FederationStoreUnavailableError
            ? storeUnavailable()
            : internalError(err)
      if (!(err instanceof ApiError) && !(err instanceof FederationStoreUnavailableError))
        this.init.logger.error({ err, requestId }, 'request failed')
      this.c.metrics.requests.inc({ model: labels.model, region: labels.region, status: String(e.status) })
      this.c.metrics.errors.inc({ code: errorCodeLabel(e.code) })
      sendError(res, e)
    }
  }
}

function storeUnavailable(): ApiError {
  return apiError(
    'store_unavailable',
    'the gateway cannot reach its database right now; retry shortly (nothing was sent to a region)',
    { headers: { 'retry-after': String(storeRetryAfterSeconds) } },
  )
}
