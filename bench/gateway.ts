import type { TestPostgres } from '../test/helpers/postgres.ts'
import { type BenchCluster, closeClient, latencyBatch, startBenchCluster, type Target } from './cluster.ts'
import { compareStores, type StoreComparison, startBenchPostgres } from './gateway-store.ts'
import { type Nginx, startNginx, startNginxChain } from './nginx.ts'
import { percentile, progress, table, writeResult } from './report.ts'

/**
 * The whole public path (client → federation → head → node → engine, each a `garage` process)
 * against the same one-token requests sent straight to an identical engine, side by side in one run;
 * and, where nginx is installed, one plain nginx proxy hop in front of that engine, and a chain of
 * three (as many hops as federation → head → node), for scale.
 */
const concurrencies = [1, 32]
const rounds = 10
const perWorker = 6
/** federation → head → node: the hops an nginx chain must have to compare like with like. */
const chainHops = 3

interface Side {
  name: string
  target: Target
  latencies: Map<number, number[]>
  rps: Map<number, number[]>
}

export async function run(): Promise<Record<string, unknown>> {
  let cluster: BenchCluster | undefined
  let nginx: Nginx | null = null
  let chain: Nginx | null = null
  let postgres: TestPostgres | null = null
  try {
    postgres = await startBenchPostgres()
    cluster = await startBenchCluster({
      parallel: 32,
      contextLength: 256,
      federation: true,
      ...(postgres != null ? { postgres: postgres.url } : {}),
    })
    nginx = await startNginx(cluster.direct.url)
    chain = nginx != null ? await startNginxChain(cluster.direct.url, chainHops) : null
    progress(
      nginx != null ? 'nginx found: measuring one plain proxy hop too' : 'nginx not installed: no nginx row',
    )
    const sides: Side[] = [
      { name: 'direct', target: cluster.direct, latencies: new Map(), rps: new Map() },
      { name: 'federation', target: cluster.federation!, latencies: new Map(), rps: new Map() },
      ...(nginx != null && chain != null
        ? [
            {
              name: 'nginx',
              target: { url: nginx.url, key: cluster.direct.key },
              latencies: new Map(),
              rps: new Map(),
            },
            {
              name: 'nginx chain',
              target: { url: chain.url, key: cluster.direct.key },
              latencies: new Map(),
              rps: new Map(),
            },
          ]
        : []),
    ]
    for (const side of sides) await latencyBatch(side.target, 4, 2, -1)
    for (const c of concurrencies) {
      for (let r = 0; r < rounds; r++) {
        // rotate the order so drift on a noisy machine hits every side alike
        const order = sides.map((_, i) => sides[(i + r) % sides.length]!)
        for (const side of order) {
          const started = performance.now()
          const lat = await latencyBatch(side.target, c, perWorker, r)
          const seconds = (performance.now() - started) / 1000
          side.latencies.set(c, [...(side.latencies.get(c) ?? []), ...lat])
          side.rps.set(c, [...(side.rps.get(c) ?? []), lat.length / seconds])
        }
        progress(`concurrency ${c}: round ${r + 1}/${rounds}`)
      }
    }
    const [direct, federation] = sides as [Side, Side, Side?]
    const nginxSide = sides[2]
    const chainSide = sides[3]
    const rows = concurrencies.map((c) => {
      const d = direct.latencies.get(c)!
      const f = federation.latencies.get(c)!
      const row: Record<string, number> = {
        concurrency: c,
        requests: d.length,
        direct_p50_ms: Number(percentile(d, 50).toFixed(2)),
        direct_p99_ms: Number(percentile(d, 99).toFixed(2)),
        federation_p50_ms: Number(percentile(f, 50).toFixed(2)),
        federation_p99_ms: Number(percentile(f, 99).toFixed(2)),
        direct_rps: Math.round(percentile(direct.rps.get(c)!, 50)),
        federation_rps: Math.round(percentile(federation.rps.get(c)!, 50)),
      }
      row.added_p50_ms = Number((row.federation_p50_ms! - row.direct_p50_ms!).toFixed(2))
      row.added_p99_ms = Number((row.federation_p99_ms! - row.direct_p99_ms!).toFixed(2))
      row.rps_ratio = Number((row.federation_rps! / row.direct_rps!).toFixed(3))
      if (nginxSide != null) {
        const n = nginxSide.latencies.get(c)!
        row.nginx_p50_ms = Number(percentile(n, 50).toFixed(2))
        row.nginx_added_p50_ms = Number((row.nginx_p50_ms - row.direct_p50_ms!).toFixed(2))
      }
      if (chainSide != null) {
        const n = chainSide.latencies.get(c)!
        row.nginx_chain_hops = chainHops
        row.nginx_chain_p50_ms = Number(percentile(n, 50).toFixed(2))
        row.nginx_chain_p99_ms = Number(percentile(n, 99).toFixed(2))
        row.nginx_chain_added_p50_ms = Number((row.nginx_chain_p50_ms - row.direct_p50_ms!).toFixed(2))
        row.nginx_chain_added_p99_ms = Number((row.nginx_chain_p99_ms - row.direct_p99_ms!).toFixed(2))
        row.nginx_chain_rps = Math.round(percentile(chainSide.rps.get(c)!, 50))
      }
      return row
    })
    // The same path with the gateway's store in PostgreSQL beside SQLite (issue 20).
    const store: StoreComparison | null =
      cluster.stores != null && postgres != null ? await compareStores(cluster.stores, postgres) : null
    const top = rows.find((r) => r.concurrency === 32)!
    const goalMet = top.added_p50_ms! <= 3 && top.added_p99_ms! <= 15 && top.rps_ratio! >= 0.5
    const result = {
      results: rows,
      federation_rps: top.federation_rps,
      direct_rps: top.direct_rps,
      ...(top.nginx_added_p50_ms != null ? { nginx_added_p50_ms: top.nginx_added_p50_ms } : {}),
      goal: {
        added_p50_ms: '<= 3 at concurrency 32',
        added_p99_ms: '<= 15 at concurrency 32',
        federation_rps: '>= 0.5 x direct_rps',
      },
      goal_met: goalMet,
      ...store?.result,
    }
    const path = await writeResult('gateway', result)
    process.stdout.write(
      `\ngateway: one-token completions straight to the engine vs federation → head → node → engine\n${table(
        rows
          .flatMap(
            (r) =>
              [
                [`c=${r.concurrency} direct p50 / p99 ms`, `${r.direct_p50_ms} / ${r.direct_p99_ms}`, ''],
                [
                  `c=${r.concurrency} federation p50 / p99 ms`,
                  `${r.federation_p50_ms} / ${r.federation_p99_ms}`,
                  '',
                ],
                [
                  `c=${r.concurrency} added p50 / p99 ms`,
                  `${r.added_p50_ms} / ${r.added_p99_ms}`,
                  r.concurrency === 32 ? '<= 3 / <= 15' : '',
                ],
                [
                  `c=${r.concurrency} federation / direct rps`,
                  `${r.federation_rps} / ${r.direct_rps} (${r.rps_ratio})`,
                  r.concurrency === 32 ? '>= 0.5' : '',
                ],
                ...(r.nginx_added_p50_ms != null
                  ? [[`c=${r.concurrency} nginx added p50 ms (one hop)`, String(r.nginx_added_p50_ms), '']]
                  : []),
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
          )
          .concat(store?.rows ?? []),
      )}\n${goalMet ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    closeClient()
    await nginx?.stop()
    await chain?.stop()
    await cluster?.stop()
    await postgres?.destroy()
  }
}
