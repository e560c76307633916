import { randomUUID } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import type { PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client'
import { ApiError, sendError } from '../daemon/engines/openai-errors.ts'
import { GarageError } from '../mesh/errors.ts'
import { loadOrCreateIdentity } from '../mesh/identity.ts'
import { InferConnectError, type InferResponse, sendInferRequest } from '../mesh/infer-protocol.ts'
import { type Logger, silentLogger } from '../mesh/logger.ts'
import { createMeshNode, type MeshNode } from '../mesh/node.ts'
import { bearerMatches, readJsonBodyBytes, upstreamBody } from '../mesh/openai-http.ts'
import { httpSink, relayAnswer } from '../mesh/openai-relay.ts'
import { inferRequestBodyMaxBytes } from '../mesh/protocols.ts'
import { loadOrCreateSecret } from '../mesh/secret-file.ts'
import { prepareUpstreamRequest } from '../mesh/token-accounting.ts'
import { federationError } from './errors.ts'
import { ApiKeyStore, type KeyInfo } from './keys.ts'
import { LedgerDateError, UsageLedger } from './ledger.ts'
import { RateLimiter } from './rate-limit.ts'
import { FederationRouter } from './region-router.ts'
import { RegionDirectory } from './regions.ts'
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
 * Head answers that mean "try another region" while nothing has reached the client (404: the
 * region stopped serving the model since the last refresh).
 */
const retryableStatuses = new Set([404, 429, 500, 502, 503, 504])

function header(req: IncomingMessage, name: string): string | undefined {
  const v = req.headers[name]
  return Array.isArray(v) ? v[0] : v
}

/**
 * The public OpenAI-compatible API: API keys and per-key limits, routing across regions (model
 * availability, then normalised load, then RTT; `X-Garage-Region` states a preference), failover
 * before the first byte, a usage ledger per key and credits per node from the verified tokens.
 * docs/federation.md describes it; docs/errors.md lists every error code.
 */
export async function startFederation(options: FederationOptions): Promise<Federation> {
  const log = (options.logger ?? silentLogger).child({ component: 'federation' })
  const maxAttempts = options.maxAttempts ?? 2
  const firstByteTimeoutMs = options.firstByteTimeoutMs ?? defaultFirstByteTimeoutMs
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

  const metrics = new Registry()
  collectDefaultMetrics({ register: metrics, prefix: 'garage_federation_process_' })
  const requests = new Counter({
    name: 'garage_federation_requests_total',
    help: 'Requests answered, by model, region and HTTP status',
    labelNames: ['model', 'region', 'status'] as const,
    registers: [metrics],
  })
  const ttft = new Histogram({
    name: 'garage_federation_time_to_first_byte_seconds',
    help: 'From the request reaching the gateway to the first byte of its answer',
    labelNames: ['model', 'region'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [metrics],
  })
  const e2e = new Histogram({
    name: 'garage_federation_request_duration_seconds',
    help: 'Whole request, end to end',
    labelNames: ['model', 'region'] as const,
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
    registers: [metrics],
  })
  const tokens = new Counter({
    name: 'garage_federation_tokens_total',
    help: 'Tokens billed, by model and kind (prompt, completion)',
    labelNames: ['model', 'kind'] as const,
    registers: [metrics],
  })
  const rateLimited = new Counter({
    name: 'garage_federation_rate_limited_total',
    help: 'Requests refused by a per-key limit, by which limit',
    labelNames: ['reason'] as const,
    registers: [metrics],
  })
  const failovers = new Counter({
    name: 'garage_federation_failovers_total',
    help: 'Requests moved to another region before their first byte, by reason',
    labelNames: ['reason'] as const,
    registers: [metrics],
  })
  let activeStreams = 0
  new Gauge({
    name: 'garage_federation_active_streams',
    help: 'Streamed answers in progress',
    registers: [metrics],
    collect() {
      this.set(activeStreams)
    },
  })
  new Gauge({
    name: 'garage_federation_regions',
    help: 'Regions known, by reachability',
    labelNames: ['reachable'] as const,
    registers: [metrics],
    collect() {
      this.reset()
      const all = directory.regions()
      this.set({ reachable: 'true' }, all.filter((r) => r.reachable).length)
      this.set({ reachable: 'false' }, all.filter((r) => !r.reachable).length)
    },
  })

  /** Heads' PeerIds, parsed once (a base58 decode and a key each time otherwise). */
  const headIds = new Map<string, PeerId>()
  const headPeerId = (head: string): PeerId => {
    let id = headIds.get(head)
    if (id == null) {
      if (headIds.size >= 1024) headIds.clear()
      id = peerIdFromString(head) as PeerId
      headIds.set(head, id)
    }
    return id
  }

  const authenticate = (req: IncomingMessage): KeyInfo => {
    const m = /^Bearer (.+)$/.exec(header(req, 'authorization') ?? '')
    const key = m?.[1] != null ? keys.authenticate(m[1]) : null
    if (key == null) {
      throw federationError(
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
        throw federationError(
          'no_capacity',
          'the gateway is starting and has not heard from the regions yet; retry shortly',
          {
            headers: { 'retry-after': '1' },
          },
        )
      throw federationError('model_not_found', `no region serves the model ${JSON.stringify(model)} now`, {
        param: 'model',
      })
    }
    labels.model = model
    const prefer = header(req, 'x-garage-region')
    const body = upstreamBody(raw.bytes, prepared)
    const sink = httpSink(res)
    const tried = new Set<string>()
    let lastError: ApiError | null = null
    for (let i = 0; i < maxAttempts && !sink.gone.aborted; i++) {
      const region = router.pick(model, { ...(prefer != null ? { prefer } : {}), exclude: tried })
      if (region == null) break
      tried.add(region)
      const head = directory.region(region)?.head
      if (head == null) continue
      const ticket = router.begin(region)
      let response: InferResponse
      try {
        response = await sendInferRequest(
          node,
          headPeerId(head),
          {
            method: 'POST',
            path,
            headers: [
              ['content-type', 'application/json'],
              ['x-request-id', requestId],
            ],
            body,
          },
          { signal: sink.gone, firstByteTimeoutMs },
        )
      } catch (err) {
        ticket.end(false)
        if (sink.gone.aborted) return
        router.failure(region)
        failovers.inc({ reason: (err as Error).name })
        log.warn({ requestId, region, err: (err as Error).message }, 'region failed before the first byte')
        lastError =
          err instanceof InferConnectError
            ? federationError('region_unreachable', `region ${region} could not be reached: ${err.message}`)
            : federationError('node_failed', `region ${region} failed: ${(err as Error).message}`)
        continue
      }
      if (retryableStatuses.has(response.status)) {
        // Nothing reached the client yet: another region may take it.
        const text = await readAll(response)
        ticket.end(false)
        if (response.status >= 500) router.failure(region)
        failovers.inc({ reason: `status_${response.status}` })
        lastError = passThroughError(response.status, text, region)
        continue
      }
      const servedBy = response.headers.find(([k]) => k === 'x-garage-node')?.[1] ?? ''
      labels.region = region
      ttft.observe({ model, region }, (performance.now() - started) / 1000)
      const streaming = prepared.stream
      if (streaming) activeStreams++
      try {
        const outcome = await relayAnswer(response, sink, prepared, {
          'x-request-id': requestId,
          'x-garage-region': region,
          ...(servedBy !== '' ? { 'x-garage-node': servedBy } : {}),
        })
        ticket.end(outcome.interrupted == null)
        if (outcome.interrupted == null) router.success(region)
        else if (!sink.gone.aborted) router.failure(region)
        if (response.status === 200) {
          // The client received these tokens: bill the key, credit the node that generated them.
          ledger.record({
            keyId: key.id,
            model,
            region,
            node: servedBy,
            promptTokens: outcome.promptTokens,
            completionTokens: outcome.completionTokens,
          })
          limiter.record(key.id, outcome.promptTokens + outcome.completionTokens)
          tokens.inc({ model, kind: 'prompt' }, outcome.promptTokens)
          tokens.inc({ model, kind: 'completion' }, outcome.completionTokens)
        }
        requests.inc({ model, region, status: String(response.status) })
      } finally {
        if (streaming) activeStreams--
        e2e.observe({ model, region }, (performance.now() - started) / 1000)
      }
      return
    }
    if (sink.gone.aborted) return
    throw (
      lastError ??
      federationError('no_capacity', `no region can take a ${model} request right now; retry shortly`, {
        headers: { 'retry-after': '2' },
      })
    )
  }

  const serve = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const requestId = randomUUID()
    res.setHeader('x-request-id', requestId)
    const path = (req.url ?? '/').split('?')[0] ?? '/'
    const method = req.method ?? 'GET'
    const labels = { model: 'unknown', region: 'none' }
    try {
      if (path === '/health' && method === 'GET') {
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
        return
      }
      if (path === '/metrics' && method === 'GET') {
        res.writeHead(200, { 'content-type': metrics.contentType }).end(await metrics.metrics())
        return
      }
      if (path.startsWith('/admin/')) {
        if (!bearerMatches(header(req, 'authorization'), adminToken)) {
          throw federationError(
            'unauthorized',
            `the admin endpoints need the admin token (${adminTokenFile})`,
          )
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
            if (err instanceof LedgerDateError) throw federationError('invalid_value', err.message)
            throw err
          }
          res.writeHead(200, { 'content-type': 'application/json' }).end(body)
          return
        }
        if (path === '/admin/keys' && method === 'GET') {
          res
            .writeHead(200, { 'content-type': 'application/json' })
            .end(JSON.stringify({ keys: keys.list() }))
          return
        }
        throw federationError('not_found', `no such endpoint: ${method} ${path}`)
      }
      const key = authenticate(req)
      if (path === '/v1/models') {
        if (method !== 'GET') throw federationError('method_not_allowed', `${path} takes GET`)
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
        return
      }
      const kind = path === '/v1/chat/completions' ? 'chat' : path === '/v1/completions' ? 'completion' : null
      if (kind == null) throw federationError('not_found', `no such endpoint: ${method} ${path}`)
      if (method !== 'POST') throw federationError('method_not_allowed', `${path} takes POST`)
      const admitted = limiter.check(key)
      for (const [k, v] of Object.entries(admitted.headers)) res.setHeader(k, v)
      if (!admitted.ok) {
        rateLimited.inc({ reason: admitted.reason })
        throw federationError(
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
      const e =
        err instanceof ApiError
          ? err
          : federationError('internal_error', `internal error: ${(err as Error).message}`)
      if (!(err instanceof ApiError)) log.error({ err, requestId }, 'request failed')
      requests.inc({ model: labels.model, region: labels.region, status: String(e.status) })
      sendError(res, e)
    }
  }

  const server: Server = createServer((req, res) => void serve(req, res))
  server.headersTimeout = 10_000
  // Time to receive the whole request; answers stream as long as they take.
  server.requestTimeout = 30_000
  server.keepAliveTimeout = 5_000
  const host = options.httpHost ?? '127.0.0.1'
  const port = options.httpPort ?? defaultFederationPort
  const stopAll = async (): Promise<void> => {
    await directory.stop()
    ledger.close()
    db.close()
    await node.stop()
  }
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(port, host, () => {
        server.off('error', reject)
        resolve()
      })
    })
  } catch (err) {
    await stopAll()
    throw new GarageError(
      `the federation cannot listen on ${host}:${port}: ${(err as Error).message}`,
      'HTTP_LISTEN',
      { cause: err },
    )
  }
  directory.start()
  const addr = server.address() as AddressInfo
  const url = `http://${addr.family === 'IPv6' ? `[${addr.address}]` : addr.address}:${addr.port}`
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
    metrics,
    async stop() {
      if (stopped) return
      stopped = true
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
      await stopAll()
      log.info('federation gateway stopped')
    },
  }
}

async function readAll(response: InferResponse): Promise<string> {
  const chunks: Uint8Array[] = []
  let size = 0
  try {
    for await (const chunk of response.body) {
      size += chunk.byteLength
      if (size > 64 * 1024) break
      chunks.push(chunk)
    }
  } catch {
    // an error body cut short: what arrived is enough to quote
  }
  return Buffer.concat(chunks).toString('utf8')
}

/** A head's error answer, kept as the client will see it when no other region can help. */
function passThroughError(status: number, text: string, region: string): ApiError {
  try {
    const body = JSON.parse(text) as { error?: { message?: string; code?: string; param?: string } }
    if (body.error?.message != null) {
      return new ApiError(status, `region ${region}: ${body.error.message}`, {
        ...(body.error.code != null ? { code: body.error.code } : {}),
        ...(body.error.param != null ? { param: body.error.param } : {}),
        ...(status === 429 || status === 503 ? { headers: { 'retry-after': '1' } } : {}),
      })
    }
  } catch {
    // not JSON: fall through
  }
  return federationError('node_failed', `region ${region} answered ${status}`)
}
