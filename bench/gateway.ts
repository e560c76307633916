import type { TestPostgres } from '../test/helpers/postgres.ts'
import {
  addedOver,
  type BenchCluster,
  closeClient,
  latencyBatch,
  nginxBudgetRatios,
  startBenchCluster,
  streamOnce,
  type Target,
  tinyModel,
  warmUp,
  warmupMs,
} from './cluster.ts'
import { compareStores, type StoreComparison, startBenchPostgres } from './gateway-store.ts'
import { type Nginx, startNginx, startNginxChain } from './nginx.ts'
import { percentile, progress, table, writeResult } from './report.ts'

/**
 * The public path, each part a `garage` process, against the same one-token requests sent straight
 * to an identical engine, side by side in one run:
 * - the federation with the direct path (client → federation → node → engine: two hops, the head
 *   off the data path), against a chain of two plain nginx proxies;
 * - a second federation with `--no-direct` (client → federation → head → node → engine: three
 *   hops, the fallback path), against a chain of three;
 * - one plain nginx hop, for scale.
 * Cold figures (before any load: V8 has compiled nothing yet, as after a restart) are taken first;
 * then every side is driven for the warm-up (GARAGE_BENCH_WARMUP_MS, 10 s), and the figures the goals
 * read are measured warm. Then streamed tokens/s through the federation against the engine.
 */
const concurrencies = [1, 32]
const top = 32
const rounds = 10
const coldRounds = 2
const perWorker = 6
const streamRounds = 7
/** Streamed answer length: within the 256-token context with its prompt. */
const streamTokens = 200

interface Side {
  name: string
  target: Target
  latencies: Map<number, number[]>
  rps: Map<number, number[]>
}

function side(name: string, target: Target): Side {
  return { name, target, latencies: new Map(), rps: new Map() }
}

/** `rounds` rounds at each concurrency, the sides' order rotated each round. */
async function measure(sides: Side[], levels: number[], n: number, label: string): Promise<void> {
  for (const c of levels) {
    for (let r = 0; r < n; r++) {
      for (let i = 0; i < sides.length; i++) {
        const s = sides[(i + r) % sides.length]!
        const started = performance.now()
        const lat = await latencyBatch(s.target, c, perWorker, r)
        const seconds = (performance.now() - started) / 1000
        s.latencies.set(c, [...(s.latencies.get(c) ?? []), ...lat])
        s.rps.set(c, [...(s.rps.get(c) ?? []), lat.length / seconds])
      }
      progress(`${label} concurrency ${c}: round ${r + 1}/${n}`)
    }
  }
}

function rowOf(c: number, sides: Record<string, Side | undefined>): Record<string, number> {
  const get = (s: Side | undefined) => s?.latencies.get(c)
  const rps = (s: Side | undefined) => Math.round(percentile(s!.rps.get(c)!, 50))
  const direct = get(sides.direct)!
  const row: Record<string, number> = { concurrency: c, requests: direct.length }
  const fed = addedOver(get(sides.federation)!, direct)
  Object.assign(row, {
    direct_p50_ms: Number(percentile(direct, 50).toFixed(2)),
    direct_p99_ms: Number(percentile(direct, 99).toFixed(2)),
    direct_rps: rps(sides.direct),
    federation_p50_ms: fed.p50,
    federation_p99_ms: fed.p99,
    added_p50_ms: fed.added_p50,
    added_p99_ms: fed.added_p99,
    federation_rps: rps(sides.federation),
  })
  row.rps_ratio = Number((row.federation_rps! / row.direct_rps!).toFixed(3))
  const viaHead = get(sides.viaHead)
  if (viaHead != null) {
    const h = addedOver(viaHead, direct)
    Object.assign(row, {
      via_head_p50_ms: h.p50,
      via_head_p99_ms: h.p99,
      via_head_added_p50_ms: h.added_p50,
      via_head_added_p99_ms: h.added_p99,
      via_head_rps: rps(sides.viaHead),
    })
  }
  const one = get(sides.nginx)
  if (one != null) {
    row.nginx_p50_ms = Number(percentile(one, 50).toFixed(2))
    row.nginx_added_p50_ms = Number((row.nginx_p50_ms - row.direct_p50_ms!).toFixed(2))
  }
  const chain2 = get(sides.chain2)
  if (chain2 != null) {
    const n = addedOver(chain2, direct)
    Object.assign(row, {
      nginx_chain_hops: 2,
      nginx_chain_p50_ms: n.p50,
      nginx_chain_p99_ms: n.p99,
      nginx_chain_added_p50_ms: n.added_p50,
      nginx_chain_added_p99_ms: n.added_p99,
      nginx_chain_rps: rps(sides.chain2),
      ...nginxBudgetRatios(fed, n),
    })
    row.rps_vs_nginx_chain = Number((row.federation_rps! / row.nginx_chain_rps!).toFixed(3))
  }
  const chain3 = get(sides.chain3)
  if (chain3 != null && viaHead != null) {
    const n = addedOver(chain3, direct)
    const h = addedOver(viaHead, direct)
    const budget = nginxBudgetRatios(h, n)
    Object.assign(row, {
      nginx_chain3_added_p50_ms: n.added_p50,
      nginx_chain3_added_p99_ms: n.added_p99,
      nginx_chain3_rps: rps(sides.chain3),
      via_head_p50_budget_ratio: budget.p50_budget_ratio,
      via_head_p99_budget_ratio: budget.p99_budget_ratio,
    })
  }
  return row
}

/** Until the gateway answers straight from the node (its leases are in). */
async function untilDirect(target: Target): Promise<void> {
  const deadline = performance.now() + 15_000
  for (;;) {
    const res = await fetch(`${target.url}/v1/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${target.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: tinyModel, prompt: 'lease?', max_tokens: 1 }),
    })
    await res.arrayBuffer()
    if (res.headers.get('x-garage-path') === 'direct') return
    if (performance.now() > deadline) throw new Error('the federation never went straight to the node')
    await new Promise((r) => setTimeout(r, 50))
  }
}

export async function run(): Promise<Record<string, unknown>> {
  let cluster: BenchCluster | undefined
  const proxies: Array<Nginx | null> = []
  let postgres: TestPostgres | null = null
  try {
    postgres = await startBenchPostgres()
    cluster = await startBenchCluster({
      parallel: 32,
      contextLength: 256,
      federation: true,
      federationViaHead: true,
      ...(postgres != null ? { postgres: postgres.url } : {}),
    })
    const nginx = await startNginx(cluster.direct.url)
    const chain2 = nginx != null ? await startNginxChain(cluster.direct.url, 2) : null
    const chain3 = nginx != null ? await startNginxChain(cluster.direct.url, 3) : null
    proxies.push(nginx, chain2, chain3)
    progress(
      nginx != null ? 'nginx found: measuring plain proxy hops too' : 'nginx not installed: no nginx rows',
    )
    const key = cluster.direct.key
    const named: Record<string, Side | undefined> = {
      direct: side('direct', cluster.direct),
      federation: side('federation', cluster.federation!),
      viaHead: side('via head', cluster.federationViaHead!),
      ...(nginx != null && chain2 != null && chain3 != null
        ? {
            nginx: side('nginx', { url: nginx.url, key }),
            chain2: side('nginx ×2', { url: chain2.url, key }),
            chain3: side('nginx ×3', { url: chain3.url, key }),
          }
        : {}),
    }
    const sides = Object.values(named).filter((s): s is Side => s != null)
    // The gateway asks the head for leases at its first request; they come with a report later.
    for (const s of sides) await latencyBatch(s.target, 2, 2, -1)
    await untilDirect(cluster.federation!)

    // Cold: every process has compiled nothing of its request path yet.
    const cold = Object.fromEntries(Object.entries(named).map(([k, s]) => [k, s && side(s.name, s.target)]))
    await measure(
      Object.values(cold).filter((s): s is Side => s != null),
      [top],
      coldRounds,
      'cold',
    )
    const coldRow = rowOf(top, cold)
    const warm = warmupMs()
    progress(`warming up for ${warm / 1000} s`)
    const warmupRequests = await warmUp(
      sides.map((s) => s.target),
      top,
      warm,
    )
    await measure(sides, concurrencies, rounds, 'warm')
    const rows = concurrencies.map((c) => rowOf(c, named))

    const ratios: number[] = []
    for (let r = 0; r < streamRounds; r++) {
      const order =
        r % 2 === 0 ? [cluster.direct, cluster.federation!] : [cluster.federation!, cluster.direct]
      const got = new Map<Target, number>()
      for (const t of order) got.set(t, await streamOnce(t, r, streamTokens))
      ratios.push(got.get(cluster.federation!)! / got.get(cluster.direct)!)
      progress(`stream round ${r + 1}/${streamRounds}: ratio ${ratios.at(-1)!.toFixed(3)}`)
    }
    const streamRatio = Number(percentile(ratios, 50).toFixed(3))
    // The same path with the gateway's store in PostgreSQL beside SQLite (issue 20).
    const store: StoreComparison | null =
      cluster.stores != null && postgres != null ? await compareStores(cluster.stores, postgres) : null
    const t = rows.find((r) => r.concurrency === top)!
    const goalMet =
      t.p50_budget_ratio != null &&
      t.p50_budget_ratio <= 1 &&
      t.p99_budget_ratio! <= 1 &&
      t.rps_vs_nginx_chain! >= 0.8 &&
      streamRatio >= 0.95
    const result = {
      results: rows,
      cold: coldRow,
      warmup: { ms: warm, requests: warmupRequests },
      federation_rps: t.federation_rps,
      direct_rps: t.direct_rps,
      ...(t.nginx_chain_rps != null ? { nginx_chain_rps: t.nginx_chain_rps } : {}),
      ...(t.nginx_added_p50_ms != null ? { nginx_added_p50_ms: t.nginx_added_p50_ms } : {}),
      stream_tokens_per_s_ratio: streamRatio,
      goal: {
        p50_budget_ratio: `<= 1 at concurrency ${top}: added p50 <= 2 x the 2-hop nginx chain's + 0.5 ms (warm)`,
        p99_budget_ratio: `<= 1 at concurrency ${top}: added p99 <= 2 x the 2-hop nginx chain's + 2 ms (warm)`,
        rps_vs_nginx_chain: `>= 0.8 at concurrency ${top}: federation_rps over nginx_chain_rps (warm)`,
        stream_tokens_per_s_ratio: '>= 0.95',
      },
      goal_met: goalMet,
      ...store?.result,
    }
    const path = await writeResult('gateway', result)
    const lines: Array<[string, string, string]> = []
    for (const [label, r] of [
      ...rows.map((r) => [`c=${r.concurrency}`, r] as const),
      ['cold c=32', coldRow] as const,
    ]) {
      lines.push([`${label} direct p50 / p99 ms`, `${r.direct_p50_ms} / ${r.direct_p99_ms}`, ''])
      lines.push([
        `${label} federation (direct path) added p50 / p99`,
        `${r.added_p50_ms} / ${r.added_p99_ms}`,
        '',
      ])
      if (r.nginx_chain_added_p50_ms != null)
        lines.push([
          `${label} nginx ×2 added p50 / p99`,
          `${r.nginx_chain_added_p50_ms} / ${r.nginx_chain_added_p99_ms}`,
          '',
        ])
      if (r.p50_budget_ratio != null)
        lines.push([
          `${label} p50 / p99 budget ratio`,
          `${r.p50_budget_ratio} / ${r.p99_budget_ratio}`,
          r === t ? '<= 1 / <= 1' : '',
        ])
      lines.push([`${label} federation / direct rps`, `${r.federation_rps} / ${r.direct_rps}`, ''])
      if (r.rps_vs_nginx_chain != null)
        lines.push([
          `${label} federation rps / nginx ×2 rps`,
          String(r.rps_vs_nginx_chain),
          r === t ? '>= 0.8' : '',
        ])
      if (r.via_head_added_p50_ms != null)
        lines.push([
          `${label} via head (3 hops) added p50 / p99, rps`,
          `${r.via_head_added_p50_ms} / ${r.via_head_added_p99_ms}, ${r.via_head_rps}`,
          '',
        ])
      if (r.nginx_chain3_added_p50_ms != null)
        lines.push([
          `${label} nginx ×3 added p50 / p99, rps`,
          `${r.nginx_chain3_added_p50_ms} / ${r.nginx_chain3_added_p99_ms}, ${r.nginx_chain3_rps}`,
          '',
        ])
    }
    lines.push(['stream_tokens_per_s_ratio (federation / direct)', String(streamRatio), '>= 0.95'])
    lines.push(...(store?.rows ?? []))
    process.stdout.write(
      `\ngateway: one-token completions straight to the engine vs through the federation (warm unless marked cold)\n${table(lines)}\n${goalMet ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    closeClient()
    for (const p of proxies) await p?.stop()
    await cluster?.stop()
    await postgres?.destroy()
  }
}
