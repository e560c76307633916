import { randomUUID } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { join } from 'node:path'
import type { PeerId } from '@libp2p/interface'
import type { Registry } from 'prom-client'
import { ApiError, apiError, internalError } from '../core/errors.ts'
import {
  bearerMatches,
  closeServer,
  header,
  listen,
  readJsonBodyBytes,
  requestPath,
  sendError,
} from '../core/http.ts'
import { type Logger, silentLogger } from '../core/logger.ts'
import { loadOrCreateSecret } from '../core/secret-file.ts'
import { loadOrCreateIdentity } from '../mesh/identity.ts'
import { createMeshNode, type MeshNode } from '../mesh/node.ts'
import { inferRequestBodyMaxBytes } from '../mesh/protocols.ts'
import { generationKind, modelsPath } from '../openai/endpoints.ts'
import { proxyWithFailover } from '../openai/proxy.ts'
import { httpSink } from '../openai/relay.ts'
import { prepareUpstreamRequest, upstreamBody } from '../openai/request.ts'
import { FederationRouter } from '../routing/region-router.ts'
import { ApiKeyStore, type KeyInfo } from './keys.ts'
import { LedgerDateError, UsageLedger } from './ledger.ts'
import { federationMetrics } from './metrics.ts'
import { RateLimiter } from './rate-limit.ts'
import { RegionDirectory } from './regions.ts'
import { type FederationCall, RegionRoute } from './route.ts'
import { openFederationStore } from './store.ts'

export interface FederationOptions {
  /** federation.db (keys, ledger), admin.token and the gateway's libp2p identity. */
  dataDir: string
  /** The pinned federation authority: only heads it certified are used. */
  authority: string
  bootstrap: string[]
  listen?: string[]
  allowPrivateAddresses?: boolean
  /** The public API. Loopback by default: a public deployment puts TLS in front. */
  httpHost?: string
  httpPort?: number
  logger?: Logger
  /** Regions a request may try before its first byte (default 2). */
  maxAttempts?: number
  /** How often each region's models and load are refreshed. */
  refreshIntervalMs?: number
  /** From the request reaching the gateway to the first byte of its answer. */
  firstByteTimeoutMs?: number
}

export interface Federation {
  url: string
  peerId: PeerId
  node: MeshNode
  adminToken: string
  keys: ApiKeyStore
  ledger: UsageLedger
  directory: RegionDirectory
  router: FederationRouter
  metrics: Registry
  stop(): Promise<void>
}

export const defaultFederationPort = 8080
export const adminTokenFile = 'admin.token'
const defaultFirstByteTimeoutMs = 60_000

/**
 * The public OpenAI-compatible API: API keys and per-key limits, routing across regions (model
 * availability, then normalised load, then RTT; `X-Garage-Region` states a preference), failover
 * before the first byte, a usage ledger per key and credits per node from the verified tokens.
 * docs/federation.md describes it; docs/errors.md lists every error code.
 */
export async function startFederation(options: FederationOptions): Promise<Federation> {
  const log = (options.logger ?? silentLogger).child({ component: 'federation' })
  const adminToken = await loadOrCreateSecret(join(options.dataDir, adminTokenFile))
  const db = await openFederationStore(options.dataDir)
  const keys = new ApiKeyStore(db)
  const ledger = new UsageLedger(db)
  const limiter = new RateLimiter()

  const privateKey = await loadOrCreateIdentity(options.dataDir)
  const node = await createMeshNode({
    privateKey,
    ...(options.listen != null ? { listen: options.listen } : { listen: ['/ip4/0.0.0.0/tcp/0'] }),
    bootstrap: options.bootstrap,
    allowPrivateAddresses: options.allowPrivateAddresses ?? false,
  })
  const directory = new RegionDirectory(node, {
    authority: options.authority,
    ...(options.refreshIntervalMs != null ? { refreshIntervalMs: options.refreshIntervalMs } : {}),
    logger: log,
  })
  const router = new FederationRouter()
  const sync = (): void => {
    const known = new Set<string>()
    for (const status of directory.regions()) {
      known.add(status.region)
      router.update(status)
    }
    for (const r of router.snapshot()) if (!known.has(r.region)) router.remove(r.region)
  }
  for (const type of ['region:updated', 'region:unreachable', 'region:added', 'region:removed'] as const) {
    directory.addEventListener(type, sync)
  }

  const metrics = federationMetrics(directory)
  const route = new RegionRoute(
    {
      maxAttempts: options.maxAttempts ?? 2,
      firstByteTimeoutMs: options.firstByteTimeoutMs ?? defaultFirstByteTimeoutMs,
      logger: log,
    },
    {
      node,
      router,
      headOf: (region) => directory.region(region)?.head ?? null,
      ledger,
      limiter,
      metrics,
    },
  )

  const authenticate = (req: IncomingMessage): KeyInfo => {
    const m = /^Bearer (.+)$/.exec(header(req, 'authorization') ?? '')
    const key = m?.[1] != null ? keys.authenticate(m[1]) : null
    if (key == null) {
      throw apiError(
        'invalid_api_key',
        'a valid API key is required: Authorization: Bearer gk_... (garage keys create makes one)',
      )
    }
    return key
  }

  const generate = async (
    kind: 'chat' | 'completion',
    path: string,
    req: IncomingMessage,
    res: ServerResponse,
    key: KeyInfo,
    requestId: string,
    labels: { model: string; region: string },
  ): Promise<void> => {
    const started = performance.now()
    const raw = await readJsonBodyBytes(req, inferRequestBodyMaxBytes)
    const prepared = prepareUpstreamRequest(raw.json, kind)
    const model = prepared.model
    // What modelsUnion() lists, without building it.
    if (!directory.regions().some((r) => r.reachable && (r.models.get(model)?.nodes ?? 0) > 0)) {
      // A gateway that just (re)started has not heard from the regions yet: "try again", not "no such model".
      if (!directory.warm)
        throw apiError(
          'no_capacity',
          'the gateway is starting and has not heard from the regions yet; retry shortly',
          {
            headers: { 'retry-after': '1' },
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
      sink: httpSink(res),
      started,
      key,
      prefer: header(req, 'x-garage-region'),
      labels,
    }
    await proxyWithFailover(call, route)
  }

  const admin = (req: IncomingMessage, res: ServerResponse, path: string, method: string): void => {
    if (!bearerMatches(header(req, 'authorization'), adminToken)) {
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
          usage: ledger.usageByKey(range),
          credits: ledger.creditsByNode(range),
          totals: ledger.totals(range),
        })
      } catch (err) {
        if (err instanceof LedgerDateError) throw apiError('invalid_value', err.message)
        throw err
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end(body)
      return
    }
    if (path === '/admin/keys' && method === 'GET') {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ keys: keys.list() }))
      return
    }
    throw apiError('not_found', `no such endpoint: ${method} ${path}`)
  }

  const health = (res: ServerResponse): void => {
    const regions = directory.regions()
    const ok = regions.some((r) => r.reachable)
    res.writeHead(ok ? 200 : 503, { 'content-type': 'application/json' }).end(
      JSON.stringify({
        status: ok ? 'ok' : 'no-region',
        peerId: node.peerId.toString(),
        regions: regions.map((r) => ({
          region: r.region,
          head: r.head,
          reachable: r.reachable,
          rttMs: r.rttMs,
          models: [...r.models.keys()],
        })),
      }),
    )
  }

  const modelList = (res: ServerResponse): void => {
    const created = Math.floor(Date.now() / 1000)
    res.writeHead(200, { 'content-type': 'application/json' }).end(
      JSON.stringify({
        object: 'list',
        data: directory.modelsUnion().map((m) => ({
          id: m.model,
          object: 'model',
          created,
          owned_by: 'garage',
          garage: { regions: m.regions, nodes: m.nodes },
        })),
      }),
    )
  }

  const serve = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const requestId = randomUUID()
    res.setHeader('x-request-id', requestId)
    const path = requestPath(req)
    const method = req.method ?? 'GET'
    const labels = { model: 'unknown', region: 'none' }
    try {
      if (path === '/health' && method === 'GET') return health(res)
      if (path === '/metrics' && method === 'GET') {
        res
          .writeHead(200, { 'content-type': metrics.registry.contentType })
          .end(await metrics.registry.metrics())
        return
      }
      if (path.startsWith('/admin/')) return admin(req, res, path, method)
      const key = authenticate(req)
      if (path === modelsPath) {
        if (method !== 'GET') throw apiError('method_not_allowed', `${path} takes GET`)
        return modelList(res)
      }
      const kind = generationKind(path)
      if (kind == null) throw apiError('not_found', `no such endpoint: ${method} ${path}`)
      if (method !== 'POST') throw apiError('method_not_allowed', `${path} takes POST`)
      const admitted = limiter.check(key)
      for (const [k, v] of Object.entries(admitted.headers)) res.setHeader(k, v)
      if (!admitted.ok) {
        metrics.rateLimited.inc({ reason: admitted.reason })
        throw apiError(
          'rate_limit_exceeded',
          `the key ${key.name} is over its ${admitted.reason} limit; retry in ${admitted.retryAfterSeconds} s`,
          { headers: { 'retry-after': String(admitted.retryAfterSeconds) } },
        )
      }
      try {
        await generate(kind, path, req, res, key, requestId, labels)
      } finally {
        admitted.release()
      }
    } catch (err) {
      const e = err instanceof ApiError ? err : internalError(err)
      if (!(err instanceof ApiError)) log.error({ err, requestId }, 'request failed')
      metrics.requests.inc({ model: labels.model, region: labels.region, status: String(e.status) })
      sendError(res, e)
    }
  }

  const server: Server = createServer((req, res) => void serve(req, res))
  const host = options.httpHost ?? '127.0.0.1'
  const port = options.httpPort ?? defaultFederationPort
  const stopAll = async (): Promise<void> => {
    await directory.stop()
    ledger.close()
    db.close()
    await node.stop()
  }
  let url: string
  try {
    url = await listen(server, port, host, { what: 'the federation' })
  } catch (err) {
    await stopAll()
    throw err
  }
  directory.start()
  log.info({ url, peerId: node.peerId.toString() }, 'federation gateway started')

  let stopped = false
  return {
    url,
    peerId: node.peerId,
    node,
    adminToken,
    keys,
    ledger,
    directory,
    router,
    metrics: metrics.registry,
    async stop() {
      if (stopped) return
      stopped = true
      await closeServer(server)
      await stopAll()
      log.info('federation gateway stopped')
    },
  }
}
