/**
 * The federation's view of the regions: which certified heads exist (discovery through the DHT, each
 * certificate checked against the pinned authority) and what each region serves now (the head's
 * GET /v1/models over /garage/infer/1.0.0, with its `garage` load extension).
 *
 * One entry per region. When two valid heads claim the same region, the one whose certificate expires
 * later wins (the authority's most recent word: a head moved to a new machine gets a fresh certificate
 * while the old one is still valid), then the lower RTT, then the lower PeerId. Expiry is stable from
 * round to round, so the choice does not flap with RTT noise.
 *
 * Lifecycle of an entry: `region:added` when discovery first finds the region (not yet reachable, no
 * models), `region:updated` after every status answer, `region:unreachable` when a status request
 * fails (the entry stays, with its last models, and is not routed to), `region:removed` when a
 * discovery round no longer finds a valid head for it. A region whose head changes is removed and
 * added again. Entries are replaced, never changed in place, so an event's detail stays as sent.
 */
import type { PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { TypedEventEmitter } from 'main-event'
import { GarageError } from '../core/errors.ts'
import { isPlainObject } from '../core/guards.ts'
import { type Logger, silentLogger } from '../core/logger.ts'
import { type DiscoveredHead, parseAuthority, RegionDiscovery } from '../mesh/discovery.ts'
import { sendInferRequest } from '../mesh/infer-protocol.ts'
import type { MeshNode } from '../mesh/node.ts'
import type { RegionModelLoad, RoutableRegion } from '../routing/region-router.ts'
import type { CreditHold } from './ledger.ts'

export const defaultRefreshIntervalMs = 3_000
export const defaultDiscoveryIntervalMs = 30_000
/** How often an unreachable region's head is asked again (besides the status rounds). */
export const unreachableRetryMs = 1_000
export const defaultStatusTimeoutMs = 2_000
/** A head's model list is small (a policy has at most 256 models); anything bigger is hostile. */
export const statusBodyMaxBytes = 1024 * 1024
/** Items of one model list looked at; the rest are ignored. */
export const statusMaxModels = 1024
/** Heads checked per discovery round: a federation sees every region, not just the nearest few. */
export const defaultMaxHeadsPerRound = 128

const modelNamePattern = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/
/** Bounds on what a head may report, so a hostile number cannot poison the router's arithmetic. */
const maxCount = 1_000_000_000
const maxCapacityTokensPerSecond = 1e12

/** The head answered its status request with something that is not an OpenAI model list. */
export class RegionStatusError extends GarageError {}
/** The head did not answer its status request within statusTimeoutMs. */
export class RegionStatusTimeoutError extends GarageError {}

/** What one region reports for one model it serves. */
export interface RegionStatus extends RoutableRegion {
  /** Nodes the head quarantined (docs/integrity.md), their unverified credits to hold. */
  held: CreditHold[]
  /** Certificate expiry of the head, ms since the epoch. */
  expiresAt: number | null
  /** Last successful status answer, ms since the epoch (directory clock); null before the first. */
  updatedAt: number | null
  /** Why the last status request failed; null after a success. */
  error: { name: string; message: string } | null
}

export interface RegionDirectoryEvents {
  'region:added': CustomEvent<RegionStatus>
  'region:updated': CustomEvent<RegionStatus>
  'region:unreachable': CustomEvent<RegionStatus>
  'region:removed': CustomEvent<RegionStatus>
}

export interface RegionDirectoryInit {
  /** Pinned federation authority (PeerId form): only heads it certified are used. */
  authority: string
  refreshIntervalMs?: number
  discoveryIntervalMs?: number
  /**
   * How long a region whose head neither answers nor is found stays listed (unreachable, not routed
   * to, asked every second) before it is dropped. Default: two discovery intervals.
   */
  regionGoneAfterMs?: number
  statusTimeoutMs?: number
  /** Discovery tuning, passed to RegionDiscovery. */
  discoveryTimeoutMs?: number
  headCheckTimeoutMs?: number
  maxHeadsPerRound?: number
  /** Milliseconds since the epoch; also the clock certificates are checked against. */
  now?: () => number
  logger?: Logger
}

export interface ModelPlacement {
  model: string
  /** Reachable regions serving it, sorted. */
  regions: string[]
  /** Nodes serving it, summed over those regions. */
  nodes: number
}

export interface RefreshOptions {
  signal?: AbortSignal
  /** Run a discovery round first (default true); false only asks the known heads. */
  discover?: boolean
}

/**
 * Runs `task` at most once at a time; callers arriving while it runs share ONE next run, started
 * after the current one, so each caller sees a round that began after its call.
 */
class Serialized {
  private readonly task: () => Promise<void>
  private running: Promise<void> | null = null
  private next: Promise<void> | null = null
  /** Bumped by dropQueued(): a queued run of an older generation resolves without running. */
  private generation = 0

  constructor(task: () => Promise<void>) {
    this.task = task
  }

  get busy(): boolean {
    return this.running != null
  }

  run(): Promise<void> {
    if (this.running == null) return this.start()
    const generation = this.generation
    const after = (): Promise<void> => (generation === this.generation ? this.start() : Promise.resolve())
    this.next ??= this.running.then(after, after)
    return this.next
  }

  /** The queued run (if any) will not start; its callers resolve. */
  dropQueued(): void {
    this.generation++
    this.next = null
  }

  /** Resolves once nothing runs (errors are the callers' to see). */
  async settled(): Promise<void> {
    while (this.running != null) await this.running.catch(() => {})
  }

  private start(): Promise<void> {
    this.next = null
    const p = this.task().finally(() => {
      if (this.running === p) this.running = null
    })
    this.running = p
    return p
  }
}

/**
 * Parses a head's GET /v1/models answer strictly: an OpenAI list whose items carry the `garage`
 * extension for `region`. Items that do not parse, name another region or repeat a model are
 * ignored; a body that is not such a list throws RegionStatusError.
 */
export function parseRegionModels(body: unknown, region: string): Map<string, RegionModelLoad> {
  if (!isPlainObject(body) || body.object !== 'list' || !Array.isArray(body.data)) {
    throw new RegionStatusError(
      'the head answered GET /v1/models without an OpenAI list ({ object: "list", data: [...] })',
      'REGION_STATUS',
    )
  }
  const models = new Map<string, RegionModelLoad>()
  for (const item of body.data.slice(0, statusMaxModels)) {
    if (!isPlainObject(item) || item.object !== 'model') continue
    const id = item.id
    if (typeof id !== 'string' || !modelNamePattern.test(id) || models.has(id)) continue
    const g = item.garage
    if (!isPlainObject(g) || g.region !== region) continue
    const { nodes, capacityTokensPerSecond, inflight, slots } = g
    if (!isCount(nodes) || !isCount(inflight) || !isCount(slots)) continue
    if (
      typeof capacityTokensPerSecond !== 'number' ||
      !(capacityTokensPerSecond >= 0 && capacityTokensPerSecond <= maxCapacityTokensPerSecond)
    )
      continue
    models.set(id, { nodes, capacityTokensPerSecond, inflight, slots })
  }
  return models
}

/** The most holds one status answer may carry (a region quarantining more is under attack). */
const statusMaxHolds = 1024

/**
 * The quarantined nodes a head lists beside its models (`garage.held`, docs/integrity.md), for the
 * ledger. Entries that do not parse are ignored; none when the head sends none (an older head).
 */
export function parseRegionHolds(body: unknown, region: string): CreditHold[] {
  if (!isPlainObject(body) || !isPlainObject(body.garage) || body.garage.region !== region) return []
  const held = body.garage.held
  if (!Array.isArray(held)) return []
  const out: CreditHold[] = []
  for (const h of held.slice(0, statusMaxHolds)) {
    if (!isPlainObject(h)) continue
    const { node, since, reason, tokens } = h
    if (typeof node !== 'string' || node.length === 0 || node.length > 128) continue
    if (typeof reason !== 'string' || reason.length > 1024) continue
    const whole = (x: unknown): x is number => Number.isSafeInteger(x) && (x as number) >= 0
    if (!whole(since) || !whole(tokens)) continue
    out.push({ node, region, since, reason, tokens })
  }
  return out
}

function isCount(value: unknown): value is number {
  return typeof value === 'number' && Number.isInteger(value) && value >= 0 && value <= maxCount
}

/** Of the valid heads, one per region: later certificate expiry, then lower RTT, then lower PeerId. */
export function headPerRegion(heads: DiscoveredHead[]): Map<string, DiscoveredHead> {
  const chosen = new Map<string, DiscoveredHead>()
  for (const h of heads) {
    if (!h.valid || h.region == null) continue
    const current = chosen.get(h.region)
    if (current == null || compareHeads(h, current) < 0) chosen.set(h.region, h)
  }
  return chosen
}

function compareHeads(a: DiscoveredHead, b: DiscoveredHead): number {
  const expiry = (b.expiresAt?.getTime() ?? 0) - (a.expiresAt?.getTime() ?? 0)
  if (expiry !== 0) return expiry
  const rtt = (a.rttMs ?? Number.POSITIVE_INFINITY) - (b.rttMs ?? Number.POSITIVE_INFINITY)
  if (rtt !== 0 && !Number.isNaN(rtt)) return rtt
  return a.peerId < b.peerId ? -1 : a.peerId > b.peerId ? 1 : 0
}

export class RegionDirectory extends TypedEventEmitter<RegionDirectoryEvents> {
  readonly #node: MeshNode
  readonly #discovery: RegionDiscovery
  readonly #refreshIntervalMs: number
  #warm = false
  readonly #discoveryIntervalMs: number
  readonly #statusTimeoutMs: number
  readonly #now: () => number
  readonly #log: Logger
  readonly #entries = new Map<string, RegionStatus>()
  readonly #discoverRound: Serialized
  readonly #statusRound: Serialized
  readonly #unreachableRound: Serialized
  readonly #regionGoneAfterMs: number
  /** When discovery first missed each unreachable region. */
  readonly #unfoundSince = new Map<string, number>()
  #controller: AbortController | null = null
  #timers: Array<ReturnType<typeof setInterval>> = []

  constructor(node: MeshNode, init: RegionDirectoryInit) {
    super()
    parseAuthority(init.authority)
    this.#node = node
    this.#refreshIntervalMs = init.refreshIntervalMs ?? defaultRefreshIntervalMs
    this.#discoveryIntervalMs = init.discoveryIntervalMs ?? defaultDiscoveryIntervalMs
    this.#regionGoneAfterMs = init.regionGoneAfterMs ?? 2 * this.#discoveryIntervalMs
    this.#statusTimeoutMs = init.statusTimeoutMs ?? defaultStatusTimeoutMs
    this.#now = init.now ?? Date.now
    this.#log = (init.logger ?? silentLogger).child({ component: 'federation:regions' })
    const now = this.#now
    this.#discovery = new RegionDiscovery(node, {
      authority: init.authority,
      maxHeadsPerRound: init.maxHeadsPerRound ?? defaultMaxHeadsPerRound,
      now: () => new Date(now()),
      ...(init.discoveryTimeoutMs != null ? { discoveryTimeoutMs: init.discoveryTimeoutMs } : {}),
      ...(init.headCheckTimeoutMs != null ? { headCheckTimeoutMs: init.headCheckTimeoutMs } : {}),
    })
    this.#discoverRound = new Serialized(() => this.#discover())
    this.#statusRound = new Serialized(() => this.#askAll())
    this.#unreachableRound = new Serialized(() => this.#askAll((e) => !e.reachable))
  }

  /** Runs a first round at once, then discovery and status on their intervals. Idempotent. */
  start(): void {
    if (this.#controller != null) return
    this.#controller = new AbortController()
    // A tick while the last round still runs (a slow head, a long lookup) is skipped: rounds never pile up.
    const fullRound = (): void => {
      if (this.#discoverRound.busy) return
      this.refresh().catch((err: unknown) => this.#logRoundError(err))
    }
    const statusRound = (): void => {
      if (this.#statusRound.busy) return
      this.#statusRound.run().catch((err: unknown) => this.#logRoundError(err))
    }
    // An unreachable region is asked every second besides: a head back from a restart is serving
    // again within a second of answering, not at the next status round.
    const unreachableRound = (): void => {
      if (this.#statusRound.busy || this.#unreachableRound.busy) return
      if (![...this.#entries.values()].some((e) => !e.reachable)) return
      this.#unreachableRound.run().catch((err: unknown) => this.#logRoundError(err))
    }
    this.#timers = [
      setInterval(fullRound, this.#discoveryIntervalMs),
      setInterval(statusRound, this.#refreshIntervalMs),
      setInterval(unreachableRound, Math.min(unreachableRetryMs, this.#refreshIntervalMs)),
    ]
    for (const t of this.#timers) t.unref?.()
    fullRound()
  }

  /** Stops the timers and aborts the rounds in flight; resolves once they have settled. */
  async stop(): Promise<void> {
    for (const t of this.#timers) clearInterval(t)
    this.#timers = []
    this.#controller?.abort()
    this.#controller = null
    this.#discoverRound.dropQueued()
    this.#statusRound.dropQueued()
    this.#unreachableRound.dropQueued()
    await Promise.all([
      this.#discoverRound.settled(),
      this.#statusRound.settled(),
      this.#unreachableRound.settled(),
    ])
  }

  /**
   * One round now: a discovery round (unless `discover: false`), then a status request to every
   * known head. Resolves when the round's events have been sent. Rounds are shared between callers,
   * so `signal` only stops this caller's wait; stop() aborts the round itself.
   */
  async refresh(options: RefreshOptions = {}): Promise<void> {
    const { signal } = options
    const lifetime = this.#controller?.signal
    if (options.discover !== false) await untilAborted(this.#discoverRound.run(), signal)
    // stop() came meanwhile: no status round may start after it.
    if (lifetime?.aborted === true) return
    await untilAborted(this.#statusRound.run(), signal)
    if (options.discover !== false) this.#warm = true
  }

  /** True once a first round (discovery and status) has finished: before it, no model is known yet. */
  get warm(): boolean {
    return this.#warm
  }

  /** Every region, sorted by name. */
  regions(): RegionStatus[] {
    return [...this.#entries.values()].sort((a, b) => compareStrings(a.region, b.region))
  }

  /** Every head the last discovery round saw, valid or not, with why: for /health. */
  heads(): DiscoveredHead[] {
    return [...this.#discovery.heads]
  }

  region(name: string): RegionStatus | null {
    return this.#entries.get(name) ?? null
  }

  /** Every model a reachable region serves (nodes > 0), with where: the gateway's GET /v1/models. */
  modelsUnion(): ModelPlacement[] {
    const union = new Map<string, ModelPlacement>()
    for (const entry of this.regions()) {
      if (!entry.reachable) continue
      for (const [model, load] of entry.models) {
        if (load.nodes <= 0) continue
        let placement = union.get(model)
        if (placement == null) {
          placement = { model, regions: [], nodes: 0 }
          union.set(model, placement)
        }
        placement.regions.push(entry.region)
        placement.nodes += load.nodes
      }
    }
    return [...union.values()].sort((a, b) => compareStrings(a.model, b.model))
  }

  async #discover(): Promise<void> {
    const signal = this.#controller?.signal
    let heads: DiscoveredHead[]
    try {
      heads = await this.#discovery.discover(signal != null ? { signal } : {})
    } catch (err) {
      if (signal?.aborted) return
      throw err
    }
    // A round cut short by stop() found nothing it can be trusted on.
    if (signal?.aborted) return
    const found = headPerRegion(heads)
    const now = this.#now()
    for (const [region, entry] of this.#entries) {
      const head = found.get(region)
      // A lookup that missed a region whose head answers its status (a record not yet announced
      // again after a restart, a slow DHT) is no reason to drop it; nor is a short outage: a region
      // dropped then stayed out until the next round found it, 30 s, although its head was back in
      // seconds. Unreachable and unfound, it goes after regionGoneAfterMs; replaced or expired, now.
      if (head != null) this.#unfoundSince.delete(region)
      else if (entry.expiresAt == null || entry.expiresAt > now) {
        if (entry.reachable) {
          this.#unfoundSince.delete(region)
          continue
        }
        const since = this.#unfoundSince.get(region) ?? now
        this.#unfoundSince.set(region, since)
        if (now - since < this.#regionGoneAfterMs) continue
      }
      if (head == null || head.peerId !== entry.head) {
        this.#unfoundSince.delete(region)
        this.#entries.delete(region)
        this.#log.info(
          { region, head: entry.head, replacedBy: head?.peerId ?? null },
          head == null ? 'region no longer found' : 'region has a new head',
        )
        this.#emit('region:removed', entry)
      } else if (head.rttMs !== entry.rttMs) {
        // RTT rides along with the next status event; a change alone is not worth one.
        this.#entries.set(region, { ...entry, rttMs: head.rttMs })
      }
    }
    for (const [region, head] of found) {
      if (this.#entries.has(region)) continue
      const entry: RegionStatus = {
        region,
        head: head.peerId,
        rttMs: head.rttMs,
        expiresAt: head.expiresAt?.getTime() ?? null,
        models: new Map(),
        held: [],
        updatedAt: null,
        reachable: false,
        error: null,
      }
      this.#entries.set(region, entry)
      this.#log.info({ region, head: head.peerId, rttMs: head.rttMs }, 'region found')
      this.#emit('region:added', entry)
    }
  }

  async #askAll(which: (entry: RegionStatus) => boolean = () => true): Promise<void> {
    const signal = this.#controller?.signal
    await Promise.all([...this.#entries.values()].filter(which).map((entry) => this.#ask(entry, signal)))
  }

  async #ask(entry: RegionStatus, outer: AbortSignal | undefined): Promise<void> {
    let models: Map<string, RegionModelLoad>
    let held: CreditHold[]
    try {
      ;({ models, held } = await this.#fetchModels(entry, outer))
    } catch (err) {
      if (outer?.aborted) return
      const current = this.#entries.get(entry.region)
      // The region was removed or got a new head meanwhile: this answer is about neither.
      if (current == null || current.head !== entry.head) return
      const e = err as Error
      const next: RegionStatus = {
        ...current,
        reachable: false,
        error: { name: e.name, message: e.message },
      }
      this.#entries.set(entry.region, next)
      // Reported once per outage; each failed request of it is only logged at debug.
      if (current.reachable || current.error == null) {
        this.#log.warn({ region: entry.region, head: entry.head, err: e.message }, 'region unreachable')
        this.#emit('region:unreachable', next)
      } else {
        this.#log.debug({ region: entry.region, err: e.message }, 'region still unreachable')
      }
      return
    }
    const current = this.#entries.get(entry.region)
    if (current == null || current.head !== entry.head) return
    if (!current.reachable) this.#log.info({ region: entry.region }, 'region reachable')
    const next: RegionStatus = {
      ...current,
      models,
      held,
      updatedAt: this.#now(),
      reachable: true,
      error: null,
    }
    this.#entries.set(entry.region, next)
    this.#emit('region:updated', next)
  }

  async #fetchModels(
    entry: RegionStatus,
    outer: AbortSignal | undefined,
  ): Promise<{ models: Map<string, RegionModelLoad>; held: CreditHold[] }> {
    const timeout = AbortSignal.timeout(this.#statusTimeoutMs)
    const signal = outer != null ? AbortSignal.any([timeout, outer]) : timeout
    try {
      const response = await sendInferRequest(
        this.#node,
        peerIdFromString(entry.head) as PeerId,
        { method: 'GET', path: '/v1/models', headers: [] },
        {
          signal,
          connectTimeoutMs: this.#statusTimeoutMs,
          firstByteTimeoutMs: this.#statusTimeoutMs,
          idleTimeoutMs: this.#statusTimeoutMs,
        },
      )
      const chunks: Uint8Array[] = []
      let bytes = 0
      for await (const chunk of response.body) {
        bytes += chunk.byteLength
        // Leaving the loop resets the stream: the head sends no more.
        if (bytes > statusBodyMaxBytes) {
          throw new RegionStatusError(
            `the head's model list is over ${statusBodyMaxBytes} bytes`,
            'REGION_STATUS',
          )
        }
        chunks.push(chunk)
      }
      if (response.status !== 200) {
        throw new RegionStatusError(
          `the head answered GET /v1/models with ${response.status}`,
          'REGION_STATUS',
        )
      }
      let body: unknown
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8'))
      } catch {
        throw new RegionStatusError(
          'the head answered GET /v1/models with a body that is not JSON',
          'REGION_STATUS',
        )
      }
      return { models: parseRegionModels(body, entry.region), held: parseRegionHolds(body, entry.region) }
    } catch (err) {
      if (timeout.aborted && outer?.aborted !== true) {
        throw new RegionStatusTimeoutError(
          `the head did not answer GET /v1/models within ${this.#statusTimeoutMs} ms`,
          'REGION_STATUS_TIMEOUT',
          { cause: err },
        )
      }
      throw err
    }
  }

  #emit(type: keyof RegionDirectoryEvents, detail: RegionStatus): void {
    this.safeDispatchEvent(type, { detail })
  }

  #logRoundError(err: unknown): void {
    this.#log.warn({ err: (err as Error).message }, 'region round failed; the next one will retry')
  }
}

/** Resolves or rejects with `task`, or rejects with the signal's reason once it aborts first. */
function untilAborted(task: Promise<void>, signal: AbortSignal | undefined): Promise<void> {
  if (signal == null) return task
  signal.throwIfAborted()
  return new Promise((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
    task.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort))
  })
}

function compareStrings(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0
}
