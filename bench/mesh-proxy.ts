import {
  addedOver,
  type BenchCluster,
  latencyBatch as batch,
  closeClient,
  nginxBudgetRatios,
  startBenchCluster,
  streamOnce,
  type Target,
  warmUp,
  warmupMs,
} from './cluster.ts'
import { type Nginx, startNginxChain } from './nginx.ts'
import { percentile, progress, table, writeResult } from './report.ts'

/**
 * What the mesh hop costs: the same requests sent straight to an engine and through the regional
 * head (client → head HTTP → libp2p /garage/infer/1.0.0 → node daemon → engine), side by side in
 * one run. Latency with max_tokens 1 (the engine's work is minimal), then streamed throughput with
 * long answers. The head and the node are `garage` processes, as on real machines. Where nginx is
 * installed, two nginx proxies in a row (as many hops as head and node) measure what a plain proxy
 * hop costs on this machine in the same run.
 */
const chainHops = 2
const latencyConcurrencies = [1, 16]
const latencyRounds = 12
const requestsPerWorker = 8
const streamRounds = 7
const streamTokens = 256

const latencyBatch = (target: Target, concurrency: number, round: number): Promise<number[]> =>
  batch(target, concurrency, requestsPerWorker, round)

const coldRounds = 2

function median(xs: number[]): number {
  return percentile(xs, 50)
}

/** One row: the sides in turn for `rounds` rounds at concurrency `c`, what head and node add, and nginx's. */
async function latencyRow(
  c: number,
  rounds: number,
  directTarget: Target,
  viaHead: Target,
  viaNginx: Target | null,
): Promise<Record<string, number>> {
  const d: number[] = []
  const h: number[] = []
  const n: number[] = []
  const sides: Array<[Target, number[]]> = [
    [directTarget, d],
    [viaHead, h],
    ...(viaNginx != null ? [[viaNginx, n] as [Target, number[]]] : []),
  ]
  for (let r = 0; r < rounds; r++) {
    // rotate the order so drift on a noisy machine hits every side alike
    for (let i = 0; i < sides.length; i++) {
      const [target, into] = sides[(i + r) % sides.length]!
      into.push(...(await latencyBatch(target, c, r)))
    }
  }
  const head = addedOver(h, d)
  const row: Record<string, number> = {
    concurrency: c,
    requests: d.length,
    direct_p50_ms: Number(percentile(d, 50).toFixed(2)),
    direct_p99_ms: Number(percentile(d, 99).toFixed(2)),
    via_head_p50_ms: head.p50,
    via_head_p99_ms: head.p99,
    added_p50_ms: head.added_p50,
    added_p99_ms: head.added_p99,
  }
  if (n.length > 0) {
    const chain = addedOver(n, d)
    Object.assign(row, {
      nginx_chain_hops: chainHops,
      nginx_chain_p50_ms: chain.p50,
      nginx_chain_p99_ms: chain.p99,
      nginx_chain_added_p50_ms: chain.added_p50,
      nginx_chain_added_p99_ms: chain.added_p99,
      ...nginxBudgetRatios(head, chain),
    })
  }
  return row
}

export async function run(): Promise<Record<string, unknown>> {
  let cluster: BenchCluster | undefined
  let chain: Nginx | null = null
  try {
    cluster = await startBenchCluster({ parallel: 16, contextLength: 512, federation: false })
    const directTarget = cluster.direct
    const viaHead = cluster.head
    chain = await startNginxChain(cluster.direct.url, chainHops)
    progress(
      chain != null ? `nginx found: measuring ${chainHops} plain proxy hops too` : 'nginx not installed',
    )
    const viaNginx: Target | null = chain != null ? { url: chain.url, key: cluster.direct.key } : null
    if (viaNginx != null) await latencyBatch(viaNginx, 4, -1)
    // Warm both paths: connections, the engine's buffers, the router's view of the node.
    await latencyBatch(directTarget, 4, -1)
    await latencyBatch(viaHead, 4, -1)

    // Cold: nothing of the request path compiled yet, as after a restart (reported apart).
    const coldRow = await latencyRow(16, coldRounds, directTarget, viaHead, viaNginx)
    progress(`cold, concurrency 16: added p50 ${coldRow.added_p50_ms} ms, p99 ${coldRow.added_p99_ms} ms`)
    const warm = warmupMs()
    progress(`warming up for ${warm / 1000} s`)
    const warmupRequests = await warmUp(
      [directTarget, viaHead, ...(viaNginx != null ? [viaNginx] : [])],
      16,
      warm,
    )
    const rows: Array<Record<string, number>> = []
    for (const c of latencyConcurrencies) {
      const row = await latencyRow(c, latencyRounds, directTarget, viaHead, viaNginx)
      rows.push(row)
      progress(`concurrency ${c}: added p50 ${row.added_p50_ms} ms, p99 ${row.added_p99_ms} ms`)
    }

    const ratios: number[] = []
    const directTps: number[] = []
    const headTps: number[] = []
    for (let r = 0; r < streamRounds; r++) {
      const order = r % 2 === 0 ? [directTarget, viaHead] : [viaHead, directTarget]
      const got = new Map<Target, number>()
      for (const t of order) got.set(t, await streamOnce(t, r, streamTokens))
      directTps.push(got.get(directTarget)!)
      headTps.push(got.get(viaHead)!)
      ratios.push(got.get(viaHead)! / got.get(directTarget)!)
      progress(`stream round ${r + 1}/${streamRounds}: ratio ${ratios.at(-1)!.toFixed(3)}`)
    }
    const c16 = rows.find((r) => r.concurrency === 16)!
    const streamRatio = Number(median(ratios).toFixed(3))
    const goalMet =
      c16.p50_budget_ratio != null &&
      c16.p50_budget_ratio <= 1 &&
      c16.p99_budget_ratio! <= 1 &&
      streamRatio >= 0.95
    const result = {
      latency: rows,
      cold: coldRow,
      warmup: { ms: warm, requests: warmupRequests },
      stream: {
        max_tokens: streamTokens,
        direct_tokens_per_s: Math.round(median(directTps)),
        via_head_tokens_per_s: Math.round(median(headTps)),
      },
      stream_tokens_per_s_ratio: streamRatio,
      goal: {
        p50_budget_ratio: "<= 1 at concurrency 16: added p50 <= 2 x the nginx chain's + 0.5 ms (warm)",
        p99_budget_ratio: "<= 1 at concurrency 16: added p99 <= 2 x the nginx chain's + 2 ms (warm)",
        stream_tokens_per_s_ratio: '>= 0.95',
      },
      goal_met: goalMet,
    }
    const path = await writeResult('mesh-proxy', result)
    process.stdout.write(
      `\nmesh-proxy: one-token completions straight to the engine vs through head and node\n${table([
        ...[...rows, { ...coldRow, cold: 1 }].flatMap(
          (r) =>
            [
              [
                `${r.cold != null ? 'cold ' : ''}c=${r.concurrency} direct_p50_ms / p99`,
                `${r.direct_p50_ms} / ${r.direct_p99_ms}`,
                '',
              ],
              [
                `${r.cold != null ? 'cold ' : ''}c=${r.concurrency} via_head_p50_ms / p99`,
                `${r.via_head_p50_ms} / ${r.via_head_p99_ms}`,
                '',
              ],
              [
                `${r.cold != null ? 'cold ' : ''}c=${r.concurrency} added_p50_ms / p99`,
                `${r.added_p50_ms} / ${r.added_p99_ms}`,
                '',
              ],
              ...(r.p50_budget_ratio != null
                ? [
                    [
                      `${r.cold != null ? 'cold ' : ''}c=${r.concurrency} p50 / p99 budget ratio (vs 2 x nginx + 0.5 / 2 ms)`,
                      `${r.p50_budget_ratio} / ${r.p99_budget_ratio}`,
                      r === c16 ? '<= 1 / <= 1' : '',
                    ],
                  ]
                : []),
              ...(r.nginx_chain_added_p50_ms != null
                ? [
                    [
                      `${r.cold != null ? 'cold ' : ''}c=${r.concurrency} nginx added p50 / p99 ms (${chainHops} hops)`,
                      `${r.nginx_chain_added_p50_ms} / ${r.nginx_chain_added_p99_ms}`,
                      '',
                    ],
                  ]
                : []),
            ] as Array<[string, string, string]>,
        ),
        ['stream_tokens_per_s_ratio', String(streamRatio), '>= 0.95'],
      ] as Array<[string, string, string]>)}\n${goalMet ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    closeClient()
    await chain?.stop()
    await cluster?.stop()
  }
}
