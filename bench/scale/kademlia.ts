/**
 * A model of @libp2p/kad-dht 16.4's lookups over N DHT servers, cheap enough for N = 10^5.
 *
 * Faithful to the code in node_modules/@libp2p/kad-dht (read, not guessed):
 * - Routing table (routing-table/k-bucket.js): a prefix trie whose buckets split when they hold
 *   kBucketSize (20) peers and are shallower than prefixLength (6), whatever their prefix. So a
 *   table keeps, for each 6-bit prefix of the keyspace, min(20, peers with that prefix), the first
 *   20 it met: at most 64 x 20 = 1280 peers, spread evenly, with no finer view of its own
 *   neighbourhood. We fill it with a uniform random sample of each prefix group (the order a real
 *   node meets its peers in), drawn from a seed per node so a node's table is the same each time.
 * - Lookups (query/manager.js, query/query-path.js): the k closest peers of the caller's table,
 *   shuffled and dealt over d = 10 disjoint paths; each path a queue of alpha = 10 concurrent
 *   requests, closest first. A peer is asked only if it could still enter the path's list of the k
 *   closest that answered; a returned peer is queued only if it is closer to the key than the peer
 *   that returned it and no path has seen it. A path ends when its queue is empty.
 * - findProviders (content-routing/index.js) returns once k providers are found, else runs every
 *   path to its end; provide() stores the record on the k closest peers a getClosestPeers walk found,
 *   and on the provider itself.
 * - Answers (rpc/handlers/get-providers.js): the k closest peers of the responder's own table.
 *
 * Keys are the first 64 bits of the 256-bit kad ids (sha256 of the peer id or of the key): at
 * 10^5 ids two share 64 bits with probability ~3e-10, so XOR order is the same as with 256.
 * The "classic" table is the Kademlia paper's (one bucket of k per distance from the owner), for
 * comparison with the theory; kad-dht does not use it.
 */

import { TimeHeap } from './time-heap.ts'

/** Parameters of the DHT being modelled. */
export interface KadParams {
  table: 'trie' | 'classic'
  kBucketSize: number
  /** Trie depth: kad-dht's prefixLength (trie tables only). */
  prefixLength: number
  alpha: number
  disjointPaths: number
}

/** @libp2p/kad-dht 16.4.5 as mesh/node.ts configures it (only protocol and timers changed). */
export const kadDhtParams: KadParams = {
  table: 'trie',
  kBucketSize: 20,
  prefixLength: 6,
  alpha: 10,
  disjointPaths: 10,
}

/** The Kademlia paper's table with alpha = 3 on one path: the textbook figures. */
export const classicKademliaParams: KadParams = {
  table: 'classic',
  kBucketSize: 20,
  prefixLength: 0,
  alpha: 3,
  disjointPaths: 1,
}

/** The first 64 bits of a kad id, as two unsigned 32-bit halves. */
export interface KadKey {
  hi: number
  lo: number
}

/** mulberry32: a small seeded PRNG, so every run of the simulation is the same. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

export function randomKey(rng: () => number): KadKey {
  return { hi: Math.floor(rng() * 2 ** 32) >>> 0, lo: Math.floor(rng() * 2 ** 32) >>> 0 }
}

/** The model key of a real kad id (sha256 digest, 32 bytes). */
export function keyFromKadId(kadId: Uint8Array): KadKey {
  const view = new DataView(kadId.buffer, kadId.byteOffset, kadId.byteLength)
  return { hi: view.getUint32(0), lo: view.getUint32(4) }
}

/** Common leading bits of two keys (0..64). */
export function commonPrefixBits(a: KadKey, b: KadKey): number {
  const h = (a.hi ^ b.hi) >>> 0
  if (h !== 0) return Math.clz32(h)
  const l = (a.lo ^ b.lo) >>> 0
  return l === 0 ? 64 : 32 + Math.clz32(l)
}

/** Tables kept at once; they are regenerated from their seed when evicted, so this bounds memory only. */
const tableCacheSize = 50_000

/** N DHT servers with random ids (sorted), and their routing tables, made on demand. */
export class ModelNetwork {
  readonly size: number
  readonly params: KadParams
  readonly hi: Uint32Array
  readonly lo: Uint32Array
  readonly #seed: number
  readonly #tables = new Map<number, Int32Array>()
  readonly #fixedTables: ReadonlyMap<number, Int32Array> | null
  /** Trie tables: where each prefix group starts in the sorted ids (the same for every owner). */
  #groupStarts: Int32Array | null = null

  private constructor(
    hi: Uint32Array,
    lo: Uint32Array,
    params: KadParams,
    seed: number,
    fixed: ReadonlyMap<number, Int32Array> | null,
  ) {
    this.size = hi.length
    this.hi = hi
    this.lo = lo
    this.params = params
    this.#seed = seed
    this.#fixedTables = fixed
  }

  /** `size` servers with uniformly random ids. */
  static random(size: number, params: KadParams, seed: number): ModelNetwork {
    const rng = seededRandom(seed)
    const keys = Array.from({ length: size }, () => randomKey(rng))
    return ModelNetwork.fromKeys(keys, params, seed).network
  }

  /**
   * Servers with the given ids; `tables` (indexes into `keys`), when given, replace the modelled
   * routing tables (the real tables of a real network). Returns where each key went in sorted order.
   */
  static fromKeys(
    keys: KadKey[],
    params: KadParams,
    seed: number,
    tables?: ReadonlyMap<number, number[]>,
  ): { network: ModelNetwork; indexOf: number[] } {
    const order = keys.map((_, i) => i)
    order.sort((a, b) => keys[a]!.hi - keys[b]!.hi || keys[a]!.lo - keys[b]!.lo)
    const hi = new Uint32Array(keys.length)
    const lo = new Uint32Array(keys.length)
    const indexOf = new Array<number>(keys.length)
    order.forEach((from, to) => {
      hi[to] = keys[from]!.hi
      lo[to] = keys[from]!.lo
      indexOf[from] = to
    })
    let fixed: Map<number, Int32Array> | null = null
    if (tables != null) {
      fixed = new Map()
      for (const [owner, peers] of tables) {
        fixed.set(indexOf[owner]!, Int32Array.from(peers.map((p) => indexOf[p]!)))
      }
    }
    return { network: new ModelNetwork(hi, lo, params, seed, fixed), indexOf }
  }

  key(i: number): KadKey {
    return { hi: this.hi[i]!, lo: this.lo[i]! }
  }

  /** Servers whose first `bits` bits equal those of `k`: a contiguous range of the sorted ids. */
  prefixRange(bits: number, k: KadKey): [number, number] {
    const mh = bits <= 0 ? 0 : bits >= 32 ? 0xffffffff : (0xffffffff << (32 - bits)) >>> 0
    const ml = bits <= 32 ? 0 : bits >= 64 ? 0xffffffff : (0xffffffff << (64 - bits)) >>> 0
    const ph = (k.hi & mh) >>> 0
    const pl = (k.lo & ml) >>> 0
    const cmp = (i: number): number => {
      const h = (this.hi[i]! & mh) >>> 0
      if (h !== ph) return h < ph ? -1 : 1
      const l = (this.lo[i]! & ml) >>> 0
      return l === pl ? 0 : l < pl ? -1 : 1
    }
    const bound = (upper: boolean): number => {
      let a = 0
      let b = this.size
      while (a < b) {
        const m = (a + b) >>> 1
        const c = cmp(m)
        if (c < 0 || (upper && c === 0)) a = m + 1
        else b = m
      }
      return a
    }
    return [bound(false), bound(true)]
  }

  /** Server i's routing table (indexes of the servers it knows). */
  table(i: number): Int32Array {
    const fixed = this.#fixedTables?.get(i)
    if (fixed != null) return fixed
    if (this.#fixedTables != null) return new Int32Array(0)
    let t = this.#tables.get(i)
    if (t == null) {
      t = this.#makeTable(i)
      if (this.#tables.size >= tableCacheSize) this.#tables.clear()
      this.#tables.set(i, t)
    }
    return t
  }

  /**
   * What server `owner` answers for `target`: the `count` closest peers of its table. For a trie
   * table only the prefix groups nearest the target are drawn: every member of group g ^ x is
   * closer to the target than every member of group g ^ y when x < y.
   */
  answer(owner: number, target: KadKey, count: number): number[] {
    if (this.params.table !== 'trie' || this.#fixedTables != null) {
      return this.closest(this.table(owner), target, count)
    }
    const depth = this.params.prefixLength
    const groups = 2 ** depth
    const tg = target.hi >>> (32 - depth)
    const gathered: number[] = []
    for (let x = 0; x < groups && gathered.length < count; x++) {
      gathered.push(...this.#groupSample(owner, tg ^ x))
    }
    return this.closest(gathered, target, count)
  }

  /** The members of prefix group g that `owner`'s trie table keeps: min(k, group) of them, uniformly. */
  #groupSample(owner: number, g: number): number[] {
    const starts = this.#trieGroups()
    const rng = seededRandom(
      (this.#seed ^ Math.imul(owner + 1, 0x9e3779b1) ^ Math.imul(g + 1, 0x85ebca6b)) >>> 0,
    )
    const out: number[] = []
    sampleRange(starts[g]!, starts[g + 1]!, this.params.kBucketSize, owner, rng, out)
    return out
  }

  #makeTable(i: number): Int32Array {
    const out: number[] = []
    if (this.params.table === 'trie') {
      for (let g = 0; g < 2 ** this.params.prefixLength; g++) out.push(...this.#groupSample(i, g))
      return Int32Array.from(out)
    }
    const rng = seededRandom((this.#seed ^ Math.imul(i + 1, 0x9e3779b1)) >>> 0)
    const k = this.params.kBucketSize
    const own = this.key(i)
    for (let bit = 0; bit < 64; bit++) {
      const [os, oe] = this.prefixRange(bit + 1, own)
      const sibling =
        bit < 32
          ? { hi: (own.hi ^ (0x80000000 >>> bit)) >>> 0, lo: own.lo }
          : { hi: own.hi, lo: (own.lo ^ (0x80000000 >>> (bit - 32))) >>> 0 }
      const [s, e] = this.prefixRange(bit + 1, sibling)
      sampleRange(s, e, k, i, rng, out)
      // Past the depth where the owner is alone in its subtree, every sibling subtree is empty.
      if (oe - os <= 1) break
    }
    return Int32Array.from(out)
  }

  #trieGroups(): Int32Array {
    if (this.#groupStarts == null) {
      const depth = this.params.prefixLength
      const starts = new Int32Array(2 ** depth + 1)
      for (let g = 0; g < 2 ** depth; g++) {
        starts[g] = this.prefixRange(depth, { hi: (g << (32 - depth)) >>> 0, lo: 0 })[0]
      }
      starts[2 ** depth] = this.size
      this.#groupStarts = starts
    }
    return this.#groupStarts
  }

  /** The `count` peers of `peers` closest to `target`, closest first; never `exclude`. */
  closest(peers: ArrayLike<number>, target: KadKey, count: number, exclude = -1): number[] {
    const best: number[] = []
    for (let j = 0; j < peers.length; j++) {
      const p = peers[j]!
      if (p === exclude) continue
      const ph = this.hi[p]!
      const pl = this.lo[p]!
      if (best.length === count) {
        const last = best[count - 1]!
        if (!this.#closer(ph, pl, last, target)) continue
      }
      let at = best.length
      while (at > 0 && this.#closer(ph, pl, best[at - 1]!, target)) at--
      best.splice(at, 0, p)
      if (best.length > count) best.pop()
    }
    return best
  }

  /** Every server considered: the truth a lookup is judged against. */
  trueClosest(target: KadKey, count: number, exclude = -1): number[] {
    const all = new Int32Array(this.size)
    for (let i = 0; i < this.size; i++) all[i] = i
    return this.closest(all, target, count, exclude)
  }

  /** True when server a is strictly closer to the target than server b. */
  isCloser(a: number, b: number, target: KadKey): boolean {
    return this.#closer(this.hi[a]!, this.lo[a]!, b, target)
  }

  #closer(ah: number, al: number, b: number, t: KadKey): boolean {
    const da = (ah ^ t.hi) >>> 0
    const db = (this.hi[b]! ^ t.hi) >>> 0
    if (da !== db) return da < db
    return (al ^ t.lo) >>> 0 < (this.lo[b]! ^ t.lo) >>> 0
  }
}

/** Appends min(k, members) members of [s, e) other than `self`, chosen uniformly. */
function sampleRange(s: number, e: number, k: number, self: number, rng: () => number, out: number[]): void {
  const hasSelf = self >= s && self < e
  const n = e - s - (hasSelf ? 1 : 0)
  if (n <= 0) return
  if (n <= k) {
    for (let i = s; i < e; i++) if (i !== self) out.push(i)
    return
  }
  const picked = new Set<number>()
  while (picked.size < k) {
    const i = s + Math.floor(rng() * (e - s))
    if (i !== self) picked.add(i)
  }
  for (const i of picked) out.push(i)
}

/** How long one request takes: an RTT, plus the handshake when there is no connection yet. */
export interface LatencyModel {
  rttMs(rng: () => number): number
  /** Round trips to open a connection before the first request: TCP, multistream-select, noise XX. */
  connectRtts: number
}

/**
 * Internet RTTs between home machines: log-normal, median 80 ms, p99 about 400 ms, the shape of
 * measured all-pairs datasets (King, RIPE Atlas). A new libp2p connection costs about 3 RTTs before
 * the first request (TCP 1, noise XX 1.5, multistream-select 0.5 with lazy negotiation).
 */
export const internetLatency: LatencyModel = {
  rttMs(rng) {
    // Box-Muller: one standard normal from two uniforms.
    const u = Math.max(rng(), 1e-12)
    const z = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng())
    return Math.min(2_000, Math.max(2, 80 * Math.exp(0.7 * z)))
  },
  connectRtts: 3,
}

export interface LookupInit {
  target: KadKey
  /** The routing table the lookup starts from (default: the table of `self`). */
  known?: ArrayLike<number>
  /** The querying node when it is itself a server: never asked. */
  self?: number
  /** Servers holding a provider record for the key (a findProviders walk); none: getClosestPeers. */
  holders?: ReadonlySet<number>
  /** Distinct providers each holder returns (1 for a region key, one per region for the all-regions key). */
  providersPerHolder?: number
  /** Servers the querying node is connected to; the lookup adds those it dials. */
  connected?: Set<number>
  latency?: LatencyModel
  rng: () => number
}

export interface LookupResult {
  found: boolean
  /** Hop of the first answer carrying a provider: the starting peers are hop 1; 0 when the caller holds it. */
  hops: number | null
  timeToFirstMs: number | null
  /** Requests sent before that answer arrived. */
  messagesToFirst: number | null
  /** Requests sent in all: each to a distinct server (the paths share the set of peers seen). */
  messages: number
  /** Until the walk ends (findProviders: k providers, or every path exhausted). */
  durationMs: number
  /** Every server asked, in the order asked. */
  contacted: number[]
  /** The k closest servers that answered, closest first: getClosestPeers' answer. */
  closest: number[]
}

interface Job {
  peer: number
  depth: number
}

interface Path {
  queue: Job[]
  running: number
  /** Closest answered peers on this path, closest first (kad-dht's PeerDistanceList). */
  closest: number[]
}

interface Pending {
  at: number
  path: number
  job: Job
}

/** One iterative lookup, event by event on a simulated clock. */
export function lookup(net: ModelNetwork, init: LookupInit): LookupResult {
  const { target, rng } = init
  const { kBucketSize: k, alpha, disjointPaths } = net.params
  const self = init.self ?? -1
  const holders = init.holders ?? null
  const latency = init.latency ?? internetLatency
  const connected = init.connected ?? new Set<number>()
  const stopAtProviders = k
  const providersPerHolder = init.providersPerHolder ?? 1

  const result: LookupResult = {
    found: false,
    hops: null,
    timeToFirstMs: null,
    messagesToFirst: null,
    messages: 0,
    durationMs: 0,
    contacted: [],
    closest: [],
  }
  // The caller's own record answers at once (kad-dht checks its provider store first).
  if (holders?.has(self) === true) {
    result.found = true
    result.hops = 0
    result.timeToFirstMs = 0
    result.messagesToFirst = 0
    if (providersPerHolder >= stopAtProviders) return result
  }

  const seen = new Set<number>()
  const timeline = new TimeHeap<Pending>()
  const canEnter = (list: number[], peer: number): boolean =>
    list.length < k || net.isCloser(peer, list[list.length - 1]!, target)
  const insert = (list: number[], peer: number): void => {
    if (list.includes(peer) || !canEnter(list, peer)) return
    let at = list.length
    while (at > 0 && net.isCloser(peer, list[at - 1]!, target)) at--
    list.splice(at, 0, peer)
    if (list.length > k) list.pop()
  }

  if (init.known == null && init.self == null) throw new RangeError('a lookup needs a table: known or self')
  const start = init.known == null ? net.answer(self, target, k) : net.closest(init.known, target, k, self)
  // kad-dht shuffles the starting peers and deals them over the paths.
  for (let i = start.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1))
    ;[start[i], start[j]] = [start[j]!, start[i]!]
  }
  const paths: Path[] = []
  for (let p = 0; p < Math.min(disjointPaths, start.length); p++)
    paths.push({ queue: [], running: 0, closest: [] })

  let now = 0
  let providersFound = result.found ? providersPerHolder : 0
  let done = false

  const pump = (pathIndex: number): void => {
    const path = paths[pathIndex]!
    while (path.running < alpha && path.queue.length > 0) {
      // The queue runs the closest job first; the check that it can still matter is made as it starts.
      let bestAt = 0
      for (let q = 1; q < path.queue.length; q++) {
        if (net.isCloser(path.queue[q]!.peer, path.queue[bestAt]!.peer, target)) bestAt = q
      }
      const job = path.queue.splice(bestAt, 1)[0]!
      if (!canEnter(path.closest, job.peer)) continue
      path.running++
      result.messages++
      result.contacted.push(job.peer)
      const dial = connected.has(job.peer) ? 0 : latency.connectRtts
      connected.add(job.peer)
      const at = now + latency.rttMs(rng) * (1 + dial)
      timeline.push(at, { at, path: pathIndex, job })
    }
  }

  start.forEach((peer, i) => {
    seen.add(peer)
    paths[i % paths.length]!.queue.push({ peer, depth: 1 })
  })
  for (let p = 0; p < paths.length; p++) pump(p)

  while (!done && timeline.size > 0) {
    const event = timeline.pop()!
    now = event.at
    const path = paths[event.path]!
    const { peer, depth } = event.job
    path.running--
    insert(path.closest, peer)
    insert(result.closest, peer)
    if (holders?.has(peer) === true) {
      if (!result.found) {
        result.found = true
        result.hops = depth
        result.timeToFirstMs = now
        result.messagesToFirst = result.messages
      }
      providersFound = Math.max(providersFound, providersPerHolder)
      if (providersFound >= stopAtProviders) done = true
    }
    if (!done) {
      for (const next of net.answer(peer, target, k)) {
        if (seen.has(next) || next === self) continue
        if (!net.isCloser(next, peer, target)) continue
        if (!canEnter(path.closest, next)) continue
        seen.add(next)
        path.queue.push({ peer: next, depth: depth + 1 })
      }
      pump(event.path)
    }
  }
  result.durationMs = now
  return result
}

/** provide(): the servers that end up holding the record (the walk's k closest, and the provider). */
export function provide(net: ModelNetwork, provider: number, target: KadKey, rng: () => number): Set<number> {
  const walk = lookup(net, { target, self: provider, rng })
  return new Set([...walk.closest, provider])
}

/**
 * A gamer's node (a DHT client) starting: it knows its bootstrap servers, runs kad-dht's initial
 * self-query (getClosestPeers of its own id), adds every server that answered to its table, then
 * looks the key up. What RegionDiscovery costs a node that has just started.
 */
export interface ClientDiscovery {
  selfQuery: LookupResult
  region: LookupResult
  /** Servers the node holds a connection to afterwards (libp2p keeps them open). */
  connections: number
  /** Self-query to its end, then the key's first provider. */
  timeToFirstMs: number | null
}

export function clientDiscovery(
  net: ModelNetwork,
  init: {
    bootstrap: number[]
    self: KadKey
    target: KadKey
    holders: ReadonlySet<number>
    providersPerHolder?: number
    rng: () => number
    latency?: LatencyModel
  },
): ClientDiscovery {
  const connected = new Set(init.bootstrap)
  const latency = init.latency ?? internetLatency
  const selfQuery = lookup(net, {
    target: init.self,
    known: init.bootstrap,
    connected,
    latency,
    rng: init.rng,
  })
  const table = clientTable(net, [...init.bootstrap, ...selfQuery.contacted])
  const region = lookup(net, {
    target: init.target,
    known: table,
    holders: init.holders,
    ...(init.providersPerHolder != null ? { providersPerHolder: init.providersPerHolder } : {}),
    connected,
    latency,
    rng: init.rng,
  })
  return {
    selfQuery,
    region,
    connections: connected.size,
    timeToFirstMs: region.timeToFirstMs == null ? null : selfQuery.durationMs + region.timeToFirstMs,
  }
}

/** The peers a table keeps when they arrive in this order (trie: at most k per prefix group). */
function clientTable(net: ModelNetwork, arrivals: number[]): number[] {
  const { kBucketSize: k, prefixLength } = net.params
  const perGroup = new Map<number, number>()
  const out: number[] = []
  for (const p of new Set(arrivals)) {
    const g = net.params.table === 'trie' ? net.hi[p]! >>> (32 - prefixLength) : 0
    const n = perGroup.get(g) ?? 0
    if (net.params.table === 'trie' && n >= k) continue
    perGroup.set(g, n + 1)
    out.push(p)
  }
  return out
}

/** Summary statistics of a sample. */
export interface Stats {
  mean: number
  p50: number
  p99: number
  max: number
}

export function stats(values: number[]): Stats {
  if (values.length === 0) return { mean: Number.NaN, p50: Number.NaN, p99: Number.NaN, max: Number.NaN }
  const s = [...values].sort((a, b) => a - b)
  const at = (p: number): number => s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!
  return {
    mean: s.reduce((a, b) => a + b, 0) / s.length,
    p50: at(50),
    p99: at(99),
    max: s[s.length - 1]!,
  }
}
