import type { PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { TypedEventEmitter } from 'main-event'
import { GarageError } from '../core/errors.ts'
import {
  type RegionCertificate,
  RegionCertificateError,
  type VerifyCertificateOptions,
  verifyRegionCertificate,
} from './certificate.ts'
import { allRegionsKey, regionKey } from './dht-keys.ts'
import type { MeshNode } from './node.ts'
import { fetchRegionInfo, type RegionStatusSummary } from './region-protocol.ts'

/** One head found in the DHT, valid or not, with why. */
export interface DiscoveredHead {
  peerId: string
  /** From the certificate when it could be read. */
  region: string | null
  addrs: string[]
  /** Median of three pings, ms; null when unreachable or not measured. */
  rttMs: number | null
  expiresAt: Date | null
  valid: boolean
  /** Named error when invalid: RegionCertificateExpiredError, HeadUnreachableError, ... */
  reason: { name: string; message: string } | null
  certificate: RegionCertificate | null
  /** What the head says of its region (nodes, quarantined ones); null when it says nothing. */
  status: RegionStatusSummary | null
}

export interface RegionDiscoveryEvents {
  'head:verified': CustomEvent<DiscoveredHead>
  'head:rejected': CustomEvent<DiscoveredHead>
  'region:chosen': CustomEvent<DiscoveredHead>
  'region:lost': CustomEvent<DiscoveredHead>
}

export interface RegionDiscoveryInit {
  /** Pinned federation authority public key (PeerId form). */
  authority: string
  /** Pinned region: only its heads are considered. */
  region?: string
  /** A whole DHT lookup round, including certificate fetches and pings. */
  discoveryTimeoutMs?: number
  /** One head's certificate fetch and pings; a tarpit costs no more than this. */
  headCheckTimeoutMs?: number
  /** Heads checked per round; the DHT can be flooded with announcements, the dials here cannot. */
  maxHeadsPerRound?: number
  rttSamples?: number
  /** First and last wait between rediscovery attempts after the chosen head goes away. */
  rediscoverMinDelayMs?: number
  rediscoverMaxDelayMs?: number
  now?: () => Date
}

export class NoRegionFoundError extends GarageError {}
export class HeadUnreachableError extends GarageError {}
export class InvalidAuthorityError extends GarageError {}

/** The pinned authority must be an Ed25519 PeerId, which carries its public key. */
export function parseAuthority(authority: string): PeerId {
  let id: PeerId
  try {
    id = peerIdFromString(authority)
  } catch {
    throw new InvalidAuthorityError(
      `authority ${JSON.stringify(authority)} is not a PeerId (it looks like 12D3KooW...)`,
      'BAD_AUTHORITY',
    )
  }
  if (id.type !== 'Ed25519') {
    throw new InvalidAuthorityError(`authority ${authority} is not an Ed25519 key id`, 'BAD_AUTHORITY')
  }
  return id
}

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)] ?? Number.NaN
}

/**
 * Finds regional heads through the DHT, verifies their certificates against the pinned authority,
 * measures RTT and chooses the pinned region or the lowest RTT; re-discovers when the head goes away.
 */
export class RegionDiscovery extends TypedEventEmitter<RegionDiscoveryEvents> {
  private readonly node: MeshNode
  private readonly init: Required<Omit<RegionDiscoveryInit, 'region'>> & { region?: string }
  private chosenHead: DiscoveredHead | null = null
  private lastRound: DiscoveredHead[] = []
  private controller: AbortController | null = null
  private rediscovering = false
  private readonly onDisconnect = (evt: CustomEvent<PeerId>): void => {
    if (this.chosenHead == null || evt.detail.toString() !== this.chosenHead.peerId) return
    const lost = this.chosenHead
    this.chosenHead = null
    void this.tagHead(lost.peerId, false)
    this.lostHeadId = lost.peerId
    this.safeDispatch('region:lost', lost)
    void this.rediscover()
  }

  /** The head lost last; a connection to it again (back from a restart) ends the rediscovery's wait. */
  private lostHeadId: string | null = null
  private wake: AbortController | null = null
  private readonly onConnect = (evt: CustomEvent<PeerId>): void => {
    if (this.lostHeadId != null && evt.detail.toString() === this.lostHeadId) this.wake?.abort()
  }

  constructor(node: MeshNode, init: RegionDiscoveryInit) {
    super()
    parseAuthority(init.authority)
    this.node = node
    this.init = {
      discoveryTimeoutMs: 10_000,
      headCheckTimeoutMs: 5_000,
      maxHeadsPerRound: 32,
      rttSamples: 3,
      rediscoverMinDelayMs: 500,
      rediscoverMaxDelayMs: 30_000,
      now: () => new Date(),
      ...init,
    }
  }

  get chosen(): DiscoveredHead | null {
    return this.chosenHead
  }

  /** Every head seen in the last lookup round, valid or not. */
  get heads(): DiscoveredHead[] {
    return this.lastRound
  }

  start(): void {
    if (this.controller != null) return
    this.controller = new AbortController()
    this.node.addEventListener('peer:disconnect', this.onDisconnect)
    this.node.addEventListener('peer:connect', this.onConnect)
  }

  stop(): void {
    this.controller?.abort()
    this.controller = null
    this.node.removeEventListener('peer:disconnect', this.onDisconnect)
    this.node.removeEventListener('peer:connect', this.onConnect)
  }

  /**
   * One lookup round: every head announced in the DHT (up to maxHeadsPerRound), each verified and
   * measured. A lookup that finds no head at all is repeated with backoff until the timeout:
   * provider records reach the DHT servers a moment after a head starts, and a node that joins at
   * that moment must not give up.
   */
  async discover(options: { signal?: AbortSignal } = {}): Promise<DiscoveredHead[]> {
    return this.round(options.signal, false)
  }

  /**
   * Discover, then choose: the pinned region's head, or else the valid head with the lowest RTT.
   * It does not wait for every head: once the first valid head is in, heads that take more than
   * twice as long to verify (so are at least twice as far) are not waited for.
   */
  async choose(options: { signal?: AbortSignal } = {}): Promise<DiscoveredHead> {
    const heads = await this.round(options.signal, true)
    const best = pickHead(heads, this.init.region)
    if (best == null) {
      const why =
        heads.length === 0
          ? 'no head is announced in the DHT'
          : heads.map((h) => `${h.peerId}: ${h.reason?.name}`).join('; ')
      throw new NoRegionFoundError(
        `no valid regional head${this.init.region != null ? ` for region ${this.init.region}` : ''}: ${why}`,
        'NO_REGION',
      )
    }
    const previous = this.chosenHead
    this.chosenHead = best
    // Keep the head's connection through pruning and have libp2p redial it if it drops; release the old one.
    if (previous != null && previous.peerId !== best.peerId) await this.tagHead(previous.peerId, false)
    await this.tagHead(best.peerId, true)
    this.safeDispatch('region:chosen', best)
    return best
  }

  private async tagHead(peerId: string, keep: boolean): Promise<void> {
    await this.node.peerStore
      .merge(peerIdFromString(peerId), {
        tags: { 'keep-alive-garage-head': keep ? { value: 100 } : undefined },
      })
      .catch(() => {})
  }

  private async round(outer: AbortSignal | undefined, settleEarly: boolean): Promise<DiscoveredHead[]> {
    const signal = AbortSignal.any([
      AbortSignal.timeout(this.init.discoveryTimeoutMs),
      ...(outer != null ? [outer] : []),
      ...(this.controller != null ? [this.controller.signal] : []),
    ])
    const key = this.init.region != null ? await regionKey(this.init.region) : await allRegionsKey()
    let retryDelayMs = 50
    let heads: DiscoveredHead[] = []
    while (true) {
      heads = await this.lookup(key, signal, settleEarly)
      if (heads.length > 0 || signal.aborted) break
      await waitMs(retryDelayMs, signal)
      retryDelayMs = Math.min(retryDelayMs * 2, 2_000)
    }
    this.lastRound = heads
    for (const h of heads) this.safeDispatch(h.valid ? 'head:verified' : 'head:rejected', h)
    return heads
  }

  private async lookup(
    key: Awaited<ReturnType<typeof allRegionsKey>>,
    signal: AbortSignal,
    settleEarly: boolean,
  ): Promise<DiscoveredHead[]> {
    const started = performance.now()
    const seen = new Set<string>()
    const done: DiscoveredHead[] = []
    const checks: Array<Promise<void>> = []
    // Aborted once the first valid head is in and the grace has passed (choose() only).
    const settle = new AbortController()
    let graceTimer: NodeJS.Timeout | undefined
    const checkSignal = AbortSignal.any([signal, settle.signal])
    const lookupDone = (async () => {
      try {
        for await (const provider of this.node.contentRouting.findProviders(key, { signal: checkSignal })) {
          const id = provider.id.toString()
          if (seen.has(id) || provider.id.equals(this.node.peerId)) continue
          if (seen.size >= this.init.maxHeadsPerRound) break
          seen.add(id)
          if (provider.multiaddrs.length > 0) {
            await this.node.peerStore.merge(provider.id, { multiaddrs: provider.multiaddrs }).catch(() => {})
          }
          checks.push(
            this.check(provider.id, checkSignal).then((head) => {
              // A head cut off because we settled was not waited for, not found wanting.
              if (settle.signal.aborted && !head.valid && head.reason?.name === HeadUnreachableError.name)
                return
              done.push(head)
              if (settleEarly && head.valid && graceTimer == null) {
                // Heads that verify in more than twice the first one's time are farther away anyway.
                const graceMs = Math.min(performance.now() - started, 2_000)
                graceTimer = setTimeout(() => settle.abort(), graceMs)
              }
            }),
          )
        }
      } catch (err) {
        // A lookup cut short (timeout, settled) still yields what it found.
        if (!checkSignal.aborted) throw err
      }
    })()
    try {
      await lookupDone
      await Promise.all(checks)
    } finally {
      clearTimeout(graceTimer)
    }
    return done
  }

  private async rediscover(): Promise<void> {
    if (this.rediscovering) return
    this.rediscovering = true
    let delay = this.init.rediscoverMinDelayMs
    try {
      const signal = this.controller?.signal
      while (signal != null && !signal.aborted && this.chosenHead == null) {
        try {
          await this.choose({ signal })
          return
        } catch {
          // Jittered: a head restart must not send a whole region back to the DHT in lockstep. A
          // connection to the lost head again (back from a restart) ends the wait at once.
          this.wake = new AbortController()
          await waitMs(delay * (0.5 + Math.random() / 2), AbortSignal.any([signal, this.wake.signal]))
          this.wake = null
          delay = Math.min(delay * 2, this.init.rediscoverMaxDelayMs)
        }
      }
    } finally {
      this.rediscovering = false
    }
  }

  /** Verifies one head; never rejects: every failure becomes the head's named reason. */
  private async check(peer: PeerId, outer: AbortSignal): Promise<DiscoveredHead> {
    const signal = AbortSignal.any([outer, AbortSignal.timeout(this.init.headCheckTimeoutMs)])
    const head: DiscoveredHead = {
      peerId: peer.toString(),
      region: null,
      addrs: [],
      rttMs: null,
      expiresAt: null,
      valid: false,
      reason: null,
      certificate: null,
      status: null,
    }
    let bytes: Uint8Array
    try {
      const info = await fetchRegionInfo(this.node, peer, { signal })
      bytes = info.cert
      head.status = info.status
    } catch (err) {
      const e = new HeadUnreachableError(
        `cannot fetch certificate from ${head.peerId}: ${(err as Error).message}`,
      )
      head.reason = { name: e.name, message: e.message }
      return head
    }
    const verify: VerifyCertificateOptions = {
      authority: this.init.authority,
      head: peer,
      now: this.init.now(),
    }
    if (this.init.region != null) verify.region = this.init.region
    try {
      const cert = await verifyRegionCertificate(bytes, verify)
      head.certificate = cert
      head.region = cert.region
      head.addrs = cert.addrs
      head.expiresAt = cert.expiresAt
    } catch (err) {
      const e =
        err instanceof RegionCertificateError ? err : new RegionCertificateError((err as Error).message)
      head.reason = { name: e.name, message: e.message }
      return head
    }
    try {
      const samples: number[] = []
      for (let i = 0; i < this.init.rttSamples; i++) {
        samples.push(await this.node.services.ping.ping(peer, { signal }))
      }
      head.rttMs = median(samples)
    } catch (err) {
      const e = new HeadUnreachableError(`ping to ${head.peerId} failed: ${(err as Error).message}`)
      head.reason = { name: e.name, message: e.message }
      return head
    }
    head.valid = true
    return head
  }

  private safeDispatch(type: keyof RegionDiscoveryEvents, detail: DiscoveredHead): void {
    this.safeDispatchEvent(type, { detail })
  }
}

/** The valid head with the lowest RTT, of the pinned region when one is pinned. */
export function pickHead(heads: DiscoveredHead[], pinnedRegion?: string): DiscoveredHead | null {
  const candidates = heads.filter((h) => h.valid && (pinnedRegion == null || h.region === pinnedRegion))
  candidates.sort((a, b) => (a.rttMs ?? Number.POSITIVE_INFINITY) - (b.rttMs ?? Number.POSITIVE_INFINITY))
  return candidates[0] ?? null
}

/** Resolves after `ms` or on abort, whichever is first, leaving no listener or timer behind. */
function waitMs(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted === true) {
      resolve()
      return
    }
    const onAbort = (): void => {
      clearTimeout(timer)
      resolve()
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    timer.unref()
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}
