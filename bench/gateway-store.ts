import { existsSync } from 'node:fs'
import { readdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import pg from 'pg'
import { postgresBin, startTestPostgres, type TestPostgres } from '../test/helpers/postgres.ts'
import { latencyBatch, type Target } from './cluster.ts'
import { percentile, progress } from './report.ts'

/**
 * The gateway on PostgreSQL beside the gateway on SQLite, in the same run, on the same region: the
 * same one-token completions through `garage federation` with its keys, ledger and rate limits in
 * SQLite (limits in memory) or in PostgreSQL (a throw-away server of this run, on loopback). Both
 * keys have limits no request reaches, so both limiters run on every request.
 */

const concurrencies = [1, 32]
const rounds = 8
/** Requests per worker and round: more at concurrency 1, for as many samples. */
const perWorker = (c: number): number => (c === 1 ? 40 : 6)
const clockTicks = 100

/** PostgreSQL for the comparison, or null (with a note) where Debian's postgresql is not installed. */
export async function startBenchPostgres(): Promise<TestPostgres | null> {
  if (!existsSync(join(postgresBin, 'initdb'))) {
    progress(`no PostgreSQL at ${postgresBin} (apt-get install postgresql): no PostgreSQL gateway row`)
    return null
  }
  progress('starting a throw-away PostgreSQL server for the gateway on PostgreSQL')
  return startTestPostgres()
}

/** CPU seconds a process has used so far. */
async function processCpuSeconds(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'latin1')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / clockTicks
}

/** CPU seconds used so far by the server: the postmaster and every backend it forked. */
async function serverCpuSeconds(server: TestPostgres): Promise<number> {
  const postmaster = Number(
    (await readFile(join(server.dir, 'data', 'postmaster.pid'), 'utf8')).split('\n')[0],
  )
  let total = 0
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = await readFile(`/proc/${entry}/stat`, 'latin1')
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
      if (Number(entry) !== postmaster && Number(fields[1]) !== postmaster) continue
      total += (Number(fields[11]) + Number(fields[12])) / clockTicks
    } catch {
      // gone meanwhile
    }
  }
  return total
}

interface Side {
  name: 'sqlite' | 'postgres'
  target: Target & { pid: number }
  /** CPU seconds its gateway process used during its rounds, and the requests they sent. */
  gatewayCpuSeconds: number
  requests: number
  latencies: Map<number, number[]>
  rps: Map<number, number[]>
}

export interface StoreComparison {
  /** Merged into the gateway bench's results. */
  result: Record<string, unknown>
  /** Rows for the gateway bench's table: metric, value, goal. */
  rows: Array<[string, string, string]>
}

/** Measures both gateways side by side (rounds alternate which goes first) and says what the PostgreSQL store costs. */
export async function compareStores(
  stores: { sqlite: Target & { pid: number }; postgres: Target & { pid: number } },
  server: TestPostgres,
): Promise<StoreComparison> {
  const sides: Side[] = [
    {
      name: 'sqlite',
      target: stores.sqlite,
      gatewayCpuSeconds: 0,
      requests: 0,
      latencies: new Map(),
      rps: new Map(),
    },
    {
      name: 'postgres',
      target: stores.postgres,
      gatewayCpuSeconds: 0,
      requests: 0,
      latencies: new Map(),
      rps: new Map(),
    },
  ]
  const stats = new pg.Pool({ connectionString: server.url, max: 1 })
  const commits = async (): Promise<number> =>
    Number(
      (await stats.query('SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()'))
        .rows[0].xact_commit,
    )
  let pgRequests = 0
  let pgCommits = 0
  let pgCpuSeconds = 0
  try {
    for (const side of sides) await latencyBatch(side.target, 8, 4, -1)
    for (const c of concurrencies) {
      for (let r = 0; r < rounds; r++) {
        for (const side of r % 2 === 0 ? sides : [...sides].reverse()) {
          const commitsBefore = side.name === 'postgres' ? await commits() : 0
          const cpuBefore = side.name === 'postgres' ? await serverCpuSeconds(server) : 0
          const gatewayBefore = await processCpuSeconds(side.target.pid)
          const started = performance.now()
          const lat = await latencyBatch(side.target, c, perWorker(c), 1000 + r)
          const seconds = (performance.now() - started) / 1000
          side.gatewayCpuSeconds += (await processCpuSeconds(side.target.pid)) - gatewayBefore
          side.requests += lat.length
          if (side.name === 'postgres') {
            pgRequests += lat.length
            pgCpuSeconds += (await serverCpuSeconds(server)) - cpuBefore
            // The stats query's own commit is not the gateway's.
            pgCommits += (await commits()) - commitsBefore - 1
          }
          side.latencies.set(c, [...(side.latencies.get(c) ?? []), ...lat])
          side.rps.set(c, [...(side.rps.get(c) ?? []), lat.length / seconds])
        }
        progress(`sqlite vs postgres store, concurrency ${c}: round ${r + 1}/${rounds}`)
      }
    }
  } finally {
    await stats.end()
  }
  const [sqlite, postgres] = sides as [Side, Side]
  const store = concurrencies.map((c) => {
    const s = sqlite.latencies.get(c)!
    const p = postgres.latencies.get(c)!
    const row = {
      concurrency: c,
      requests: s.length,
      sqlite_p50_ms: Number(percentile(s, 50).toFixed(2)),
      postgres_p50_ms: Number(percentile(p, 50).toFixed(2)),
      sqlite_p99_ms: Number(percentile(s, 99).toFixed(2)),
      postgres_p99_ms: Number(percentile(p, 99).toFixed(2)),
      sqlite_rps: Math.round(percentile(sqlite.rps.get(c)!, 50)),
      postgres_rps: Math.round(percentile(postgres.rps.get(c)!, 50)),
      added_p50_ms: 0,
      rps_ratio: 0,
    }
    row.added_p50_ms = Number((row.postgres_p50_ms - row.sqlite_p50_ms).toFixed(2))
    row.rps_ratio = Number((row.postgres_rps / row.sqlite_rps).toFixed(3))
    return row
  })
  const low = store.find((r) => r.concurrency === 1)!
  const top = store.find((r) => r.concurrency === 32)!
  const result = {
    store,
    postgres_rps_ratio: top.rps_ratio,
    postgres_added_p50_ms: low.added_p50_ms,
    postgres_added_p50_ms_c32: top.added_p50_ms,
    postgres_commits_per_request: Number((pgCommits / pgRequests).toFixed(3)),
    postgres_server_cpu_ms_per_request: Number(((pgCpuSeconds * 1000) / pgRequests).toFixed(3)),
    sqlite_gateway_cpu_ms_per_request: Number(
      ((sqlite.gatewayCpuSeconds * 1000) / sqlite.requests).toFixed(3),
    ),
    postgres_gateway_cpu_ms_per_request: Number(
      ((postgres.gatewayCpuSeconds * 1000) / postgres.requests).toFixed(3),
    ),
    postgres_goal: {
      postgres_rps_ratio: '>= 0.9 at concurrency 32 (gateway on PostgreSQL over gateway on SQLite)',
      postgres_added_p50_ms: '<= 1 at concurrency 1',
    },
    postgres_goal_met: top.rps_ratio >= 0.9 && low.added_p50_ms <= 1,
  }
  const rows: Array<[string, string, string]> = store.flatMap((r) => [
    [
      `c=${r.concurrency} gateway p50 ms, sqlite / postgres store`,
      `${r.sqlite_p50_ms} / ${r.postgres_p50_ms} (+${r.added_p50_ms})`,
      r.concurrency === 1 ? '+ <= 1' : '',
    ],
    [
      `c=${r.concurrency} gateway rps, sqlite / postgres store`,
      `${r.sqlite_rps} / ${r.postgres_rps} (${r.rps_ratio})`,
      r.concurrency === 32 ? '>= 0.9' : '',
    ],
  ])
  rows.push(
    [
      'gateway CPU ms per request, sqlite / postgres store',
      `${result.sqlite_gateway_cpu_ms_per_request} / ${result.postgres_gateway_cpu_ms_per_request}`,
      '',
    ],
    [
      'postgres store: commits, server CPU ms per request',
      `${result.postgres_commits_per_request}, ${result.postgres_server_cpu_ms_per_request}`,
      '',
    ],
  )
  return { result, rows }
}
