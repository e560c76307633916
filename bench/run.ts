/** npm run bench [-- name...]: runs the named benchmarks (default: all) and writes bench/results/. */
import { progress } from './report.ts'

const benchmarks: Record<string, () => Promise<{ run: () => Promise<Record<string, unknown>> }>> = {
  mesh: () => import('./mesh.ts'),
  engine: () => import('./engine.ts'),
  'mesh-proxy': () => import('./mesh-proxy.ts'),
  gateway: () => import('./gateway.ts'),
  footprint: () => import('./footprint.ts'),
}

const wanted = process.argv.slice(2)
const unknown = wanted.filter((w) => benchmarks[w] == null)
if (unknown.length > 0) {
  process.stderr.write(
    `unknown benchmark(s): ${unknown.join(', ')}; known: ${Object.keys(benchmarks).join(', ')}\n`,
  )
  process.exit(2)
}
for (const name of wanted.length > 0 ? wanted : Object.keys(benchmarks)) {
  progress(`running ${name}`)
  await (await benchmarks[name]!()).run()
}
process.exit(0)
