/**
 * The DHT figures of docs/scale.md, from the model in kademlia.ts:
 * - kademliaAt: lookups among N DHT servers (every peer a server), as the brief's 10^4 / 10^5.
 * - garageDiscovery: what Garage runs, where only bootstrap nodes are DHT servers and gamers' nodes
 *   are clients that start, self-query, then look their region's key up; and the load that puts
 *   on the servers holding a key.
 */
import { defaultConnectionLimits } from '../../mesh/node.ts'
import {
  type ClientDiscovery,
  clientDiscovery,
  internetLatency,
  type KadParams,
  type LatencyModel,
  lookup,
  ModelNetwork,
  provide,
  randomKey,
  type Stats,
  seededRandom,
  stats,
} from './kademlia.ts'

/** Requests on connections that are already open: the RTT only. */
const warmLatency: LatencyModel = { rttMs: internetLatency.rttMs, connectRtts: 0 }

export interface KademliaFigures {
  servers: number
  table: KadParams['table']
  alpha: number
  disjointPaths: number
  lookups: number
  /** Lookups that reached a provider record. */
  foundShare: number
  hops: Stats
  /** To the first provider, dialling every server not yet connected (a fresh lookup). */
  timeToFirstMs: Stats
  /** The same with every connection already open. */
  timeToFirstWarmMs: Stats
  /** Requests sent per lookup (findProviders runs until its paths end: few providers per key). */
  messages: Stats
  /** getClosestPeers walks whose closest answer is the true closest server. */
  exactClosestShare: number
  /** Textbook estimate of hops, log2(N) / log2(k): each hop learns k peers of the target's subtree. */
  theoryHops: number
  wallMs: number
}

/**
 * `lookups` samples at N servers: a random key provided by a random server (provide() as kad-dht
 * does it), then found from another random server; and a getClosestPeers walk judged against
 * the truth.
 */
export function kademliaAt(options: {
  servers: number
  params: KadParams
  lookups: number
  seed?: number
}): KademliaFigures {
  const started = performance.now()
  const seed = options.seed ?? 1
  const net = ModelNetwork.random(options.servers, options.params, seed)
  const rng = seededRandom(seed + 1)
  const n = options.servers
  const hops: number[] = []
  const first: number[] = []
  const warm: number[] = []
  const messages: number[] = []
  let found = 0
  let exact = 0
  for (let i = 0; i < options.lookups; i++) {
    const key = randomKey(rng)
    const holders = provide(net, Math.floor(rng() * n), key, rng)
    const from = Math.floor(rng() * n)
    const cold = lookup(net, { target: key, self: from, holders, rng })
    const hot = lookup(net, { target: key, self: from, holders, rng, latency: warmLatency })
    messages.push(cold.messages)
    if (cold.found) {
      found++
      hops.push(cold.hops!)
      first.push(cold.timeToFirstMs!)
    }
    if (hot.found) warm.push(hot.timeToFirstMs!)
    const walk = lookup(net, { target: key, self: from, rng })
    if (walk.closest[0] === net.trueClosest(key, 1, from)[0]) exact++
  }
  return {
    servers: n,
    table: options.params.table,
    alpha: options.params.alpha,
    disjointPaths: options.params.disjointPaths,
    lookups: options.lookups,
    foundShare: found / options.lookups,
    hops: stats(hops),
    timeToFirstMs: stats(first),
    timeToFirstWarmMs: stats(warm),
    messages: stats(messages),
    exactClosestShare: exact / options.lookups,
    theoryHops: Math.log2(n) / Math.log2(options.params.kBucketSize),
    wallMs: Math.round(performance.now() - started),
  }
}

export interface GarageDiscoveryFigures {
  /** DHT servers: the federation's bootstrap nodes. */
  servers: number
  regions: number
  samples: number
  /** Servers holding the region key's record (provide(): the k closest, and the provider). */
  regionKeyHolders: number
  /** A fresh node: kad-dht's self-query, then the region key's lookup. */
  selfQueryMessages: Stats
  regionLookupMessages: Stats
  /** Servers a node stays connected to afterwards (libp2p keeps DHT connections open). */
  connectionsPerNode: Stats
  /**
   * Gamers' nodes in the whole mesh at which the average server holds its connection cap (2048):
   * past it servers refuse new connections. A key's holders reach it sooner: every node that looks
   * the key up stays connected to them.
   */
  nodesAtServerConnectionCap: number
  foundShare: number
  hops: Stats
  /** From the node's start to its region key's first provider (the self-query comes first). */
  timeToFirstMs: Stats
  /** Share of the region's lookups that reach the busiest server: its load per node looking up. */
  busiestServerShare: number
  /** The same for /garage/regions/all, which every node without --region looks up. */
  allRegions: { foundShare: number; messages: Stats; busiestServerShare: number }
  wallMs: number
}

/**
 * Garage's own DHT: `regions` regions with `serversPerRegion` bootstrap nodes each (the only DHT
 * servers), and fresh gamers' nodes (DHT clients) of one region that start with their region's
 * bootstrap nodes, as RegionDiscovery does after `garage node` starts.
 */
export function garageDiscovery(options: {
  regions: number
  serversPerRegion?: number
  params: KadParams
  samples: number
  seed?: number
}): GarageDiscoveryFigures {
  const started = performance.now()
  const seed = options.seed ?? 2
  const perRegion = options.serversPerRegion ?? 2
  const servers = options.regions * perRegion
  const net = ModelNetwork.random(servers, options.params, seed)
  const rng = seededRandom(seed + 1)
  const chosen = new Set<number>()
  while (chosen.size < Math.min(perRegion, servers)) chosen.add(Math.floor(rng() * servers))
  const regionServers = [...chosen]
  const regionKey = randomKey(rng)
  const regionHolders = new Set<number>()
  for (const s of regionServers) for (const h of provide(net, s, regionKey, rng)) regionHolders.add(h)
  // Every region's bootstrap nodes announce the all-regions key.
  const allKey = randomKey(rng)
  const allHolders = new Set<number>()
  for (let r = 0; r < options.regions; r++) {
    for (const h of provide(net, Math.floor(rng() * servers), allKey, rng)) allHolders.add(h)
  }
  const regionHits = new Map<number, number>()
  const allHits = new Map<number, number>()
  const runs: ClientDiscovery[] = []
  const allRuns: ClientDiscovery[] = []
  for (let i = 0; i < options.samples; i++) {
    const self = randomKey(rng)
    const run = clientDiscovery(net, {
      bootstrap: regionServers,
      self,
      target: regionKey,
      holders: regionHolders,
      rng,
    })
    runs.push(run)
    for (const s of run.region.contacted) regionHits.set(s, (regionHits.get(s) ?? 0) + 1)
    const all = clientDiscovery(net, {
      bootstrap: regionServers,
      self,
      target: allKey,
      holders: allHolders,
      providersPerHolder: options.regions,
      rng,
    })
    allRuns.push(all)
    for (const s of all.region.contacted) allHits.set(s, (allHits.get(s) ?? 0) + 1)
  }
  const found = runs.filter((r) => r.region.found)
  return {
    servers,
    regions: options.regions,
    samples: options.samples,
    regionKeyHolders: regionHolders.size,
    selfQueryMessages: stats(runs.map((r) => r.selfQuery.messages)),
    regionLookupMessages: stats(runs.map((r) => r.region.messages)),
    connectionsPerNode: stats(runs.map((r) => r.connections)),
    nodesAtServerConnectionCap: Math.round(
      (defaultConnectionLimits.bootstrap.maxConnections * servers) /
        stats(runs.map((r) => r.connections)).mean,
    ),
    foundShare: found.length / runs.length,
    hops: stats(found.map((r) => r.region.hops!)),
    timeToFirstMs: stats(found.map((r) => r.timeToFirstMs!)),
    busiestServerShare: Math.max(0, ...regionHits.values()) / options.samples,
    allRegions: {
      foundShare: allRuns.filter((r) => r.region.found).length / allRuns.length,
      messages: stats(allRuns.map((r) => r.region.messages)),
      busiestServerShare: Math.max(0, ...allHits.values()) / options.samples,
    },
    wallMs: Math.round(performance.now() - started),
  }
}
