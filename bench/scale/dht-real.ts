/**
 * Checks the Kademlia model against the real stack: a few dozen real mesh nodes (createMeshNode,
 * kad-dht on /garage/kad/1.0.0, loopback TCP) with DHT servers and clients, a real provide and real
 * findProviders lookups, and the same lookups run in the model over the servers' REAL routing tables.
 * The tables are read from kad-dht's internals (routingTable.kb, providers): not a public API, so
 * this file may need a touch on a kad-dht upgrade.
 */
import { createHash, randomBytes } from 'node:crypto'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { identify } from '@libp2p/identify'
import type { PeerId } from '@libp2p/interface'
import { kadDHT, passthroughMapper, type QueryEvent } from '@libp2p/kad-dht'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import type { CID } from 'multiformats/cid'
import { regionKey } from '../../mesh/dht-keys.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { KAD_PROTOCOL } from '../../mesh/protocols.ts'
import {
  type KadKey,
  kadDhtParams,
  keyFromKadId,
  lookup,
  ModelNetwork,
  provide,
  type Stats,
  seededRandom,
  stats,
} from './kademlia.ts'

/** kad-dht internals read here. */
interface KadInternals {
  routingTable: { size: number; kb: { toIterable(): Iterable<{ peerId: PeerId }> } }
  providers: { getProviders(cid: CID): Promise<PeerId[]> }
}

export class TablesDidNotSettleError extends Error {
  override name = 'TablesDidNotSettleError'
}

export interface DhtValidation {
  /** Routing tables of the run: kad-dht's own, or smaller ones for multi-hop lookups. */
  table: { kBucketSize: number; prefixLength: number }
  servers: number
  clients: number
  /** k, alpha and disjoint paths as the running kad-dht reports them. */
  kadDht: { k: number; alpha: number; disjointPaths: number }
  serverTableSize: Stats
  /** Servers holding the provider record after the real provide(). */
  realHolders: number
  /** Of the real holders, the share the model's provide() from the provider's real table picks too. */
  modelHolderAgreement: number
  /** Requests that failed in the real lookups (timeouts on a loaded machine): the model has none. */
  real: { foundShare: number; hops: Stats; messages: Stats; queryErrors: number }
  model: { foundShare: number; hops: Stats; messages: Stats }
  /** Connections from clients that each server still holds after the lookups. */
  clientConnectionsPerServer: Stats
  /** Of the servers each client asked, the share it is still connected to afterwards. */
  connectionsKeptShare: number
  wallMs: number
}

function kadKeyOf(bytes: Uint8Array): KadKey {
  return keyFromKadId(createHash('sha256').update(bytes).digest())
}

function dht(node: MeshNode): KadInternals {
  return node.services.dht as unknown as KadInternals
}

/** Routing-table shape for a validation run; null: the stock tables of mesh/node.ts. */
type TableShape = { kBucketSize: number; prefixLength: number } | null

/**
 * A DHT server ('bootstrap') or client ('node'). With a table shape, a plain libp2p node with
 * kad-dht set as mesh/node.ts sets it but for the table: small tables make lookups take several
 * hops among a few dozen servers, the regime the model extrapolates to 10^5.
 */
async function meshNode(
  role: 'bootstrap' | 'node',
  bootstrap: string[],
  shape: TableShape,
): Promise<MeshNode> {
  if (shape != null) {
    const node = await createLibp2p({
      privateKey: await generateKeyPair('Ed25519'),
      addresses: { listen: role === 'bootstrap' ? ['/ip4/127.0.0.1/tcp/0'] : [] },
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      connectionGater: { denyDialMultiaddr: () => false },
      // Every peer comes from 127.0.0.1: no per-host rate limit (as mesh/node.ts with allowPrivateAddresses).
      connectionManager: { allow: ['/ip4/127.0.0.0/ipcidr/8'] },
      services: {
        identify: identify(),
        ping: ping(),
        dht: kadDHT({
          protocol: KAD_PROTOCOL,
          clientMode: role !== 'bootstrap',
          peerInfoMapper: passthroughMapper,
          initialQuerySelfInterval: 0,
          allowQueryWithZeroPeers: role === 'bootstrap',
          kBucketSize: shape.kBucketSize,
          prefixLength: shape.prefixLength,
        }),
      },
    })
    for (const b of bootstrap) await node.dial(multiaddr(b), { signal: AbortSignal.timeout(30_000) })
    return node as unknown as MeshNode
  }
  return createMeshNode({
    privateKey: await generateKeyPair('Ed25519'),
    role,
    listen: role === 'bootstrap' ? ['/ip4/127.0.0.1/tcp/0'] : [],
    bootstrap,
    allowPrivateAddresses: true,
    relayReservation: false,
  })
}

/** Resolves once every node's routing table holds at least one peer. */
async function tablesFilled(nodes: MeshNode[], timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs
  while (nodes.some((n) => dht(n).routingTable.size === 0)) {
    if (performance.now() > deadline) {
      throw new TablesDidNotSettleError(`a routing table is still empty after ${timeoutMs} ms`)
    }
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

/**
 * Resolves once the routing tables' total size has not changed for `stableMs`, or at `timeoutMs`:
 * pings of new contacts go on trickling in, and the model is run on the tables as read anyway.
 */
async function tablesSettled(nodes: MeshNode[], stableMs: number, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs
  let last = -1
  let since = performance.now()
  while (performance.now() < deadline) {
    const total = nodes.reduce((sum, n) => sum + dht(n).routingTable.size, 0)
    if (total !== last) {
      last = total
      since = performance.now()
    } else if (performance.now() - since >= stableMs) return
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

/** The servers holding `provider`'s record for `cid`, once that set has not changed for `stableMs`. */
async function holdersSettled(
  servers: MeshNode[],
  cid: CID,
  provider: PeerId,
  stableMs: number,
  timeoutMs: number,
): Promise<Set<number>> {
  const deadline = performance.now() + timeoutMs
  let last = -1
  let since = performance.now()
  for (;;) {
    const holders = new Set<number>()
    for (const [i, s] of servers.entries()) {
      const held = await dht(s).providers.getProviders(cid)
      if (held.some((p) => p.equals(provider))) holders.add(i)
    }
    if (holders.size !== last) {
      last = holders.size
      since = performance.now()
    } else if (performance.now() - since >= stableMs || performance.now() > deadline) return holders
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

/**
 * kad-dht's bucket refresh, awaited: a walk to a random key in each bucket range but our own (a key
 * sharing exactly `cpl` leading bits with this server). A self-query only walks towards the server's
 * own id, so it learns its own half of the key space; without this, servers know the other half only
 * through the bootstrap they dialled, the mesh splits into cliques joined at one node, and a lookup
 * from one side ends at the other side's closest peers, missing the record (what CI saw: 2-3 of 4
 * found). kad-dht runs the same refresh at start (table still empty: nothing to refresh) and then
 * every 5 minutes, so a network up for longer has these tables.
 */
async function refreshBuckets(node: MeshNode, prefixLength: number): Promise<void> {
  const self = createHash('sha256').update(node.peerId.toMultihash().bytes).digest()
  const leadingBit = (bytes: Uint8Array, i: number): number => (bytes[i >> 3]! >> (7 - (i & 7))) & 1
  for (let cpl = 0; cpl < prefixLength; cpl++) {
    // kad-dht hashes the key: draw keys until the hash shares exactly `cpl` leading bits with ours.
    let key: Uint8Array
    let hash: Buffer
    do {
      key = new Uint8Array(randomBytes(32))
      hash = createHash('sha256').update(key).digest()
    } while (
      !Array.from({ length: cpl }, (_, i) => leadingBit(hash, i) === leadingBit(self, i)).every(Boolean) ||
      leadingBit(hash, cpl) === leadingBit(self, cpl)
    )
    for await (const _ of node.services.dht.getClosestPeers(key)) {
      // drained
    }
  }
}

/** Runs `task` for every item with at most `limit` running at once. */
async function eachLimited<T>(items: T[], limit: number, task: (item: T) => Promise<void>): Promise<void> {
  let next = 0
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) await task(items[next++]!)
    }),
  )
}

/** Hop of the first answer carrying a provider, and the requests sent, from a lookup's events. */
function traceLookup(events: QueryEvent[]): {
  found: boolean
  hops: number | null
  messages: number
  errors: number
} {
  const depth = new Map<string, number>()
  let messages = 0
  let errors = 0
  let hops: number | null = null
  for (const e of events) {
    if (e.name === 'QUERY_ERROR') errors++
    if (e.name === 'SEND_QUERY') {
      messages++
      const to = e.to.toString()
      // Asked before anyone named it: one of the starting peers.
      if (!depth.has(to)) depth.set(to, 1)
    } else if (e.name === 'PEER_RESPONSE') {
      const d = depth.get(e.from.toString()) ?? 1
      for (const p of e.closer) if (!depth.has(p.id.toString())) depth.set(p.id.toString(), d + 1)
      if (hops == null && e.providers.length > 0) hops = d
    }
  }
  return { found: hops != null, hops, messages, errors }
}

export async function validateDhtModel(
  options: {
    servers?: number
    clients?: number
    modelRuns?: number
    seed?: number
    /** Smaller routing tables than kad-dht's (20 per bucket, 6-bit trie), for multi-hop lookups. */
    table?: { kBucketSize: number; prefixLength: number }
  } = {},
): Promise<DhtValidation> {
  const started = performance.now()
  const shape: TableShape = options.table ?? null
  const params = shape == null ? kadDhtParams : { ...kadDhtParams, ...shape }
  const serverCount = options.servers ?? 32
  const clientCount = options.clients ?? 12
  const modelRuns = options.modelRuns ?? 30
  const rng = seededRandom(options.seed ?? 11)
  const nodes: MeshNode[] = []
  try {
    const first = await meshNode('bootstrap', [], shape)
    nodes.push(first)
    const firstAddr = first.getMultiaddrs()[0]!.toString()
    const servers = [first]
    while (servers.length < serverCount) {
      const wave = await Promise.all(
        Array.from({ length: Math.min(8, serverCount - servers.length) }, () =>
          meshNode('bootstrap', [firstAddr], shape),
        ),
      )
      nodes.push(...wave)
      servers.push(...wave)
    }
    // Servers that started together know little of each other until kad-dht's next self-query and
    // bucket refresh (every 5 min): run both now, as in a network that has been up for a while.
    await tablesFilled(servers, 30_000)
    await eachLimited(servers, 4, async (s) => {
      for await (const _ of s.services.dht.getClosestPeers(s.peerId.toMultihash().bytes)) {
        // drained
      }
    })
    await eachLimited(servers, 4, (s) => refreshBuckets(s, params.prefixLength))
    await tablesSettled(servers, 1_000, 20_000)

    const cid = await regionKey('scale-validation')
    const provider = servers[1]!
    for await (const _ of provider.services.dht.provide(cid)) {
      // drained: provide() is done when its events end
    }
    const serverIds = servers.map((s) => s.peerId.toString())
    const indexOf = new Map(serverIds.map((id, i) => [id, i]))
    // ADD_PROVIDER is sent without an answer: records land a moment after provide() returns.
    const realHolders = await holdersSettled(servers, cid, provider.peerId, 1_000, 10_000)
    const tables = new Map<number, number[]>()
    for (const [i, s] of servers.entries()) {
      const peers: number[] = []
      for (const entry of dht(s).routingTable.kb.toIterable()) {
        const j = indexOf.get(entry.peerId.toString())
        if (j != null) peers.push(j)
      }
      tables.set(i, peers)
    }
    const { network, indexOf: modelIndex } = ModelNetwork.fromKeys(
      servers.map((s) => kadKeyOf(s.peerId.toMultihash().bytes)),
      params,
      1,
      tables,
    )
    const target = kadKeyOf(cid.multihash.bytes)
    const modelHolders = new Set([...realHolders].map((i) => modelIndex[i]!))
    const modelProvide = provide(network, modelIndex[1]!, target, rng)
    const agreed = [...modelHolders].filter((h) => modelProvide.has(h)).length

    const clients: MeshNode[] = []
    for (let i = 0; i < clientCount; i++) {
      const via = servers[Math.floor(rng() * servers.length)]!.getMultiaddrs()[0]!.toString()
      const client = await meshNode('node', [via], shape)
      nodes.push(client)
      clients.push(client)
    }
    // Each client's first self-query fills its table; lookups start after it.
    await tablesFilled(clients, 30_000)
    await tablesSettled(clients, 1_000, 20_000)

    const real = { found: 0, hops: [] as number[], messages: [] as number[], errors: 0 }
    const model = { found: 0, hops: [] as number[], messages: [] as number[] }
    let asked = 0
    let kept = 0
    for (const client of clients) {
      const known: number[] = []
      for (const entry of dht(client).routingTable.kb.toIterable()) {
        const j = indexOf.get(entry.peerId.toString())
        if (j != null) known.push(modelIndex[j]!)
      }
      const connectedAtStart = new Set<number>()
      for (const c of client.getConnections()) {
        const j = indexOf.get(c.remotePeer.toString())
        if (j != null) connectedAtStart.add(modelIndex[j]!)
      }
      const events: QueryEvent[] = []
      for await (const e of client.services.dht.findProviders(cid, { signal: AbortSignal.timeout(30_000) })) {
        events.push(e)
      }
      const trace = traceLookup(events)
      real.messages.push(trace.messages)
      real.errors += trace.errors
      if (trace.found) {
        real.found++
        real.hops.push(trace.hops!)
      }
      const contacted = new Set(events.flatMap((e) => (e.name === 'SEND_QUERY' ? [e.to.toString()] : [])))
      const open = new Set(client.getConnections().map((c) => c.remotePeer.toString()))
      asked += contacted.size
      kept += [...contacted].filter((p) => open.has(p)).length
      for (let r = 0; r < modelRuns; r++) {
        const res = lookup(network, {
          target,
          known,
          holders: modelHolders,
          connected: new Set(connectedAtStart),
          rng,
        })
        model.messages.push(res.messages)
        if (res.found) {
          model.found++
          model.hops.push(res.hops!)
        }
      }
    }
    const clientSet = new Set(clients.map((c) => c.peerId.toString()))
    const perServer = servers.map(
      (s) => s.getConnections().filter((c) => clientSet.has(c.remotePeer.toString())).length,
    )
    const kad = first.services.dht
    return {
      table: { kBucketSize: params.kBucketSize, prefixLength: params.prefixLength },
      servers: serverCount,
      clients: clientCount,
      kadDht: { k: kad.k, alpha: kad.a, disjointPaths: kad.d },
      serverTableSize: stats(servers.map((s) => dht(s).routingTable.size)),
      realHolders: realHolders.size,
      modelHolderAgreement: modelHolders.size > 0 ? agreed / modelHolders.size : 0,
      real: {
        foundShare: real.found / clientCount,
        hops: stats(real.hops),
        messages: stats(real.messages),
        queryErrors: real.errors,
      },
      model: {
        foundShare: model.found / (clientCount * modelRuns),
        hops: stats(model.hops),
        messages: stats(model.messages),
      },
      clientConnectionsPerServer: stats(perServer),
      connectionsKeptShare: asked > 0 ? kept / asked : 0,
      wallMs: Math.round(performance.now() - started),
    }
  } finally {
    await Promise.allSettled(nodes.map((n) => n.stop()))
  }
}
