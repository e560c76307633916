import type { PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { TypedEventEmitter } from 'main-event'
import {
  type RegionCertificate,
  RegionCertificateError,
  type VerifyCertificateOptions,
  verifyRegionCertificate,
} from './certificate.ts'
import { allRegionsKey, regionKey } from './dht-keys.ts'
import { GarageError } from './errors.ts'
import type { MeshNode } from './node.ts'
import { fetchRegionCertificate } from './region-protocol.ts'

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
  rttSamples?: number
  /** First and last wait between rediscovery attempts after the chosen head goes away. */
  rediscoverMinDelayMs?: number
  rediscoverMaxDelayMs?: number
  now?: () => Date
}

export class NoRegionFoundError extends GarageError {}
export class HeadUnreachableError extends GarageError {}

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
    this.safeDispatch('region:lost', lost)
    void this.rediscover()
  }

  constructor(node: MeshNode, init: RegionDiscoveryInit) {
    super()
    this.node = node
    this.init = {
      discoveryTimeoutMs: 10_000,
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
  }

  stop(): void {
    this.controller?.abort()
    this.controller = null
    this.node.removeEventListener('peer:disconnect', this.onDisconnect)
  }

  /**
   * One lookup round: every head announced in the DHT, each verified and measured. A lookup that
   * finds no head at all is repeated with backoff until the timeout: provider records reach the DHT
   * servers a moment after a head starts, and a node that joins at that moment must not give up.
   */
  async discover(options: { signal?: AbortSignal } = {}): Promise<DiscoveredHead[]> {
    const signal = AbortSignal.any([
      AbortSignal.timeout(this.init.discoveryTimeoutMs),
      ...(options.signal != null ? [options.signal] : []),
      ...(this.controller != null ? [this.controller.signal] : []),
    ])
    const key = this.init.region != null ? await regionKey(this.init.region) : await allRegionsKey()
    let retryDelayMs = 50
    let heads: DiscoveredHead[] = []
    while (true) {
      heads = await this.lookup(key, signal)
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
  ): Promise<DiscoveredHead[]> {
    const seen = new Set<string>()
    const checks: Array<Promise<DiscoveredHead>> = []
    try {
      for await (const provider of this.node.contentRouting.findProviders(key, { signal })) {
        const id = provider.id.toString()
        if (seen.has(id)) continue
        seen.add(id)
        if (provider.multiaddrs.length > 0 && !provider.id.equals(this.node.peerId)) {
          await this.node.peerStore.merge(provider.id, { multiaddrs: provider.multiaddrs }).catch(() => {})
        }
        checks.push(this.check(provider.id, signal))
      }
    } catch (err) {
      // A lookup cut short by the timeout still yields what it found; anything else is worth raising.
      if (!signal.aborted) throw err
    }
    return Promise.all(checks)
  }

  /** Discover, then choose: the pinned region, or else the valid head with the lowest RTT. */
  async choose(options: { signal?: AbortSignal } = {}): Promise<DiscoveredHead> {
    const heads = await this.discover(options)
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
    this.chosenHead = best
    // Keep the head's connection through pruning and redial it if it drops.
    await this.node.peerStore
      .merge(peerIdFromString(best.peerId), { tags: { 'keep-alive-garage-head': { value: 100 } } })
      .catch(() => {})
    this.safeDispatch('region:chosen', best)
    return best
  }

  private async rediscover(): Promise<void> {
    if (this.rediscovering) return
    this.rediscovering = true
    let delay = this.init.rediscoverMinDelayMs
    try {
      while (this.controller != null && !this.controller.signal.aborted && this.chosenHead == null) {
        try {
          await this.choose()
          return
        } catch {
          await waitMs(delay, this.controller?.signal)
          delay = Math.min(delay * 2, this.init.rediscoverMaxDelayMs)
        }
      }
    } finally {
      this.rediscovering = false
    }
  }

  private async check(peer: PeerId, signal: AbortSignal): Promise<DiscoveredHead> {
    const head: DiscoveredHead = {
      peerId: peer.toString(),
      region: null,
      addrs: [],
      rttMs: null,
      expiresAt: null,
      valid: false,
      reason: null,
      certificate: null,
    }
    let bytes: Uint8Array
    try {
      bytes = await fetchRegionCertificate(this.node, peer, { signal })
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
      if (!(err instanceof RegionCertificateError)) throw err
      head.reason = { name: err.name, message: err.message }
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

/** The pinned region's head with the lowest RTT, or else the lowest-RTT valid head of any region. */
export function pickHead(heads: DiscoveredHead[], pinnedRegion?: string): DiscoveredHead | null {
  const candidates = heads.filter((h) => h.valid && (pinnedRegion == null || h.region === pinnedRegion))
  candidates.sort((a, b) => (a.rttMs ?? Number.POSITIVE_INFINITY) - (b.rttMs ?? Number.POSITIVE_INFINITY))
  return candidates[0] ?? null
}

function waitMs(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms)
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(t)
        resolve()
      },
      { once: true },
    )
  })
}
