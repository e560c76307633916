import {
  type BenchCluster,
  latencyBatch as batch,
  closeClient,
  post,
  startBenchCluster,
  type Target,
  tinyModel,
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

/** One long streamed completion; completion tokens per second. */
async function streamOnce(target: Target, round: number): Promise<number> {
  const r = await post(target, '/v1/completions', {
    model: tinyModel,
    prompt: `stream ${round}`,
    max_tokens: streamTokens,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  })
  const usage = r.text
    .split('\n')
    .filter((l) => l.startsWith('data: {'))
    .map((l) => JSON.parse(l.slice(6)) as { usage?: { completion_tokens: number } })
    .find((e) => e.usage != null)?.usage
  if (usage?.completion_tokens !== streamTokens) throw new Error('the stream did not carry every token')
  return usage.completion_tokens / (r.ms / 1000)
}

function median(xs: number[]): number {
  return percentile(xs, 50)
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

    const rows: Array<Record<string, number>> = []
    for (const c of latencyConcurrencies) {
      const d: number[] = []
      const h: number[] = []
      const n: number[] = []
      const sides: Array<[Target, number[]]> = [
        [directTarget, d],
        [viaHead, h],
        ...(viaNginx != null ? [[viaNginx, n] as [Target, number[]]] : []),
      ]
      for (let r = 0; r < latencyRounds; r++) {
        // rotate the order so drift on a noisy machine hits every side alike
        for (let i = 0; i < sides.length; i++) {
          const [target, into] = sides[(i + r) % sides.length]!
          into.push(...(await latencyBatch(target, c, r)))
        }
      }
      const row = {
        concurrency: c,
        requests: d.length,
        direct_p50_ms: Number(percentile(d, 50).toFixed(2)),
        direct_p99_ms: Number(percentile(d, 99).toFixed(2)),
        via_head_p50_ms: Number(percentile(h, 50).toFixed(2)),
        via_head_p99_ms: Number(percentile(h, 99).toFixed(2)),
        added_p50_ms: 0,
        added_p99_ms: 0,
      }
      row.added_p50_ms = Number((row.via_head_p50_ms - row.direct_p50_ms).toFixed(2))
      row.added_p99_ms = Number((row.via_head_p99_ms - row.direct_p99_ms).toFixed(2))
      if (n.length > 0) {
        const p50 = percentile(n, 50)
        const p99 = percentile(n, 99)
        Object.assign(row, {
          nginx_chain_hops: chainHops,
          nginx_chain_p50_ms: Number(p50.toFixed(2)),
          nginx_chain_p99_ms: Number(p99.toFixed(2)),
          nginx_chain_added_p50_ms: Number((p50 - row.direct_p50_ms).toFixed(2)),
          nginx_chain_added_p99_ms: Number((p99 - row.direct_p99_ms).toFixed(2)),
        })
      }
      rows.push(row)
      progress(`concurrency ${c}: added p50 ${row.added_p50_ms} ms, p99 ${row.added_p99_ms} ms`)
    }

    const ratios: number[] = []
    const directTps: number[] = []
    const headTps: number[] = []
    for (let r = 0; r < streamRounds; r++) {
      const order = r % 2 === 0 ? [directTarget, viaHead] : [viaHead, directTarget]
      const got = new Map<Target, number>()
      for (const t of order) got.set(t, await streamOnce(t, r))
      directTps.push(got.get(directTarget)!)
      headTps.push(got.get(viaHead)!)
      ratios.push(got.get(viaHead)! / got.get(directTarget)!)
      progress(`stream round ${r + 1}/${streamRounds}: ratio ${ratios.at(-1)!.toFixed(3)}`)
    }
    const c16 = rows.find((r) => r.concurrency === 16)!
    const streamRatio = Number(median(ratios).toFixed(3))
    const goalMet = c16.added_p50_ms! <= 1 && c16.added_p99_ms! <= 5 && streamRatio >= 0.95
    const result = {
      latency: rows,
      stream: {
        max_tokens: streamTokens,
        direct_tokens_per_s: Math.round(median(directTps)),
        via_head_tokens_per_s: Math.round(median(headTps)),
      },
      stream_tokens_per_s_ratio: streamRatio,
      goal: {
        added_p50_ms: '<= 1 at concurrency 16',
        added_p99_ms: '<= 5 at concurrency 16',
        stream_tokens_per_s_ratio: '>= 0.95',
      },
      goal_met: goalMet,
    }
    const path = await writeResult('mesh-proxy', result)
    process.stdout.write(
      `\nmesh-proxy: one-token completions straight to the engine vs through head and node\n${table([
        ...rows.flatMap(
          (r) =>
            [
              [`c=${r.concurrency} direct_p50_ms / p99`, `${r.direct_p50_ms} / ${r.direct_p99_ms}`, ''],
              [`c=${r.concurrency} via_head_p50_ms / p99`, `${r.via_head_p50_ms} / ${r.via_head_p99_ms}`, ''],
              [
                `c=${r.concurrency} added_p50_ms / p99`,
                `${r.added_p50_ms} / ${r.added_p99_ms}`,
                r.concurrency === 16 ? '<= 1 / <= 5' : '',
              ],
              ...(r.nginx_chain_added_p50_ms != null
                ? [
                    [
                      `c=${r.concurrency} nginx added p50 / p99 ms (${chainHops} hops)`,
                      `${r.nginx_chain_added_p50_ms} / ${r.nginx_chain_added_p99_ms}`,
                      '',
                    ],
                  ]
                : []),
            ] as Array<[string, string, string]>,
        ),
        ['stream_tokens_per_s_ratio', String(streamRatio), '>= 0.95'],
      ])}\n${goalMet ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    closeClient()
    await chain?.stop()
    await cluster?.stop()
  }
}
