import type { Socket } from 'node:net'
import { noise } from '@chainsafe/libp2p-noise'
import { type YamuxMuxerInit, yamux } from '@chainsafe/libp2p-yamux'
import { autoNAT } from '@libp2p/autonat'
import { type CircuitRelayService, circuitRelayServer, circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { dcutr } from '@libp2p/dcutr'
import { identify, identifyPush } from '@libp2p/identify'
import type {
  Libp2p,
  MultiaddrConnection,
  PrivateKey,
  StreamMuxerFactory,
  Transport,
  Upgrader,
} from '@libp2p/interface'
import { kadDHT, passthroughMapper, removePrivateAddressesMapper, type SingleKadDHT } from '@libp2p/kad-dht'
import { peerIdFromString } from '@libp2p/peer-id'
import { type Ping, ping } from '@libp2p/ping'
import { type TCPComponents, tcp } from '@libp2p/tcp'
import { webSockets } from '@libp2p/websockets'
import { type Multiaddr, multiaddr } from '@multiformats/multiaddr'
import { createLibp2p, type ServiceFactoryMap } from 'libp2p'
import { GarageError } from '../core/errors.ts'
import { meshConnectionGater } from './gater.ts'
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
 * Gathers what libp2p writes to a TCP socket into fewer writes. noise writes each message as two
 * buffers (its length, then the ciphertext): with TCP_NODELAY (which @libp2p/tcp sets) each was its
 * own syscall and segment, waking the peer for a 2-byte read. Now the first message of a turn of the
 * event loop leaves once the code that wrote it is done, and the rest of that turn's in one write at
 * its end. The bytes, their order and backpressure are unchanged.
 */
function coalesceWrites(maConn: MultiaddrConnection): MultiaddrConnection {
  const conn = maConn as MultiaddrConnection & {
    socket?: Socket
    sendData?: (data: Iterable<Uint8Array>) => { sentBytes: number; canSendMore: boolean }
  }
  const socket = conn.socket
  if (socket == null || typeof conn.sendData !== 'function' || typeof socket.cork !== 'function')
    return maConn
  let corked = false
  // A gathered write already left in this turn of the event loop: later ones wait for its end.
  let sentThisTurn = false
  const endTurn = (): void => {
    sentThisTurn = false
  }
  const flush = (): void => {
    if (!corked) return
    corked = false
    socket.uncork()
  }
  const flushFirst = (): void => {
    if (!corked) return
    flush()
    if (!sentThisTurn) {
      sentThisTurn = true
      setImmediate(endTurn)
    }
  }
  conn.sendData = (data) => {
    if (!corked) {
      corked = true
      socket.cork()
      // The first message of a turn leaves as soon as the code that wrote it is done (a lone
      // request waits for nothing); what follows in the same turn leaves together at its end.
      if (sentThisTurn) setImmediate(flush)
      else queueMicrotask(flushFirst)
    }
    let sentBytes = 0
    let canSendMore = true
    for (const buf of data) {
      sentBytes += buf.byteLength
      canSendMore = socket.write(buf)
      if (!canSendMore) break
    }
    // Bulk data leaves at once, as it did uncorked: only small writes wait.
    if (socket.writableLength >= socket.writableHighWaterMark) flush()
    return { sentBytes, canSendMore }
  }
  return maConn
}

/** @libp2p/tcp with coalesceWrites on every connection it makes or accepts. */
function coalescingTcp(): (components: TCPComponents) => Transport {
  const factory = tcp()
  return (components) => {
    const inner = factory(components)
    const wrap = (upgrader: Upgrader): Upgrader =>
      Object.assign(Object.create(upgrader) as Upgrader, {
        upgradeInbound: (maConn: MultiaddrConnection, opts: Parameters<Upgrader['upgradeInbound']>[1]) =>
          upgrader.upgradeInbound(coalesceWrites(maConn), opts),
        upgradeOutbound: (maConn: MultiaddrConnection, opts: Parameters<Upgrader['upgradeOutbound']>[1]) =>
          upgrader.upgradeOutbound(coalesceWrites(maConn), opts),
      })
    return Object.assign(Object.create(inner) as Transport, {
      dial: (ma: Parameters<Transport['dial']>[0], options: Parameters<Transport['dial']>[1]) =>
        inner.dial(ma, { ...options, upgrader: wrap(options.upgrader) }),
      createListener: (options: Parameters<Transport['createListener']>[0]) =>
        inner.createListener({ ...options, upgrader: wrap(options.upgrader) }),
    })
  }
}

/** What halfWindowUpdates needs of a yamux stream (@chainsafe/libp2p-yamux 8). */
interface YamuxStreamWindow {
  sendWindowUpdate(): void
  recvWindow: number
  recvWindowCapacity: number
  state: number
}
/** YamuxStream's StreamState.Established: no SYN or ACK waits to ride on an update. */
const yamuxEstablished = 3

/**
 * A stream sends a window update once half its receive window is used, as hashicorp/yamux does,
 * instead of after every data frame: for a small request and its answer that was two extra frames,
 * each waking the other process for nothing. The sender always keeps at least half a window, so
 * nothing waits; updates that carry a SYN or ACK, and those after a pause, go out as before.
 */
function halfWindowUpdates(stream: unknown): void {
  const s = stream as Partial<YamuxStreamWindow>
  const update = s.sendWindowUpdate
  if (
    typeof update !== 'function' ||
    typeof s.recvWindow !== 'number' ||
    typeof s.recvWindowCapacity !== 'number'
  )
    return
  s.sendWindowUpdate = function (this: YamuxStreamWindow): void {
    if (this.state === yamuxEstablished && this.recvWindow - this.recvWindowCapacity < this.recvWindow / 2)
      return
    update.call(this)
  }
}

/** yamux with halfWindowUpdates on every stream its muxers make. */
function yamuxHalfWindowUpdates(init: YamuxMuxerInit): () => StreamMuxerFactory {
  const factory = yamux(init)
  return () => {
    const inner = factory()
    return Object.assign(Object.create(inner) as StreamMuxerFactory, {
      createStreamMuxer: (maConn: MultiaddrConnection) => {
        const muxer = inner.createStreamMuxer(maConn)
        const m = muxer as unknown as { _newStream?: (...args: unknown[]) => unknown }
        const newStream = m._newStream
        if (typeof newStream === 'function') {
          m._newStream = function (this: unknown, ...args: unknown[]): unknown {
            const stream = newStream.apply(this, args)
            halfWindowUpdates(stream)
            return stream
          }
        }
        return muxer
      },
    })
  }
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
      reservations: {
        maxReservations: relayLimits.maxReservations,
        reservationTtl: relayLimits.reservationTtlMs,
        applyDefaultLimit: relayLimits.durationLimitMs != null || relayLimits.dataLimitBytes != null,
        ...(relayLimits.durationLimitMs != null ? { defaultDurationLimit: relayLimits.durationLimitMs } : {}),
        ...(relayLimits.dataLimitBytes != null ? { defaultDataLimit: relayLimits.dataLimitBytes } : {}),
      },
    })
  }

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
  // Dial in the background: a dead bootstrap node must not delay the others.
  for (const b of bootstrap) {
    node.dial(b.addr, { signal: AbortSignal.timeout(limits.dialTimeoutMs) }).catch(() => {})
  }
  backOffEmptyWalks(node.peerRouting)
  return node
}

/** The first and longest pause before a closest-peers query that follows one that found nobody. */
export const emptyWalkBackoffMs = { min: 1_000, max: 30_000 } as const

/**
 * libp2p's random walk (which the relay transport runs to find relays for `/p2p-circuit`) asks for
 * closest peers in a loop with no pause: with every known peer unreachable (the head's region is
 * down) each query ends at once and a node spun at 50-75% of a core. A query that found nobody is
 * followed by a pause, doubling to `emptyWalkBackoffMs.max`, reset by one that finds a peer. Reaches
 * into the component libp2p's random walk calls (`node.peerRouting` is that same object); if it is
 * renamed, the stock behaviour stays.
 */
export function backOffEmptyWalks(peerRouting: Libp2p['peerRouting']): void {
  const original = peerRouting.getClosestPeers.bind(peerRouting)
  let pauseMs = 0
  peerRouting.getClosestPeers = async function* (key, options) {
    if (pauseMs > 0) await waitOrAbort(pauseMs, options?.signal)
    let found = false
    try {
      for await (const peer of original(key, options)) {
        found = true
        yield peer
      }
    } finally {
      pauseMs = found ? 0 : Math.min(Math.max(pauseMs * 2, emptyWalkBackoffMs.min), emptyWalkBackoffMs.max)
    }
  }
}

function waitOrAbort(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason)
    const timer = setTimeout(done, ms)
    function done(): void {
      signal?.removeEventListener('abort', aborted)
      resolve()
    }
    function aborted(): void {
      clearTimeout(timer)
      reject(signal?.reason)
    }
    signal?.addEventListener('abort', aborted, { once: true })
  })
}
