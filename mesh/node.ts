import { noise } from '@chainsafe/libp2p-noise'
import { autoNAT } from '@libp2p/autonat'
import { type CircuitRelayService, circuitRelayServer, circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { dcutr } from '@libp2p/dcutr'
import { identify, identifyPush } from '@libp2p/identify'
import type { Libp2p, PrivateKey } from '@libp2p/interface'
import { kadDHT, passthroughMapper, removePrivateAddressesMapper, type SingleKadDHT } from '@libp2p/kad-dht'
import { peerIdFromString } from '@libp2p/peer-id'
import { type Ping, ping } from '@libp2p/ping'
import { webSockets } from '@libp2p/websockets'
import { type Multiaddr, multiaddr } from '@multiformats/multiaddr'
import { createLibp2p, type ServiceFactoryMap } from 'libp2p'
import { GarageError } from '../core/errors.ts'
import { meshConnectionGater } from './gater.ts'
import {
  backOffEmptyWalks,
  coalescingTcp,
  quietDecoderEnds,
  yamuxHalfWindowUpdates,
} from './libp2p-patches.ts'
import { inferReceiveWindowMaxBytes, KAD_PROTOCOL } from './protocols.ts'

export type MeshRole = 'node' | 'bootstrap'

/** Bootstrap nodes re-announce every 10 minutes; a dead head's record is gone within the hour. */
export const providerRecordValiditySeconds = 60 * 60

export interface RelayServerLimits {
  /** Reservations held at once; past it new ones are refused (bounded memory on the coordinator). */
  maxReservations: number
  /** How long a reservation lasts before the node must renew it. */
  reservationTtlMs: number
  /** Per relayed connection; null lifts the limit (members' inference streams run long). */
  durationLimitMs: number | null
  dataLimitBytes: bigint | null
}

export const defaultRelayServerLimits: RelayServerLimits = {
  maxReservations: 256,
  reservationTtlMs: 60 * 60_000,
  // libp2p's defaults (2 min, 128 KiB) would cut an LLM response in half; a coordinator's relay
  // exists to carry its members' traffic until DCUtR upgrades the connection.
  durationLimitMs: 30 * 60_000,
  dataLimitBytes: 1n << 30n,
}

export interface ConnectionLimits {
  maxConnections: number
  maxIncomingPendingConnections: number
  /** New inbound connections per second from one host. */
  inboundConnectionThreshold: number
  dialTimeoutMs: number
}

/**
 * Chosen on purpose: a gamer's node needs a few dozen links (bootstrap, head, DHT peers) and must not
 * eat a home router's NAT table; a bootstrap node serves a whole region.
 */
export const defaultConnectionLimits: Record<MeshRole, ConnectionLimits> = {
  node: {
    maxConnections: 64,
    maxIncomingPendingConnections: 16,
    inboundConnectionThreshold: 5,
    dialTimeoutMs: 5_000,
  },
  bootstrap: {
    maxConnections: 2_048,
    maxIncomingPendingConnections: 256,
    inboundConnectionThreshold: 20,
    dialTimeoutMs: 5_000,
  },
}

export interface MeshNodeOptions {
  privateKey: PrivateKey
  role?: MeshRole
  /** Listen multiaddrs. Default: TCP and WebSockets on every interface, random ports. */
  listen?: string[]
  /** Addresses to announce instead of the listen addresses (a coordinator's public address). */
  announce?: string[]
  /** Bootstrap multiaddrs with `/p2p/<id>`; dialled at start and kept connected. */
  bootstrap?: string[]
  /** Turn off the public-mode gater and keep private addresses in the DHT: LAN, devnet, tests. */
  allowPrivateAddresses?: boolean
  /** DHT server mode. Default: bootstrap nodes serve the DHT, gamers' nodes are clients. */
  dhtServer?: boolean
  /** Ask bootstrap relays for a reservation so peers can reach this node from behind NAT. Default: nodes yes. */
  relayReservation?: boolean
  relayServer?: Partial<RelayServerLimits>
  connectionLimits?: Partial<ConnectionLimits>
}

export type MeshServices = {
  dht: SingleKadDHT
  ping: Ping
  identify: unknown
  identifyPush: unknown
  autoNAT: unknown
  dcutr: unknown
  relay?: CircuitRelayService
}

export type MeshNode = Libp2p<MeshServices>

/** The bootstrap addresses a node was configured with, split into peer ids and dialable addresses. */
export function parseBootstrapList(list: string[]): Array<{ peerId: string; addr: Multiaddr }> {
  return list.map((s) => {
    let addr: Multiaddr
    try {
      addr = multiaddr(s)
    } catch (err) {
      throw new GarageError(
        `bootstrap address ${JSON.stringify(s)} is not a multiaddr: ${(err as Error).message}`,
        'BOOTSTRAP_ADDR',
      )
    }
    const peerId = addr.getComponents().findLast((c) => c.name === 'p2p')?.value
    if (peerId == null) {
      throw new GarageError(
        `bootstrap address ${s} has no /p2p/<peer id>: the node must know whom it dials`,
        'BOOTSTRAP_ADDR',
      )
    }
    return { peerId, addr }
  })
}

/**
 * Creates (and starts) a mesh node: TCP + WebSockets, noise, yamux, kad-dht on the private
 * `/garage/kad/1.0.0`, identify, ping, AutoNAT, circuit relay v2 (transport everywhere, server on
 * bootstrap nodes) and DCUtR.
 */
export async function createMeshNode(options: MeshNodeOptions): Promise<MeshNode> {
  const role = options.role ?? 'node'
  const allowPrivate = options.allowPrivateAddresses ?? false
  const limits = { ...defaultConnectionLimits[role], ...options.connectionLimits }
  const relayLimits = { ...defaultRelayServerLimits, ...options.relayServer }
  const bootstrap = parseBootstrapList(options.bootstrap ?? [])
  const dhtServer = options.dhtServer ?? role === 'bootstrap'
  const reserve = options.relayReservation ?? role === 'node'
  const listen = options.listen ?? ['/ip4/0.0.0.0/tcp/0', '/ip4/0.0.0.0/tcp/0/ws']

  const services: Record<string, unknown> = {
    identify: identify(),
    identifyPush: identifyPush(),
    ping: ping(),
    autoNAT: autoNAT(),
    dcutr: dcutr(),
    dht: kadDHT({
      protocol: KAD_PROTOCOL,
      clientMode: !dhtServer,
      peerInfoMapper: allowPrivate ? passthroughMapper : removePrivateAddressesMapper,
      // Lookups wait for the first self-query; run it at once, not after kad's default 1 s,
      // or every node's region discovery starts a second late.
      initialQuerySelfInterval: 0,
      // The first bootstrap node of a federation has nobody to ask; its own records still count.
      allowQueryWithZeroPeers: role === 'bootstrap',
      providers: { provideValidity: providerRecordValiditySeconds },
    }),
  }
  if (role === 'bootstrap') {
    services.relay = circuitRelayServer({
      // A federation gateway reaches every NAT'd node of the region through this relay on the direct
      // path: one hop stream per node on its one connection here (libp2p's default allows 32).
      maxInboundHopStreams: Math.max(64, relayLimits.maxReservations),
      maxOutboundStopStreams: Math.max(300, relayLimits.maxReservations * 2),
      reservations: {
        maxReservations: relayLimits.maxReservations,
        reservationTtl: relayLimits.reservationTtlMs,
        applyDefaultLimit: relayLimits.durationLimitMs != null || relayLimits.dataLimitBytes != null,
        ...(relayLimits.durationLimitMs != null ? { defaultDurationLimit: relayLimits.durationLimitMs } : {}),
        ...(relayLimits.dataLimitBytes != null ? { defaultDataLimit: relayLimits.dataLimitBytes } : {}),
      },
    })
  }

  quietDecoderEnds()
  const node = await createLibp2p<MeshServices>({
    privateKey: options.privateKey,
    addresses: {
      listen: reserve ? [...listen, '/p2p-circuit'] : listen,
      ...(options.announce != null ? { announce: options.announce } : {}),
    },
    transports: [
      coalescingTcp(),
      webSockets(),
      circuitRelayTransport({ reservationCompletionTimeout: 10_000 }),
    ],
    connectionEncrypters: [noise()],
    // yamux would grow a stream's window to 16 MiB: a paused reader (a slow API client behind the
    // head) could then hold that much per stream. 1 MiB per RTT still carries any token stream.
    streamMuxers: [
      yamuxHalfWindowUpdates({ streamOptions: { maxStreamWindowSize: inferReceiveWindowMaxBytes } }),
    ],
    connectionGater: meshConnectionGater({
      allowPrivateAddresses: allowPrivate,
      trustedAddresses: bootstrap.map((b) => b.addr),
    }),
    connectionManager: {
      maxConnections: limits.maxConnections,
      maxIncomingPendingConnections: limits.maxIncomingPendingConnections,
      inboundConnectionThreshold: limits.inboundConnectionThreshold,
      dialTimeout: limits.dialTimeoutMs,
      // Loopback peers in devnet and tests all come from one host; never rate-limit them.
      ...(allowPrivate ? { allow: ['/ip4/127.0.0.0/ipcidr/8', '/ip6/::1/ipcidr/128'] } : {}),
    },
    services: services as unknown as ServiceFactoryMap<MeshServices>,
  })

  for (const b of bootstrap) {
    // KEEP_ALIVE tags make libp2p redial a bootstrap node that drops, and keep it when pruning.
    await node.peerStore.merge(peerIdFromString(b.peerId), {
      multiaddrs: [b.addr.decapsulateCode(421)],
      tags: { 'keep-alive-garage-bootstrap': { value: 100 } },
    })
  }
  const keeper = keepBootstrapsDialled(node, bootstrap, limits.dialTimeoutMs)
  // Dial in the background: a dead bootstrap node must not delay the others.
  for (const b of bootstrap) {
    node
      .dial(b.addr, { signal: AbortSignal.timeout(limits.dialTimeoutMs) })
      .catch(() => keeper.redial(b.peerId))
  }
  backOffEmptyWalks(node.peerRouting)
  return node
}

/**
 * Pauses before dialling again a bootstrap node this node has no connection to: from `min`, doubling
 * to `soonMax` for the first minute of an outage (a restarted head, which is also its region's
 * bootstrap node, is reached within 2 s of coming back), then to `max`.
 */
export const bootstrapRedialMs = { min: 500, soonMax: 2_000, soonForMs: 60_000, max: 30_000 } as const

/**
 * Keeps the configured bootstrap nodes dialled, at the address the user gave, for as long as the node
 * runs. libp2p alone does not: identify replaces a peer's addresses with the ones it announces (a
 * bootstrap node behind a port forward or a proxy announces one this node cannot reach), and its
 * reconnect queue gives up after 5 tries (about 30 s) and drops the keep-alive tag. So the configured
 * address is put back after every identify, and a bootstrap node that dropped (or could not be dialled
 * at start) is dialled at it again (bootstrapRedialMs: every 0.5-2 s for a minute, then up to 30 s,
 * jittered) until it answers.
 */
function keepBootstrapsDialled(
  node: Libp2p,
  bootstrap: Array<{ peerId: string; addr: Multiaddr }>,
  dialTimeoutMs: number,
): { redial(peerId: string): void } {
  const byPeer = new Map(bootstrap.map((b) => [b.peerId, b]))
  const timers = new Map<string, NodeJS.Timeout>()
  const delays = new Map<string, number>()
  const downSince = new Map<string, number>()
  let stopped = false
  const connected = (id: string): boolean => node.getConnections(peerIdFromString(id)).length > 0
  const redial = (id: string): void => {
    const b = byPeer.get(id)
    if (b == null || stopped || timers.has(id)) return
    const delay = delays.get(id) ?? bootstrapRedialMs.min
    if (!downSince.has(id)) downSince.set(id, performance.now())
    const timer = setTimeout(
      () => {
        timers.delete(id)
        if (stopped || connected(id)) {
          delays.delete(id)
          downSince.delete(id)
          return
        }
        node
          .dial(b.addr, { signal: AbortSignal.timeout(dialTimeoutMs) })
          .then(async () => {
            delays.delete(id)
            downSince.delete(id)
            // libp2p's reconnect queue may have dropped the tag when it gave up.
            await node.peerStore.merge(peerIdFromString(id), {
              multiaddrs: [b.addr.decapsulateCode(421)],
              tags: { 'keep-alive-garage-bootstrap': { value: 100 } },
            })
          })
          .catch(() => {
            const soon = performance.now() - (downSince.get(id) ?? 0) < bootstrapRedialMs.soonForMs
            delays.set(id, Math.min(delay * 2, soon ? bootstrapRedialMs.soonMax : bootstrapRedialMs.max))
            redial(id)
          })
      },
      delay * (0.75 + Math.random() / 2),
    )
    timer.unref()
    timers.set(id, timer)
  }
  node.addEventListener('peer:disconnect', (evt) => redial(evt.detail.toString()))
  node.addEventListener('peer:identify', (evt) => {
    const b = byPeer.get(evt.detail.peerId.toString())
    if (b == null) return
    void node.peerStore
      .merge(evt.detail.peerId, { multiaddrs: [b.addr.decapsulateCode(421)] })
      .catch(() => {})
  })
  node.addEventListener('stop', () => {
    stopped = true
    for (const t of timers.values()) clearTimeout(t)
    timers.clear()
  })
  return { redial }
}
