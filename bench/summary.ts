import { formatDuration } from './report.ts'

/**
 * One report for `npm run bench`: every figure the benchmarks return beside the goal its issue set,
 * the direct-vs-proxied pairs each benchmark measures in the same run, the machine and the run.
 */

/** Every benchmark `npm run bench` knows, in the order it runs them. */
export const benchNames = [
  'mesh',
  'engine',
  'mesh-proxy',
  'gateway',
  'footprint',
  'scale',
  'integrity',
] as const

const descriptions: Record<string, string> = {
  integrity:
    'Result integrity: cheating nodes (another seed, a smaller model, random text, cheating on 20 %) and honest ones under mixed traffic; requests until quarantine, false positives, the re-scoring cost.',
  mesh: "Time from a node's start to its chosen region, 100 nodes joining a two-region mesh on loopback.",
  engine:
    'The embedded engine over HTTP (its own process) against node-llama-cpp in-process, same model and threads.',
  'mesh-proxy':
    'One-token completions straight to an engine against client → head → libp2p → node → engine, beside two nginx hops in a row, warm (cold figures apart); then streamed tokens/s.',
  gateway:
    'One-token completions straight to an engine against federation → node → engine (the direct path) and federation → head → node → engine (each a process), beside nginx chains of as many hops; warm, with cold figures apart.',
  footprint:
    'An idle joined `garage node` (engine excluded), and the time from a game starting to the model released.',
  scale:
    'The scale argument (docs/scale.md): kad-dht lookups modelled at 10^4 and 10^5 servers and checked against real nodes, the real routers timed per pick, the cost per node of the real head.',
}

/**
 * A benchmark's goal as its issue states it. `metric` is a path in the object the benchmark's run()
 * returns: dots for keys, `[key=value]` to pick the row of an array whose `key` equals `value`.
 */
export interface Goal {
  bench: string
  metric: string
  op: '<=' | '>='
  threshold: number
  issue: number
  /** The issue's own words for this goal. */
  says: string
}

const engineSays = '`ratio` (HTTP engine over node-llama-cpp called in-process) ≥ 0.9 at every concurrency'

export const goals: readonly Goal[] = [
  {
    bench: 'integrity',
    metric: 'requests_to_quarantine_max',
    op: '<=',
    threshold: 100,
    issue: 19,
    says: '`requests_to_quarantine_max` ≤ 100 at the default sampling rate (median over simulated cheat nodes, per kind)',
  },
  {
    bench: 'integrity',
    metric: 'false_positives_per_10k',
    op: '<=',
    threshold: 0,
    issue: 19,
    says: '`false_positives_per_10k` = 0 (honest nodes quarantined per 10,000 of their requests)',
  },
  {
    bench: 'integrity',
    metric: 'verification_cost_ratio',
    op: '<=',
    threshold: 0.05,
    issue: 19,
    says: "`verification_cost_ratio` ≤ 0.05 (the scoring pass's wall-clock over the generation's, per checked answer)",
  },
  {
    bench: 'mesh',
    metric: 'discovery_ms_p50',
    op: '<=',
    threshold: 1000,
    issue: 2,
    says: '`discovery_ms_p50` ≤ 1000 with 100 nodes',
  },
  ...[1, 4, 8].map(
    (c): Goal => ({
      bench: 'engine',
      metric: `results[concurrency=${c}].ratio`,
      op: '>=',
      threshold: 0.9,
      issue: 4,
      says: engineSays,
    }),
  ),
  ...[1, 4].map(
    (c): Goal => ({
      bench: 'engine',
      metric: `structured[concurrency=${c}].constrained_tokens_per_s_ratio`,
      op: '>=',
      threshold: 0.8,
      issue: 15,
      says: '`constrained_tokens_per_s_ratio` ≥ 0.8 (a json_schema request beside unconstrained generation of the same length)',
    }),
  ),
  ...(
    [
      ['mesh-proxy', 'latency[concurrency=16]', 'through head and node, c=16, against 2 nginx hops'],
      [
        'gateway',
        'results[concurrency=32]',
        'federation → node (the direct path), c=32, against 2 nginx hops',
      ],
    ] as const
  ).flatMap(([bench, row, what]): Goal[] => [
    {
      bench,
      metric: `${row}.p50_budget_ratio`,
      op: '<=',
      threshold: 1,
      issue: 18,
      says: `added p50 ≤ 2 × the same-run nginx chain's added p50 + 0.5 ms, warm (${what}); the ratio is added over that allowance`,
    },
    {
      bench,
      metric: `${row}.p99_budget_ratio`,
      op: '<=',
      threshold: 1,
      issue: 18,
      says: `added p99 ≤ 2 × the same-run nginx chain's added p99 + 2 ms, warm (${what}); the ratio is added over that allowance`,
    },
    {
      bench,
      metric: 'stream_tokens_per_s_ratio',
      op: '>=',
      threshold: 0.95,
      issue: 18,
      says: '`stream_tokens_per_s_ratio` (tokens/s streamed through Garage over streamed directly) ≥ 0.95',
    },
  ]),
  {
    bench: 'gateway',
    metric: 'results[concurrency=32].rps_vs_nginx_chain',
    op: '>=',
    threshold: 0.8,
    issue: 18,
    says: '`federation_rps` ≥ 0.8 × `nginx_chain_rps` (concurrency 32, warm), all processes sharing this 2-core machine',
  },
  {
    bench: 'scale',
    metric: 'head.direct.streams_per_core',
    op: '>=',
    threshold: 5_000,
    issue: 18,
    says: 'one head core carries ≥ 5,000 concurrent 30 tokens/s streams on the direct path',
  },
  {
    bench: 'scale',
    metric: 'head.direct.telemetry_nodes_per_core',
    op: '>=',
    threshold: 20_000,
    issue: 18,
    says: "one head core carries ≥ 20,000 nodes' telemetry",
  },
  {
    bench: 'gateway',
    metric: 'postgres_rps_ratio',
    op: '>=',
    threshold: 0.9,
    issue: 20,
    says: '`postgres_rps_ratio` (the gateway on PostgreSQL over the gateway on SQLite, same path, concurrency 32) ≥ 0.9',
  },
  {
    bench: 'gateway',
    metric: 'postgres_added_p50_ms',
    op: '<=',
    threshold: 1,
    issue: 20,
    says: 'the PostgreSQL store adds ≤ 1 ms p50 (concurrency 1, against the same gateway on SQLite)',
  },
  {
    bench: 'footprint',
    metric: 'idle_rss_mb',
    op: '<=',
    threshold: 150,
    issue: 7,
    says: '`idle_rss_mb` ≤ 150 for a joined node daemon that serves nothing (engine process excluded)',
  },
  {
    bench: 'footprint',
    metric: 'idle_cpu_percent',
    op: '<=',
    threshold: 1,
    issue: 7,
    says: '`idle_cpu_percent` ≤ 1 for a joined node daemon that serves nothing, over 60 s',
  },
  {
    bench: 'footprint',
    metric: 'pause_to_gpu_free_ms_p50',
    op: '<=',
    threshold: 2000,
    issue: 7,
    says: '`pause_to_gpu_free_ms_p50` ≤ 2000 over 10 game starts',
  },
]

/** Two paths measured side by side in one run: `measured` is the proxied or loaded one. */
export interface SideBySide {
  bench: string
  label: string
  /** A cost (latency, hops: shown as the amount added and the ratio) or a rate (shown as the ratio). */
  kind: 'cost' | 'rate'
  baseline: { name: string; metric: string }
  measured: { name: string; metric: string }
  /** The benchmark's own ratio (a median of paired rounds) when it computes one. */
  ratioMetric?: string
}

const latencyPairs = (
  bench: string,
  rows: string,
  concurrencies: number[],
  measured: { name: string; prefix: string },
): SideBySide[] =>
  concurrencies.flatMap((c) =>
    (['p50', 'p99'] as const).map(
      (p): SideBySide => ({
        bench,
        label: `c=${c} latency ${p}, ms`,
        kind: 'cost',
        baseline: { name: 'direct', metric: `${rows}[concurrency=${c}].direct_${p}_ms` },
        measured: { name: measured.name, metric: `${rows}[concurrency=${c}].${measured.prefix}_${p}_ms` },
      }),
    ),
  )

export const sideBySide: readonly SideBySide[] = [
  {
    bench: 'mesh',
    label: 'discovery p50, ms: one node alone vs 10 at a time into 100',
    kind: 'cost',
    baseline: { name: 'alone', metric: 'discovery_ms_p50_solo' },
    measured: { name: '100 nodes', metric: 'discovery_ms_p50' },
    ratioMetric: 'discovery_p50_ratio_vs_solo',
  },
  {
    bench: 'mesh',
    label: 'discovery p50, ms: one node alone vs one at a time into the full mesh',
    kind: 'cost',
    baseline: { name: 'alone', metric: 'discovery_ms_p50_solo' },
    measured: { name: 'full mesh', metric: 'discovery_ms_p50_one_at_a_time_at_full_mesh' },
    ratioMetric: 'discovery_p50_ratio_full_mesh_vs_solo',
  },
  ...[1, 4, 8].map(
    (c): SideBySide => ({
      bench: 'engine',
      label: `c=${c} tokens/s`,
      kind: 'rate',
      baseline: { name: 'in-process', metric: `results[concurrency=${c}].inprocess_tokens_per_s` },
      measured: { name: 'HTTP', metric: `results[concurrency=${c}].http_tokens_per_s` },
      ratioMetric: `results[concurrency=${c}].ratio`,
    }),
  ),
  ...[1, 4].map(
    (c): SideBySide => ({
      bench: 'engine',
      label: `c=${c} structured output tokens/s`,
      kind: 'rate',
      baseline: { name: 'free', metric: `structured[concurrency=${c}].unconstrained_tokens_per_s` },
      measured: { name: 'json_schema', metric: `structured[concurrency=${c}].constrained_tokens_per_s` },
      ratioMetric: `structured[concurrency=${c}].constrained_tokens_per_s_ratio`,
    }),
  ),
  ...latencyPairs('mesh-proxy', 'latency', [1, 16], { name: 'via head', prefix: 'via_head' }),
  {
    bench: 'mesh-proxy',
    label: 'streamed tokens/s',
    kind: 'rate',
    baseline: { name: 'direct', metric: 'stream.direct_tokens_per_s' },
    measured: { name: 'via head', metric: 'stream.via_head_tokens_per_s' },
    ratioMetric: 'stream_tokens_per_s_ratio',
  },
  ...latencyPairs('gateway', 'results', [1, 32], { name: 'federation', prefix: 'federation' }),
  ...[1, 32].map(
    (c): SideBySide => ({
      bench: 'gateway',
      label: `c=${c} requests/s`,
      kind: 'rate',
      baseline: { name: 'direct', metric: `results[concurrency=${c}].direct_rps` },
      measured: { name: 'federation', metric: `results[concurrency=${c}].federation_rps` },
      ratioMetric: `results[concurrency=${c}].rps_ratio`,
    }),
  ),
  ...[1, 32].map(
    (c): SideBySide => ({
      bench: 'gateway',
      label: `c=${c} latency p50, ms (one plain nginx hop)`,
      kind: 'cost',
      baseline: { name: 'direct', metric: `results[concurrency=${c}].direct_p50_ms` },
      measured: { name: 'nginx', metric: `results[concurrency=${c}].nginx_p50_ms` },
    }),
  ),
  // Like with like: Garage's path against as many plain nginx hops as it has, in the same run.
  ...(
    [
      ['mesh-proxy', 'latency', 16, 'via head', 2],
      ['gateway', 'results', 32, 'federation', 2],
    ] as const
  ).flatMap(([bench, rows, c, name, hops]) =>
    (['p50', 'p99'] as const).map(
      (p): SideBySide => ({
        bench,
        label: `c=${c} added ${p}, ms: ${hops} plain nginx hops vs Garage's ${hops} hops`,
        kind: 'cost',
        baseline: { name: `nginx ×${hops}`, metric: `${rows}[concurrency=${c}].nginx_chain_added_${p}_ms` },
        measured: { name, metric: `${rows}[concurrency=${c}].added_${p}_ms` },
      }),
    ),
  ),
  ...(['hops', 'messages'] as const).map(
    (figure): SideBySide => ({
      bench: 'scale',
      label: `DHT lookup ${figure}, mean: real kad-dht nodes vs the model, same network`,
      kind: 'cost',
      baseline: { name: 'real', metric: `dht.validation.real.${figure}.mean` },
      measured: { name: 'model', metric: `dht.validation.model.${figure}.mean` },
    }),
  ),
]

/**
 * For a benchmark that returns hundreds of figures, the ones SUMMARY.md shows (path prefixes); goal
 * figures always show, and summary.json keeps every figure.
 */
export const headlineMetrics: Record<string, string[]> = {
  scale: [
    ...[10_000, 100_000].flatMap((n) =>
      ['hops.mean', 'hops.p99', 'timeToFirstMs.p50', 'timeToFirstMs.p99', 'messages.p50'].map(
        (f) => `dht.kademlia[servers=${n},table=trie].${f}`,
      ),
    ),
    ...[10_000, 100_000].flatMap((n) => ['p50', 'p99'].map((p) => `router.regional[nodes=${n}].pickUs.${p}`)),
    ...[10_000, 100_000].flatMap((n) =>
      ['telemetry_core_share', 'router_core_share', 'memory_mib'].map(
        (f) => `head.per_head[nodes=${n}].${f}`,
      ),
    ),
    'head.nodes_per_head_limits',
    'head.direct',
    'federation.pick[regions=1000].pick_us_p50',
  ],
}

function underPrefix(metric: string, prefixes: string[]): boolean {
  return prefixes.some((p) => metric === p || metric.startsWith(`${p}.`))
}

/** Figures that describe how a benchmark was set up rather than what it measured (path prefixes). */
const setupMetrics: Record<string, string[]> = {
  mesh: ['nodes', 'wave'],
  engine: ['model', 'threads', 'max_tokens', 'rounds'],
  'mesh-proxy': ['stream.max_tokens'],
  footprint: ['idle_seconds'],
}

/** Keys of a result that are not figures: writeResult's envelope and the bench's own goal verdict. */
const envelopeKeys = new Set(['benchmark', 'date', 'machine', 'goal', 'goal_met'])

export const noiseNote =
  'These machines are shared and noisy (other jobs run beside the benchmarks): absolute figures move ' +
  'from run to run. The side-by-side pairs were measured in the same run, alternating, so their ratios hold better.'

export interface Machine {
  cpus: number
  cpu_model: string
  memory_gb: number
  node: string
  os: string
  /** 1, 5 and 15 minute load averages. */
  load_average_start: number[]
  load_average_end: number[]
}

export interface RunInfo {
  date: string
  command: string
  durationMs: number
  commit: { sha: string; dirty: boolean } | null
  machine: Machine
}

export interface BenchOutcome {
  status: 'ok' | 'error'
  durationMs: number
  result?: Record<string, unknown>
  error?: string
}

export type FigureStatus = 'met' | 'missed' | 'no goal' | 'no value'

export interface Figure {
  metric: string
  value: unknown
  goal: { op: Goal['op']; threshold: number; issue: number; says: string } | null
  status: FigureStatus
}

export interface Comparison {
  label: string
  kind: SideBySide['kind']
  baseline: { name: string; value: number }
  measured: { name: string; value: number }
  ratio: number
  difference: number
}

export type BenchSummary =
  | { status: 'not run' }
  | {
      status: 'ok' | 'error'
      duration_ms: number
      error?: string
      setup: Record<string, unknown>
      figures: Figure[]
      notes: Record<string, string>
      side_by_side: Comparison[]
    }

export interface MissedGoal {
  bench: string
  metric: string
  value: unknown
  goal: string
  issue: number
}

export interface Summary {
  date: string
  commit: RunInfo['commit']
  command: string
  duration_ms: number
  machine: Machine
  noise_note: string
  ran: string[]
  not_run: string[]
  ok: boolean
  missed_goals: MissedGoal[]
  errors: Array<{ bench: string; error: string }>
  benchmarks: Record<string, BenchSummary>
}

const segmentPattern = /^([^[\]]+)(?:\[([^\]]+)\])?$/

/** True when `row` is an object whose fields match `selector`: `key=value,key=value`. */
function rowMatches(row: unknown, selector: string): boolean {
  if (row == null || typeof row !== 'object') return false
  return selector.split(',').every((condition) => {
    const [key, wanted] = condition.split('=')
    return String((row as Record<string, unknown>)[key!]) === wanted
  })
}

/** The value at `path` in a benchmark's result, or undefined (see Goal.metric for the syntax). */
export function metricValue(result: unknown, path: string): unknown {
  let current = result
  for (const segment of path.split('.')) {
    const m = segmentPattern.exec(segment)
    if (m == null || current == null || typeof current !== 'object') return undefined
    current = (current as Record<string, unknown>)[m[1]!]
    const selector = m[2]
    if (selector == null) continue
    if (!Array.isArray(current)) return undefined
    current = selector.includes('=')
      ? current.find((row) => rowMatches(row, selector))
      : current[Number(selector)]
  }
  return current
}

const maxRowKeyFields = 3

/**
 * The fewest leading fields that tell an array's rows apart: the first (a number or a string), then
 * labels (strings) after it, as in `concurrency` or `servers,table`. A number past the first is a
 * measurement, not a name. Null when no such fields exist: rows are then named by index.
 */
function rowKeyFields(rows: unknown[]): string[] | null {
  if (!rows.every((r) => r != null && typeof r === 'object' && !Array.isArray(r))) return null
  const entries = rows.map((r) => Object.entries(r as object))
  for (let n = 1; n <= maxRowKeyFields; n++) {
    const fields = entries[0]!.slice(0, n).map(([k]) => k)
    if (fields.length < n) return null
    const shared = entries.every((e) =>
      fields.every(
        (f, i) =>
          e[i]?.[0] === f && (typeof e[i]?.[1] === 'string' || (i === 0 && typeof e[i]?.[1] === 'number')),
      ),
    )
    if (!shared) return null
    const ids = entries.map((e) => JSON.stringify(e.slice(0, n).map(([, v]) => v)))
    if (new Set(ids).size === ids.length) return fields
  }
  return null
}

/** Numbers and booleans become figures, strings notes; nested objects and arrays of rows are walked. */
function flatten(
  value: unknown,
  path: string,
  figures: Map<string, unknown>,
  notes: Record<string, string>,
): void {
  if (value == null) return
  if (typeof value === 'string') {
    notes[path] = value
  } else if (typeof value !== 'object') {
    figures.set(path, value)
  } else if (Array.isArray(value)) {
    if (value.every((v) => v == null || typeof v !== 'object')) {
      figures.set(path, value)
      return
    }
    const keyFields = rowKeyFields(value)
    value.forEach((row, i) => {
      if (keyFields == null) {
        flatten(row, `${path}[${i}]`, figures, notes)
        return
      }
      const entries = Object.entries(row as object)
      const name = entries
        .slice(0, keyFields.length)
        .map(([k, v]) => `${k}=${v}`)
        .join(',')
      flatten(Object.fromEntries(entries.slice(keyFields.length)), `${path}[${name}]`, figures, notes)
    })
  } else {
    for (const [key, v] of Object.entries(value))
      flatten(v, path === '' ? key : `${path}.${key}`, figures, notes)
  }
}

function meets(value: number, goal: Goal): boolean {
  return goal.op === '<=' ? value <= goal.threshold : value >= goal.threshold
}

function round(value: number, digits: number): number {
  return Number(value.toFixed(digits))
}

function summarizeBench(name: string, outcome: BenchOutcome): BenchSummary {
  const result = outcome.result ?? {}
  const all = new Map<string, unknown>()
  const notes: Record<string, string> = {}
  for (const [key, value] of Object.entries(result))
    if (!envelopeKeys.has(key)) flatten(value, key, all, notes)
  const setup: Record<string, unknown> = {}
  const prefixes = setupMetrics[name] ?? []
  for (const [metric, value] of all) {
    if (underPrefix(metric, prefixes)) {
      setup[metric] = value
      all.delete(metric)
    }
  }
  const benchGoals = goals.filter((g) => g.bench === name)
  // A goal whose metric the result lacks still gets its row: the report must show it was not measured.
  for (const goal of benchGoals) if (!all.has(goal.metric)) all.set(goal.metric, null)
  const figures = [...all].map(([metric, value]): Figure => {
    const goal = benchGoals.find((g) => g.metric === metric)
    if (goal == null) return { metric, value, goal: null, status: 'no goal' }
    const { op, threshold, issue, says } = goal
    const status = typeof value !== 'number' ? 'no value' : meets(value, goal) ? 'met' : 'missed'
    return { metric, value, goal: { op, threshold, issue, says }, status }
  })
  const comparisons = sideBySide
    .filter((s) => s.bench === name)
    .flatMap((s): Comparison[] => {
      const baseline = metricValue(result, s.baseline.metric)
      const measured = metricValue(result, s.measured.metric)
      if (typeof baseline !== 'number' || typeof measured !== 'number') return []
      const own = s.ratioMetric == null ? undefined : metricValue(result, s.ratioMetric)
      return [
        {
          label: s.label,
          kind: s.kind,
          baseline: { name: s.baseline.name, value: baseline },
          measured: { name: s.measured.name, value: measured },
          ratio: typeof own === 'number' ? own : round(measured / baseline, 3),
          difference: round(measured - baseline, 2),
        },
      ]
    })
  return {
    status: outcome.status,
    duration_ms: Math.round(outcome.durationMs),
    ...(outcome.error != null ? { error: outcome.error } : {}),
    setup,
    figures: outcome.result == null ? [] : figures,
    notes,
    side_by_side: comparisons,
  }
}

export function goalText(goal: { op: Goal['op']; threshold: number }): string {
  return `${goal.op === '<=' ? '≤' : '≥'} ${goal.threshold}`
}

export function buildSummary(
  run: RunInfo,
  outcomes: Record<string, BenchOutcome>,
  benches: readonly string[] = benchNames,
): Summary {
  const benchmarks: Record<string, BenchSummary> = {}
  const missed: MissedGoal[] = []
  const errors: Array<{ bench: string; error: string }> = []
  for (const name of benches) {
    const outcome = outcomes[name]
    if (outcome == null) {
      benchmarks[name] = { status: 'not run' }
      continue
    }
    const bench = summarizeBench(name, outcome)
    benchmarks[name] = bench
    if (bench.status === 'not run') continue
    if (bench.error != null) errors.push({ bench: name, error: bench.error })
    for (const f of bench.figures) {
      if (f.goal == null || (f.status !== 'missed' && f.status !== 'no value')) continue
      missed.push({
        bench: name,
        metric: f.metric,
        value: f.value,
        goal: goalText(f.goal),
        issue: f.goal.issue,
      })
    }
  }
  return {
    date: run.date,
    commit: run.commit,
    command: run.command,
    duration_ms: Math.round(run.durationMs),
    machine: run.machine,
    noise_note: noiseNote,
    ran: benches.filter((b) => outcomes[b] != null),
    not_run: benches.filter((b) => outcomes[b] == null),
    ok: errors.length === 0,
    missed_goals: missed,
    errors,
    benchmarks,
  }
}

/** A markdown table padded to line up in a terminal too. */
function markdownTable(header: string[], rows: string[][]): string {
  const escapeCell = (cell: string): string => cell.replaceAll('|', '\\|')
  const all = [header, ...rows].map((r) => r.map(escapeCell))
  const widths = header.map((_, i) => Math.max(3, ...all.map((r) => r[i]!.length)))
  const line = (r: string[]): string => `| ${r.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`
  return [line(all[0]!), line(widths.map((w) => '-'.repeat(w))), ...all.slice(1).map(line)].join('\n')
}

/** Five significant digits at most: the JSON keeps full precision, the table stays readable. */
function show(value: unknown): string {
  if (value == null) return '—'
  if (Array.isArray(value)) return value.map(show).join(', ')
  if (typeof value !== 'number' || Number.isInteger(value)) return String(value)
  return String(Math.abs(value) >= 10_000 ? Math.round(value) : Number(value.toPrecision(5)))
}

function statusText(status: FigureStatus): string {
  return status === 'missed' ? 'MISSED' : status === 'no value' ? 'NO VALUE' : status
}

function comparisonText(c: Comparison): string {
  if (c.kind === 'rate') return `×${show(c.ratio)}`
  return `${c.difference >= 0 ? '+' : ''}${show(c.difference)} (×${show(c.ratio)})`
}

function machineText(m: Machine): string {
  return `${m.cpus} × ${m.cpu_model}, ${m.memory_gb} GiB, Node ${m.node}, ${m.os}`
}

export function renderMarkdown(s: Summary): string {
  const out: string[] = ['# Garage benchmarks', '']
  const commit =
    s.commit == null
      ? 'unknown'
      : `${s.commit.sha.slice(0, 12)}${s.commit.dirty ? ' (with uncommitted changes)' : ''}`
  out.push(
    `- date: ${s.date}`,
    `- commit: ${commit}`,
    `- command: \`${s.command}\` (${formatDuration(s.duration_ms)})`,
    `- machine: ${machineText(s.machine)}`,
    `- load average (1, 5, 15 min): ${show(s.machine.load_average_start)} at start; ${show(s.machine.load_average_end)} at end`,
    `- ran: ${s.ran.length > 0 ? s.ran.join(', ') : 'none'}; not run: ${s.not_run.length > 0 ? s.not_run.join(', ') : 'none'}`,
    '',
    `> ${s.noise_note}`,
    '',
    '## Missed goals',
    '',
  )
  if (s.missed_goals.length === 0) out.push('None among the benchmarks that ran.')
  for (const m of s.missed_goals) {
    out.push(`- ${m.bench}: \`${m.metric}\` = ${show(m.value)}, goal ${m.goal} (issue ${m.issue})`)
  }
  if (s.errors.length > 0) {
    out.push('', '## Errors', '')
    for (const e of s.errors) out.push(`- ${e.bench}: ${e.error}`)
  }
  out.push('', '## Overview', '')
  out.push(
    markdownTable(
      ['benchmark', 'status', 'duration', 'goals met'],
      Object.entries(s.benchmarks).map(([name, b]) => {
        if (b.status === 'not run') return [name, 'not run', '—', '—']
        const withGoal = b.figures.filter((f) => f.goal != null)
        const met = withGoal.filter((f) => f.status === 'met').length
        return [
          name,
          b.status === 'ok' ? 'ok' : 'ERROR',
          formatDuration(b.duration_ms),
          b.figures.length === 0 ? '—' : withGoal.length === 0 ? 'no goals' : `${met}/${withGoal.length}`,
        ]
      }),
    ),
  )
  for (const [name, b] of Object.entries(s.benchmarks)) {
    out.push('', `## ${name}`, '')
    if (descriptions[name] != null) out.push(descriptions[name], '')
    if (b.status === 'not run') {
      out.push('Not run in this run.')
      continue
    }
    out.push(`Took ${formatDuration(b.duration_ms)}.`)
    if (b.error != null) out.push('', `**Error:** ${b.error}`)
    const setup = Object.entries(b.setup)
    if (setup.length > 0) out.push('', `Setup: ${setup.map(([k, v]) => `${k} ${show(v)}`).join(', ')}.`)
    const headlines = headlineMetrics[name]
    const shown = b.figures.filter((f) => f.goal != null || underPrefix(f.metric, headlines ?? []))
    // Every figure when the headlines match none: the benchmark's output changed shape.
    const figures = headlines != null && shown.length > 0 ? shown : b.figures
    if (figures.length < b.figures.length) {
      out.push(
        '',
        `The headline figures: ${figures.length} of ${b.figures.length}; every one is in bench/results/summary.json and bench/results/${name}.json.`,
      )
    }
    if (figures.length > 0) {
      out.push(
        '',
        markdownTable(
          ['metric', 'value', 'goal', 'status'],
          figures.map((f) => [
            f.metric,
            show(f.value),
            f.goal == null ? '' : `${goalText(f.goal)} (issue ${f.goal.issue})`,
            statusText(f.status),
          ]),
        ),
      )
    }
    if (b.side_by_side.length > 0) {
      out.push(
        '',
        'Side by side in this run:',
        '',
        markdownTable(
          ['pair', 'baseline', 'measured', 'measured vs baseline'],
          b.side_by_side.map((c) => [
            c.label,
            `${c.baseline.name} ${show(c.baseline.value)}`,
            `${c.measured.name} ${show(c.measured.value)}`,
            comparisonText(c),
          ]),
        ),
      )
    }
    for (const [key, note] of Object.entries(b.notes)) out.push('', `${key}: ${note}`)
  }
  return `${out.join('\n')}\n`
}
