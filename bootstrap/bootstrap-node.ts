import { readFile } from 'node:fs/promises'
import type { PeerId } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { Counter, collectDefaultMetrics, Gauge, Registry } from 'prom-client'
import { GarageError } from '../core/errors.ts'
import { type Logger, silentLogger } from '../core/logger.ts'
import {
  decodeRegionCertificate,
  type RegionCertificate,
  type VerifyCertificateOptions,
  verifyRegionCertificate,
} from '../mesh/certificate.ts'
import { allRegionsKey, regionKey } from '../mesh/dht-keys.ts'
import { loadOrCreateIdentity } from '../mesh/identity.ts'
import { createMeshNode, type MeshNode, type RelayServerLimits } from '../mesh/node.ts'
import { KAD_PROTOCOL } from '../mesh/protocols.ts'
import { handleRegionProtocol, type RegionStatusSummary } from '../mesh/region-protocol.ts'
import { type OpsServer, startOpsServer } from './http.ts'

export class BootstrapCertificateError extends GarageError {}

export interface BootstrapOptions {
  dataDir: string
  region: string
  /** Path of the region certificate issued for this node's PeerId. */
  certPath: string
  /** When set, the certificate is fully verified against this authority at start and on reload. */
  authority?: string
  listen?: string[]
  announce?: string[]
  /** Other bootstrap nodes of the federation. */
  bootstrap?: string[]
  allowPrivateAddresses?: boolean
  relay?: Partial<RelayServerLimits>
  httpHost?: string
  /** 0 picks a free port. */
  httpPort?: number
  /** How often the region is announced in the DHT again. */
  announceIntervalMs?: number
  logger?: Logger
}

export const defaultBootstrapHttpPort = 9470
export const defaultAnnounceIntervalMs = 10 * 60_000
/** Provider records live an hour on the DHT servers: re-announce well within it, but not in a loop. */
export const minAnnounceIntervalMs = 10_000
export const maxAnnounceIntervalMs = 30 * 60_000
/** Re-announcements triggered by a DHT server joining: at most one per this, whoever claims the protocol. */
const reannounceOnJoinGapMs = 30_000
const announceTimeoutMs = 30_000

export interface BootstrapNode {
  node: MeshNode
  peerId: PeerId
  region: string
  http: OpsServer
  certificate(): RegionCertificate
  /** Re-reads the certificate file (SIGHUP): a renewed certificate is served without a restart. */
  reloadCertificate(): Promise<RegionCertificate>
  /** Announce the region now; resolves when the provider records are stored. */
  announce(): Promise<void>
  /** What the region protocol says of the region beside the certificate (the head sets it). */
  setRegionStatus(status: (() => RegionStatusSummary) | null): void
  stop(): Promise<void>
}

async function loadCertificate(
  options: BootstrapOptions,
  self: PeerId,
): Promise<{ bytes: Uint8Array; cert: RegionCertificate }> {
  let bytes: Uint8Array
  try {
    bytes = new Uint8Array(await readFile(options.certPath))
  } catch (err) {
    throw new BootstrapCertificateError(
      `cannot read certificate ${options.certPath}: ${(err as Error).message}`,
      'CERT_READ',
      { cause: err },
    )
  }
  let cert: RegionCertificate
  try {
    if (options.authority != null) {
      const verify: VerifyCertificateOptions = {
        authority: options.authority,
        region: options.region,
        head: self,
      }
      cert = await verifyRegionCertificate(bytes, verify)
    } else {
      cert = decodeRegionCertificate(bytes)
    }
  } catch (err) {
    throw new BootstrapCertificateError(
      `certificate ${options.certPath}: ${(err as Error).message}`,
      'CERT_INVALID',
      { cause: err },
    )
  }
  if (cert.region !== options.region) {
    throw new BootstrapCertificateError(
      `certificate ${options.certPath} is for region ${cert.region}, not ${options.region}`,
      'CERT_WRONG_REGION',
    )
  }
  if (cert.head !== self.toString()) {
    throw new BootstrapCertificateError(
      `certificate ${options.certPath} names head ${cert.head}, but this node is ${self.toString()}; issue one with --head ${self.toString()}`,
      'CERT_HEAD_MISMATCH',
    )
  }
  if (cert.expiresAt.getTime() <= Date.now()) {
    throw new BootstrapCertificateError(
      `certificate ${options.certPath} expired at ${cert.expiresAt.toISOString()}`,
      'CERT_EXPIRED',
    )
  }
  return { bytes, cert }
}

/**
 * A bootstrap node: DHT server, circuit relay server with bounded reservations, announcer of its
 * region, server of its certificate on /garage/region/1.0.0, with /metrics and /health over HTTP.
 */
export async function startBootstrap(options: BootstrapOptions): Promise<BootstrapNode> {
  const log = (options.logger ?? silentLogger).child({ component: 'bootstrap', region: options.region })
  const announceIntervalMs = options.announceIntervalMs ?? defaultAnnounceIntervalMs
  if (!(announceIntervalMs >= minAnnounceIntervalMs && announceIntervalMs <= maxAnnounceIntervalMs)) {
    throw new GarageError(
      `the announce interval must be between ${minAnnounceIntervalMs / 1000} s and ${maxAnnounceIntervalMs / 60_000} min`,
      'ANNOUNCE_INTERVAL',
    )
  }
  const privateKey = await loadOrCreateIdentity(options.dataDir)
  const self = peerIdFromPrivateKey(privateKey)
  let current = await loadCertificate(options, self)

  const node = await createMeshNode({
    privateKey,
    role: 'bootstrap',
    ...(options.listen != null ? { listen: options.listen } : {}),
    ...(options.announce != null ? { announce: options.announce } : {}),
    bootstrap: options.bootstrap ?? [],
    allowPrivateAddresses: options.allowPrivateAddresses ?? false,
    ...(options.relay != null ? { relayServer: options.relay } : {}),
  })

  const registry = new Registry()
  collectDefaultMetrics({ register: registry, prefix: 'garage_bootstrap_' })
  const announcements = new Counter({
    name: 'garage_bootstrap_region_announcements_total',
    help: 'DHT announcements of this region, by outcome',
    labelNames: ['outcome'] as const,
    registers: [registry],
  })
  const regionRequests = new Counter({
    name: 'garage_bootstrap_region_requests_total',
    help: 'Certificate requests on /garage/region/1.0.0, by outcome',
    labelNames: ['outcome'] as const,
    registers: [registry],
  })
  new Gauge({
    name: 'garage_bootstrap_connected_peers',
    help: 'Peers with an open connection to this node',
    registers: [registry],
    collect() {
      this.set(node.getPeers().length)
    },
  })
  new Gauge({
    name: 'garage_bootstrap_routing_table_size',
    help: 'Peers in the kad-dht routing table',
    registers: [registry],
    collect() {
      this.set(node.services.dht.routingTable.size)
    },
  })
  new Gauge({
    name: 'garage_bootstrap_relay_reservations',
    help: 'Circuit relay v2 reservations held by this node',
    registers: [registry],
    collect() {
      this.set(node.services.relay?.reservations.size ?? 0)
    },
  })
  new Gauge({
    name: 'garage_bootstrap_certificate_expiry_seconds',
    help: 'Seconds until the region certificate expires (negative once expired)',
    registers: [registry],
    collect() {
      this.set((current.cert.expiresAt.getTime() - Date.now()) / 1000)
    },
  })

  let regionStatus: (() => RegionStatusSummary) | null = null
  await handleRegionProtocol(node, {
    status: () => regionStatus?.() ?? null,
    certificate: () => {
      regionRequests.inc({ outcome: 'served' })
      return current.bytes
    },
    onBadRequest: (err, peer) => {
      regionRequests.inc({ outcome: 'rejected' })
      log.debug({ peer: peer.toString(), err: err.message }, 'bad region request')
    },
  })

  const keys = [await regionKey(options.region), await allRegionsKey()]
  let stopping = false
  const announce = async (): Promise<void> => {
    const signal = AbortSignal.timeout(announceTimeoutMs)
    try {
      await Promise.all(keys.map((k) => node.contentRouting.provide(k, { signal })))
      announcements.inc({ outcome: 'ok' })
      log.debug('region announced in the DHT')
    } catch (err) {
      announcements.inc({ outcome: 'failed' })
      if (!stopping) log.warn({ err: (err as Error).message }, 'region announcement failed; will retry')
      throw err
    }
  }
  // Provider records live on the DHT servers closest to the key: announce again when one joins.
  let pending: NodeJS.Timeout | undefined
  let lastJoinAnnounce = Number.NEGATIVE_INFINITY
  const onIdentify = (evt: CustomEvent<{ protocols: string[] }>): void => {
    if (!evt.detail.protocols.includes(KAD_PROTOCOL) || pending != null || stopping) return
    const wait = Math.max(250, lastJoinAnnounce + reannounceOnJoinGapMs - Date.now())
    pending = setTimeout(() => {
      pending = undefined
      lastJoinAnnounce = Date.now()
      announce().catch(() => {})
    }, wait)
  }
  node.addEventListener('peer:identify', onIdentify as unknown as (evt: Event) => void)
  const interval = setInterval(
    () => announce().catch(() => {}),
    options.announceIntervalMs ?? defaultAnnounceIntervalMs,
  )
  announce().catch(() => {})

  let http: OpsServer
  try {
    http = await startOpsServer(
      {
        '/metrics': async (_req, res) => {
          res.writeHead(200, { 'content-type': registry.contentType }).end(await registry.metrics())
        },
        '/health': (_req, res) => {
          const expired = current.cert.expiresAt.getTime() <= Date.now()
          const body = {
            status: expired ? 'certificate-expired' : 'ok',
            peerId: self.toString(),
            region: options.region,
            peers: node.getPeers().length,
            routingTableSize: node.services.dht.routingTable.size,
            relayReservations: node.services.relay?.reservations.size ?? 0,
            certificateExpiresAt: current.cert.expiresAt.toISOString(),
            addrs: node.getMultiaddrs().map(String),
          }
          res.writeHead(expired ? 503 : 200, { 'content-type': 'application/json' }).end(JSON.stringify(body))
        },
      },
      options.httpHost ?? '127.0.0.1',
      options.httpPort ?? defaultBootstrapHttpPort,
    )
  } catch (err) {
    clearInterval(interval)
    await node.stop()
    throw err
  }
  log.info(
    { peerId: self.toString(), addrs: node.getMultiaddrs().map(String), http: http.url },
    'bootstrap node started',
  )

  return {
    node,
    peerId: self,
    region: options.region,
    http,
    certificate: () => current.cert,
    async reloadCertificate() {
      current = await loadCertificate(options, self)
      log.info({ expiresAt: current.cert.expiresAt.toISOString() }, 'certificate reloaded')
      return current.cert
    },
    announce,
    setRegionStatus(status) {
      regionStatus = status
    },
    async stop() {
      if (stopping) return
      stopping = true
      clearInterval(interval)
      clearTimeout(pending)
      node.removeEventListener('peer:identify', onIdentify as unknown as (evt: Event) => void)
      await http.close()
      await node.stop()
      log.info('bootstrap node stopped')
    },
  }
}
