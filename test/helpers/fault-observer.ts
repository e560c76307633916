import type { ClusterTimeline } from './fault-timeline.ts'
import type { ProcessCluster } from './process-cluster.ts'

/**
 * Watches the cluster while faults hit it: each head's /health (nodes it counts as serving) and
 * /metrics (which nodes it has registered, its retries), fed into the timeline; and counters that a
 * kill would reset (head retries, the gateway's failovers), banked before each kill.
 */

/** The sum of every sample of `name` in a Prometheus exposition. */
export function metricSum(text: string, name: string): number {
  let sum = 0
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue
    const rest = line.slice(name.length)
    if (rest[0] !== '{' && rest[0] !== ' ') continue
    const value = Number(line.slice(line.lastIndexOf(' ') + 1))
    if (Number.isFinite(value)) sum += value
  }
  return sum
}

/** Label values of `label` over the samples of `name`. */
export function metricLabels(text: string, name: string, label: string): string[] {
  const out: string[] = []
  const pattern = new RegExp(`${label}="([^"]*)"`)
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue
    const m = pattern.exec(line)
    if (m?.[1] != null) out.push(m[1])
  }
  return out
}

async function getText(url: string, timeoutMs: number): Promise<string | null> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) })
    if (res.status !== 200) return null
    return await res.text()
  } catch {
    return null
  }
}

/** A counter that survives restarts of the process that exposes it. */
class BankedCounter {
  private banked = 0
  private current = 0

  set(value: number): void {
    this.current = value
  }

  /** The process is about to die: keep what it counted. */
  bank(): void {
    this.banked += this.current
    this.current = 0
  }

  get total(): number {
    return this.banked + this.current
  }
}

export class ClusterObserver {
  private readonly cluster: ProcessCluster
  private readonly timeline: ClusterTimeline
  private readonly intervalMs: number
  private readonly down = new Set<string>()
  private federationDown = false
  private readonly headRetries = new Map<string, BankedCounter>()
  private readonly failovers = new BankedCounter()
  private readonly controller = new AbortController()
  private loop: Promise<void> | null = null

  constructor(cluster: ProcessCluster, timeline: ClusterTimeline, intervalMs = 250) {
    this.cluster = cluster
    this.timeline = timeline
    this.intervalMs = intervalMs
    for (const r of cluster.regions.keys()) this.headRetries.set(r, new BankedCounter())
  }

  start(): void {
    this.loop ??= (async () => {
      const signal = this.controller.signal
      while (!signal.aborted) {
        await Promise.all([
          ...[...this.cluster.regions.keys()].map((r) => this.pollHead(r)),
          this.federationDown ? Promise.resolve() : this.pollFederation(),
        ])
        await new Promise((resolve) => setTimeout(resolve, this.intervalMs))
      }
    })()
  }

  async stop(): Promise<void> {
    this.controller.abort()
    await this.loop
  }

  /** Before a head is killed: its last counters, and no more polls until it is back. */
  async headGoingDown(region: string): Promise<void> {
    await this.pollHead(region)
    this.down.add(region)
    this.headRetries.get(region)!.bank()
  }

  headBack(region: string): void {
    this.down.delete(region)
  }

  async federationGoingDown(): Promise<void> {
    await this.pollFederation()
    this.federationDown = true
    this.failovers.bank()
  }

  federationBack(): void {
    this.federationDown = false
  }

  async pollFederation(): Promise<void> {
    const text = await getText(`${this.cluster.federation.url}/metrics`, 2_000)
    if (text != null && !this.federationDown) {
      this.failovers.set(metricSum(text, 'garage_federation_failovers_total'))
    }
  }

  /** Requests moved to another region (gateway) and to another node (heads), over the whole run. */
  counts(): { federationFailovers: number; headRetries: number } {
    let headRetries = 0
    for (const c of this.headRetries.values()) headRetries += c.total
    return { federationFailovers: this.failovers.total, headRetries }
  }

  private async pollHead(region: string): Promise<void> {
    if (this.down.has(region)) return
    const url = this.cluster.region(region).headUrl
    const [health, metrics] = await Promise.all([
      getText(`${url}/health`, 1_000),
      getText(`${url}/metrics`, 1_000),
    ])
    if (this.down.has(region)) return
    const at = performance.now()
    // A poll that failed says nothing (a busy machine answers late): the fault code itself records a dead head.
    if (health == null || metrics == null) return
    const serving = (JSON.parse(health) as { nodes?: { serving?: number } }).nodes?.serving ?? 0
    const registered = metricLabels(metrics, 'garage_head_node_inflight', 'node')
    this.timeline.observe(region, at, { serving, registered })
    this.headRetries.get(region)!.set(metricSum(metrics, 'garage_head_retries_total'))
  }
}
