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
import { DirectPath } from './direct.ts'
import { ApiKeyStore } from './keys.ts'
import { ledgerCloseTimeoutMs, UsageLedger } from './ledger.ts'
import { federationMetrics } from './metrics.ts'
import { RegionDirectory } from './regions.ts'
import { RegionRoute } from './route.ts'
import { type FederationStore, openStore } from './store.ts'

export interface FederationOptions {
  /** federation.db (keys, ledger; unless `database` is given), admin.token and the gateway's libp2p identity. */
  dataDir: string
  /** postgres://...: keys, ledger and rate limits in PostgreSQL, shared with every gateway pointed at it. */
  database?: string
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
  /**
   * Send requests straight to the nodes heads lease this gateway (default true); off, every
   * request goes through its region's head.
   */
  directPath?: boolean
}

export interface Federation {
  url: string
  peerId: PeerId
  node: MeshNode
  adminToken: string
  store: FederationStore
  keys: ApiKeyStore
  ledger: UsageLedger
  directory: RegionDirectory
  router: FederationRouter
  metrics: Registry
  /** The direct path; null when it is off. */
  direct: DirectPath | null
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
  const store = await openStore({ dataDir: options.dataDir, database: options.database, logger: log })
  const keys = new ApiKeyStore(store)
  const ledger = new UsageLedger(store, { logger: log })
  const limiter = store.createLimiter()

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
    ledger.recordHolds(evt.detail.region, evt.detail.held).catch((err: unknown) => {
      log.error({ err, region: evt.detail.region }, 'could not record credit holds')
    })
  })

  const metrics = federationMetrics(directory)
  const firstByteTimeoutMs = options.firstByteTimeoutMs ?? defaultFirstByteTimeoutMs
  const headOf = (region: string): string | null => directory.region(region)?.head ?? null
  const direct =
    options.directPath === false
      ? null
      : new DirectPath({ logger: log, firstByteTimeoutMs }, { node, headOf })
  const route = new RegionRoute(
    {
      maxAttempts: options.maxAttempts ?? 2,
      firstByteTimeoutMs,
      logger: log,
    },
    {
      node,
      router,
      headOf,
      direct,
      ledger,
      limiter,
      metrics,
    },
  )

  const api = new FederationApi(
    { adminToken, logger: log, peerId: node.peerId.toString() },
    { store, keys, ledger, limiter, directory, route, metrics, items: new OutputItemStore(), direct },
  )
  const server: Server = createServer((req, res) => void api.serve(req, res))
  const host = options.httpHost ?? '127.0.0.1'
  const port = options.httpPort ?? defaultFederationPort
  const stopAll = async (): Promise<void> => {
    await direct?.stop()
    await directory.stop()
    await limiter.close()
    try {
      await ledger.close(ledgerCloseTimeoutMs)
    } catch (err) {
      // The sums are in the message: an operator can add them by hand.
      log.error({ err }, 'usage ledger not written before stopping')
    }
    await store.close()
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
  direct?.start()
  log.info({ url, peerId: node.peerId.toString(), store: store.location }, 'federation gateway started')

  let stopped = false
  return {
    url,
    peerId: node.peerId,
    node,
    adminToken,
    store,
    keys,
    ledger,
    directory,
    router,
    metrics: metrics.registry,
    direct,
    async stop() {
      if (stopped) return
      stopped = true
      await closeServer(server)
      await stopAll()
      log.info('federation gateway stopped')
    },
  }
}
