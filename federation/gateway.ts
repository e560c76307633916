import { createServer, type Server } from 'node:http'
import { join } from 'node:path'
import type { PeerId } from '@libp2p/interface'
import type { Registry } from 'prom-client'
import { closeServer, listen } from '../core/http.ts'
import { type Logger, silentLogger } from '../core/logger.ts'
import { loadOrCreateSecret } from '../core/secret-file.ts'
import { loadOrCreateIdentity } from '../mesh/identity.ts'
import { createMeshNode, type MeshNode } from '../mesh/node.ts'
import { OutputItemStore } from '../openai/responses.ts'
import { FederationRouter } from '../routing/region-router.ts'
import { adminTokenFile, FederationApi } from './api.ts'
import { ApiKeyStore } from './keys.ts'
import { UsageLedger } from './ledger.ts'
import { federationMetrics } from './metrics.ts'
import { RateLimiter } from './rate-limit.ts'
import { RegionDirectory } from './regions.ts'
import { RegionRoute } from './route.ts'
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
  // A head's quarantines (docs/integrity.md): the ledger holds those nodes' unverified credits.
  directory.addEventListener('region:updated', (evt) => {
    if (evt.detail.held.length === 0) return
    try {
      ledger.recordHolds(evt.detail.region, evt.detail.held)
    } catch (err) {
      log.error({ err, region: evt.detail.region }, 'could not record credit holds')
    }
  })

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

  const api = new FederationApi(
    { adminToken, logger: log, peerId: node.peerId.toString() },
    { keys, ledger, limiter, directory, route, metrics, items: new OutputItemStore() },
  )
  const server: Server = createServer((req, res) => void api.serve(req, res))
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
