/**
 * npm run bench [-- name...]: runs the named benchmarks (default: all), each writing
 * bench/results/NAME.json, then the report of this run: bench/results/summary.json and SUMMARY.md.
 */
import { mkdir, writeFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { resultsDir } from './report.ts'
import {
  type BenchLoader,
  describeMachine,
  gitCommit,
  loadAverage,
  moduleLoader,
  runBenchmarks,
} from './runner.ts'
import { benchNames, buildSummary, renderMarkdown } from './summary.ts'

const loaders: Record<string, BenchLoader> = Object.fromEntries(
  benchNames.map((name) => [name, moduleLoader(new URL(`./${name}.ts`, import.meta.url))]),
)

const wanted = [...new Set(process.argv.slice(2))]
const unknown = wanted.filter((w) => loaders[w] == null)
if (unknown.length > 0) {
  process.stderr.write(`unknown benchmark(s): ${unknown.join(', ')}; known: ${benchNames.join(', ')}\n`)
  process.exit(2)
}
const names = wanted.length > 0 ? wanted : [...benchNames]

const date = new Date().toISOString()
const startedMs = performance.now()
const machine = await describeMachine()
const outcomes = await runBenchmarks(names, loaders)
machine.load_average_end = loadAverage()

const summary = buildSummary(
  {
    date,
    command: ['npm run bench', ...(wanted.length > 0 ? ['--', ...wanted] : [])].join(' '),
    durationMs: performance.now() - startedMs,
    commit: await gitCommit(fileURLToPath(new URL('..', import.meta.url))),
    machine,
  },
  outcomes,
)
const markdown = renderMarkdown(summary)
await mkdir(resultsDir, { recursive: true })
await writeFile(new URL('summary.json', resultsDir), `${JSON.stringify(summary, null, 2)}\n`)
await writeFile(new URL('SUMMARY.md', resultsDir), markdown)
process.stdout.write(`\n${markdown}\nwritten to ${fileURLToPath(new URL('SUMMARY.md', resultsDir))}\n`)
// Exit explicitly: a benchmark's libp2p or HTTP handles must not keep the process up.
process.exit(summary.ok ? 0 : 1)
