/**
 * The scale argument (docs/scale.md): discovery and routing at 10^4 and 10^5 nodes, from the real
 * code where that is feasible and a model of it where it is not.
 *
 * 1. DHT: a model of kad-dht 16's lookups at 10^4 / 10^5 servers, checked against real mesh nodes.
 * 2. Routers: the real RegionalRouter and FederationRouter, timed per pick at 10^3-10^5 nodes.
 * 3. Head load: the real head in its own process with 100 real nodes (CPU per connection, join,
 *    telemetry report, DHT request, memory per node), and the real handlers at 10^5 registered nodes.
 * 4. Federation refresh: GET /v1/models over the mesh by pool size, scaled to 10^2-10^3 regions.
 */

import { defaultMaxHeadsPerRound, defaultRefreshIntervalMs } from '../federation/regions.ts'
import { defaultConnectionLimits } from '../mesh/node.ts'
import { leaseReportIntervalMs, telemetryIntervalMs } from '../mesh/protocols.ts'
import { progress, table, writeResult } from './report.ts'
import { garageDiscovery, type KademliaFigures, kademliaAt } from './scale/dht.ts'
import { validateDhtModel } from './scale/dht-real.ts'
import {
  federationRouterPickCost,
  type JoinAppCost,
  joinAppCost,
  leaseAppCost,
  type PickCost,
  regionalRouterPickCost,
  telemetryAppCost,
} from './scale/head-costs.ts'
import { type HeadLoad, measureHeadLoad } from './scale/head-load.ts'
import { classicKademliaParams, kadDhtParams } from './scale/kademlia.ts'

/** A head may spend this share of one core on a duty before we call it topped out: the rest routes tokens. */
const coreBudget = 0.5
/** Memory a coordinator's head process can reasonably hold for its nodes. */
const memoryBudgetGiB = 4

const round = (v: number, digits = 2): number => Number(v.toFixed(digits))

/** Nodes per head at which pick() at the region's demand uses `coreBudget`: cost and demand both grow with n. */
function routerLimit(picks: PickCost[]): number {
  const largest = picks[picks.length - 1]!
  const perNodeSquared = largest.coreShareAtDemand / largest.nodes ** 2
  return Math.round(Math.sqrt(coreBudget / perNodeSquared))
}

/** What one head pays at `nodes` joined nodes, from the measured unit costs. */
function headAt(
  nodes: number,
  load: HeadLoad,
  picks: PickCost[],
  replicasNsPerNode: number,
): Record<string, number> {
  const reportsPerSecond = nodes / (telemetryIntervalMs / 1000)
  const pick = picks.find((p) => p.nodes === nodes)
  return {
    nodes,
    telemetry_reports_per_s: reportsPerSecond,
    telemetry_core_share: round((reportsPerSecond * load.telemetry.cpuUsPerReport) / 1e6),
    telemetry_bytes_in_per_s: Math.round(reportsPerSecond * (load.telemetry.bytesInPerReport ?? 0)),
    connections: nodes,
    connection_cap: defaultConnectionLimits.bootstrap.maxConnections,
    memory_mib: Math.round((nodes * load.memoryKiBPerNode.rss) / 1024),
    router_pick_p50_ms: pick == null ? Number.NaN : round(pick.pickUs.p50 / 1000, 3),
    router_picks_per_s_demand: pick?.demandPicksPerSecond ?? Number.NaN,
    router_core_share: pick == null ? Number.NaN : round(pick.coreShareAtDemand),
    // Every node rejoins after a head restart: connect + join each, and the O(n) replica count per join.
    restart_rejoin_cpu_s: Math.round(
      (nodes * (load.connectCpuMsPerNode + load.joinCpuMsPerJoin)) / 1000 +
        ((nodes * nodes) / 2) * replicasNsPerNode * 1e-9,
    ),
  }
}

export async function run(): Promise<Record<string, unknown>> {
  const started = performance.now()

  progress('scale 1/5: Kademlia model at 10^4 and 10^5 DHT servers')
  const kademlia: KademliaFigures[] = []
  for (const servers of [10_000, 100_000]) {
    for (const params of [kadDhtParams, classicKademliaParams]) {
      kademlia.push(kademliaAt({ servers, params, lookups: servers >= 100_000 ? 300 : 500 }))
      progress(`  ${params.table} table, ${servers} servers: ${kademlia[kademlia.length - 1]!.wallMs} ms`)
    }
  }
  const garage = [20, 200, 2_000].map((servers) =>
    garageDiscovery({ regions: servers / 2, params: kadDhtParams, samples: 300 }),
  )

  progress('scale 2/5: the model against real DHT servers and clients (loopback)')
  const validation = [
    await validateDhtModel({ servers: 32, clients: 12 }),
    // Tables of 4 per bucket on a 2-bit trie: lookups of several hops, the regime of 10^5 servers.
    await validateDhtModel({ servers: 48, clients: 12, table: { kBucketSize: 4, prefixLength: 2 } }),
  ]
  for (const v of validation) {
    progress(
      `  k ${v.table.kBucketSize}, ${v.servers} servers: ${v.wallMs} ms, ${v.real.queryErrors} failed requests`,
    )
  }

  progress('scale 3/5: RegionalRouter.pick and FederationRouter.pick under churn')
  const picks: PickCost[] = []
  const picksAllMeasured: PickCost[] = []
  for (const nodes of [1_000, 10_000, 100_000]) {
    picks.push(regionalRouterPickCost({ nodes }))
    picksAllMeasured.push(regionalRouterPickCost({ nodes, unmeasuredShare: 0 }))
    progress(`  ${nodes} nodes: pick p50 ${round(picks[picks.length - 1]!.pickUs.p50)} µs`)
  }
  const regionPicks = [10, 100, 1_000].map((regions) => federationRouterPickCost({ regions }))

  progress('scale 4/5: head handlers at 10^3-10^5 joined nodes (in process)')
  const telemetryApp = [1_000, 10_000, 100_000].map((nodes) => telemetryAppCost({ nodes }))
  // A gateway's direct-path report over 1,000 leased nodes, 100 and 1,000 records of each kind.
  const leaseApp = [
    await leaseAppCost({ nodes: 1_000, records: 100 }),
    await leaseAppCost({ nodes: 1_000, records: 1_000 }),
  ]
  const joinApp: JoinAppCost[] = []
  for (const nodes of [1_000, 10_000, 100_000]) joinApp.push(await joinAppCost({ nodes }))
  const replicasNsPerNode = (joinApp[2]!.replicasByModelUs.p50 * 1000) / joinApp[2]!.registryNodes

  progress('scale 5/5: the real head in its own process, 100 real nodes on loopback')
  const load = await measureHeadLoad({ nodes: 100, progress: (t) => progress(`  ${t}`) })
  progress(`  ${load.wallMs} ms`)

  const perHead = [10_000, 100_000].map((n) => headAt(n, load, picks, replicasNsPerNode))
  const limits = {
    connection_cap: defaultConnectionLimits.bootstrap.maxConnections,
    telemetry: Math.round((coreBudget * (telemetryIntervalMs * 1000)) / load.telemetry.cpuUsPerReport),
    memory: Math.round((memoryBudgetGiB * 1024 * 1024) / load.memoryKiBPerNode.rss),
    router: routerLimit(picks),
  }
  const refreshAt = (regions: number, routerNodes: number): Record<string, number> => {
    const nearest = load.refresh.reduce((a, b) =>
      Math.abs(b.routerNodes - routerNodes) < Math.abs(a.routerNodes - routerNodes) ? b : a,
    )
    const perSecond = regions / (defaultRefreshIntervalMs / 1000)
    return {
      regions,
      nodes_per_region: routerNodes,
      gateway_requests_per_s: round(perSecond, 1),
      gateway_core_share: round((perSecond * nearest.gatewayCpuMsPerRequest) / 1000, 3),
      gateway_bytes_in_per_s: Math.round(perSecond * nearest.responseBytes),
      head_core_share_per_gateway: round(nearest.headCpuMsPerRequest / defaultRefreshIntervalMs, 4),
    }
  }
  const federation = {
    refresh: [refreshAt(100, 1_000), refreshAt(1_000, 1_000), refreshAt(100, 100_000)],
    pick: regionPicks.map((p) => ({
      regions: p.regions,
      pick_us_p50: round(p.pickUs.p50),
      pick_us_p99: round(p.pickUs.p99),
    })),
    max_heads_per_discovery_round: defaultMaxHeadsPerRound,
  }

  // The direct path: the head carries no tokens, only the gateways' reports. A concurrent stream is
  // an in-flight entry in every report (4 a second; at worst one stream per node) and a done record
  // once per answer (a 300-token answer at 30 tokens/s lasts 10 s).
  const streamTokensPerSecond = 30
  const answerTokens = 300
  const recordsPerStreamPerSecond = 1000 / leaseReportIntervalMs + streamTokensPerSecond / answerTokens
  const headUsPerStreamSecond = recordsPerStreamPerSecond * load.direct.cpuUsPerRecord
  const telemetryUsPerNodeSecond = load.telemetry.cpuUsPerReport / (telemetryIntervalMs / 1000)
  const direct = {
    stream_tokens_per_s: streamTokensPerSecond,
    answer_tokens: answerTokens,
    head_cpu_us_per_lease_report_empty: round(load.direct.cpuUsPerEmptyReport, 1),
    head_cpu_us_per_lease_record: round(load.direct.cpuUsPerRecord, 2),
    // The handler alone (decode, LeaseDesk.exchange, encode), in process: the floor under the above.
    handler_us_per_lease_record: round(leaseApp[1]!.perRecordUs, 2),
    head_cpu_us_per_streamed_token: round(headUsPerStreamSecond / streamTokensPerSecond, 3),
    streams_per_core: Math.round(1e6 / headUsPerStreamSecond),
    telemetry_nodes_per_core: Math.round(1e6 / telemetryUsPerNodeSecond),
  }

  const result = {
    wall_s: Math.round((performance.now() - started) / 1000),
    caveat:
      'CPU figures come from a 2-core machine shared with other benchmarks and tests: read them as orders of magnitude',
    dht: {
      model:
        'bench/scale/kademlia.ts: kad-dht 16.4 tables (6-bit prefix trie, 20 per bucket) and queries (alpha 10, 10 disjoint paths)',
      kademlia,
      garage,
      validation,
    },
    router: { regional: picks, regional_all_measured: picksAllMeasured, federation: regionPicks },
    head: {
      load,
      telemetry_app: telemetryApp,
      lease_app: leaseApp,
      join_app: joinApp,
      replicas_by_model_ns_per_node: round(replicasNsPerNode, 1),
      per_head: perHead,
      nodes_per_head_limits: limits,
      direct,
    },
    federation,
  }
  const path = await writeResult('scale', result)

  const k = (servers: number, t: string) => kademlia.find((f) => f.servers === servers && f.table === t)!
  const rows: Array<[string, string, string]> = []
  for (const servers of [10_000, 100_000]) {
    const f = k(servers, 'trie')
    const c = k(servers, 'classic')
    rows.push([
      `dht ${servers}: hops mean/p99`,
      `${round(f.hops.mean)}/${f.hops.p99}`,
      `classic α3 ${round(c.hops.mean)}/${c.hops.p99}; log2N/log2k ${round(f.theoryHops)}`,
    ])
    rows.push([
      `dht ${servers}: first provider p50/p99 ms`,
      `${Math.round(f.timeToFirstMs.p50)}/${Math.round(f.timeToFirstMs.p99)}`,
      `warm ${Math.round(f.timeToFirstWarmMs.p50)}; found ${round(f.foundShare * 100, 1)}%`,
    ])
    rows.push([
      `dht ${servers}: requests per lookup`,
      String(Math.round(f.messages.mean)),
      `classic ${Math.round(c.messages.mean)}`,
    ])
  }
  for (const g of garage) {
    rows.push([
      `garage ${g.servers} servers: fresh node requests`,
      `${round(g.selfQueryMessages.mean, 1)}+${round(g.regionLookupMessages.mean, 1)}`,
      `conns kept ${round(g.connectionsPerNode.mean, 1)}; servers full at ${g.nodesAtServerConnectionCap} nodes; busiest server in ${round(g.busiestServerShare * 100)}% of lookups`,
    ])
  }
  for (const v of validation) {
    rows.push([
      `validation k ${v.table.kBucketSize}: real/model hops`,
      `${round(v.real.hops.mean)}/${round(v.model.hops.mean)}`,
      `requests ${round(v.real.messages.mean, 1)}/${round(v.model.messages.mean, 1)}; found ${round(v.real.foundShare * 100)}%/${round(v.model.foundShare * 100)}%`,
    ])
  }
  for (const p of picks) {
    rows.push([
      `router pick ${p.nodes} nodes p50/p99 µs`,
      `${round(p.pickUs.p50, 1)}/${round(p.pickUs.p99, 1)}`,
      `${p.demandPicksPerSecond}/s demand → ${round(p.coreShareAtDemand)} cores`,
    ])
  }
  for (const p of regionPicks) {
    rows.push([`federation pick ${p.regions} regions p50 µs`, String(round(p.pickUs.p50, 1)), ''])
  }
  rows.push([
    'head cpu per telemetry report µs',
    String(Math.round(load.telemetry.cpuUsPerReport)),
    `handler alone ${round(telemetryApp[2]!.perReportUs.p50, 1)}`,
  ])
  rows.push([
    'head cpu per connection / join ms',
    `${round(load.connectCpuMsPerNode)}/${round(load.joinCpuMsPerJoin)}`,
    '',
  ])
  rows.push([
    'direct path: head cpu per streamed token µs',
    String(direct.head_cpu_us_per_streamed_token),
    `${direct.head_cpu_us_per_lease_record} per report record, ${direct.head_cpu_us_per_lease_report_empty} per empty report`,
  ])
  rows.push(['direct path: 30 tok/s streams per head core', String(direct.streams_per_core), '>= 5000'])
  rows.push(['telemetry: nodes per head core (warm)', String(direct.telemetry_nodes_per_core), '>= 20000'])
  rows.push(['head rss per node KiB', String(Math.round(load.memoryKiBPerNode.rss)), ''])
  rows.push(['head cpu per GET_PROVIDERS µs', String(Math.round(load.dht.cpuUsPerRequest)), ''])
  rows.push([
    'nodes per head: cap/telemetry/memory/router',
    `${limits.connection_cap}/${limits.telemetry}/${limits.memory}/${limits.router}`,
    `at ${coreBudget * 100}% of a core, ${memoryBudgetGiB} GiB`,
  ])
  process.stdout.write(
    `\nscale: discovery and routing at 10^4 and 10^5 nodes (${result.wall_s} s)\n${table(rows)}\n` +
      `${result.caveat}; written to ${path}\n`,
  )
  return result
}
