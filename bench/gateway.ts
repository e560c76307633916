import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { execa } from 'execa'
import { type BenchCluster, closeClient, latencyBatch, startBenchCluster, type Target } from './cluster.ts'
import { percentile, progress, table, writeResult } from './report.ts'

/**
 * The whole public path (client → federation → head → node → engine, each a `garage` process)
 * against the same one-token requests sent straight to an identical engine, side by side in one run;
 * and, where nginx is installed, one plain nginx proxy hop in front of that engine for scale.
 */
const concurrencies = [1, 32]
const rounds = 10
const perWorker = 6

async function freePort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as { port: number }).port
  await new Promise<void>((resolve) => server.close(() => resolve()))
  return port
}

/** nginx as a plain reverse proxy in front of `upstream`, or null when nginx is not installed. */
async function startNginx(upstream: string): Promise<{ url: string; stop(): Promise<void> } | null> {
  const found = await execa('nginx', ['-v'], { reject: false })
  if (found.exitCode !== 0) return null
  const dir = await mkdtemp(join(tmpdir(), 'garage-bench-nginx-'))
  const port = await freePort()
  const upstreamHost = new URL(upstream).host
  await writeFile(
    join(dir, 'nginx.conf'),
    `worker_processes 1;
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${dir};
  proxy_temp_path ${dir};
  fastcgi_temp_path ${dir};
  uwsgi_temp_path ${dir};
  scgi_temp_path ${dir};
  upstream engine { server ${upstreamHost}; keepalive 64; }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
`,
  )
  const child: ChildProcess = spawn('nginx', ['-c', join(dir, 'nginx.conf'), '-p', dir], { stdio: 'ignore' })
  const url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + 10_000
  for (;;) {
    const ok = await fetch(`${url}/health`).then(
      () => true,
      () => false,
    )
    if (ok) break
    if (Date.now() > deadline) throw new Error('nginx did not start')
    await new Promise((r) => setTimeout(r, 100))
  }
  return {
    url,
    async stop() {
      await new Promise<void>((resolve) => {
        if (child.exitCode != null) return resolve()
        child.once('exit', () => resolve())
        child.kill('SIGTERM')
      })
      await rm(dir, { recursive: true, force: true })
    },
  }
}

interface Side {
  name: string
  target: Target
  latencies: Map<number, number[]>
  rps: Map<number, number[]>
}

export async function run(): Promise<Record<string, unknown>> {
  let cluster: BenchCluster | undefined
  let nginx: Awaited<ReturnType<typeof startNginx>> = null
  try {
    cluster = await startBenchCluster({ parallel: 32, contextLength: 256, federation: true })
    nginx = await startNginx(cluster.direct.url)
    progress(
      nginx != null ? 'nginx found: measuring one plain proxy hop too' : 'nginx not installed: no nginx row',
    )
    const sides: Side[] = [
      { name: 'direct', target: cluster.direct, latencies: new Map(), rps: new Map() },
      { name: 'federation', target: cluster.federation!, latencies: new Map(), rps: new Map() },
      ...(nginx != null
        ? [
            {
              name: 'nginx',
              target: { url: nginx.url, key: cluster.direct.key },
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
      return row
    })
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
    }
    const path = await writeResult('gateway', result)
    process.stdout.write(
      `\ngateway: one-token completions straight to the engine vs federation → head → node → engine\n${table(
        rows.flatMap(
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
            ] as Array<[string, string, string]>,
        ),
      )}\n${goalMet ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    closeClient()
    await nginx?.stop()
    await cluster?.stop()
  }
}
