import { execFile } from 'node:child_process'
import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { cpus, loadavg, type as osType, release, totalmem } from 'node:os'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { formatDuration, msSinceProgress, progress, setProgressStage } from './report.ts'
import type { BenchOutcome, Machine, RunInfo } from './summary.ts'

export type BenchRun = () => Promise<Record<string, unknown>>
export type BenchLoader = () => Promise<BenchRun>

/** A benchmark the runner knows whose module is not in this tree (yet). */
export class BenchNotBuiltError extends Error {
  static override name = 'BenchNotBuiltError'
  override name = 'BenchNotBuiltError'
}

/** Loads a bench module and its `run` export, saying plainly when either is missing. */
export function moduleLoader(url: URL): BenchLoader {
  const path = fileURLToPath(url)
  return async () => {
    if (!existsSync(path))
      throw new BenchNotBuiltError(`${path} does not exist: this benchmark is not built yet`)
    const module = (await import(url.href)) as { run?: unknown }
    if (typeof module.run !== 'function') throw new BenchNotBuiltError(`${path} does not export run()`)
    return module.run as BenchRun
  }
}

const heartbeatAfterMs = 30_000

function describe(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error)
}

/**
 * Runs the named benchmarks one after another. One that throws, or leaves an error nobody catches,
 * is recorded against its name and the next one still runs.
 */
export async function runBenchmarks(
  names: readonly string[],
  loaders: Record<string, BenchLoader>,
): Promise<Record<string, BenchOutcome>> {
  const outcomes: Record<string, BenchOutcome> = {}
  const runStartedMs = performance.now()
  let current: string | null = null
  const stray: string[] = []
  // A rejection a bench forgot to await must fail that bench, not the whole run (Node exits on one).
  const onStray = (error: unknown): void => {
    stray.push(describe(error))
    progress(`error nobody caught during ${current ?? 'the run'}: ${describe(error)}`)
  }
  process.on('unhandledRejection', onStray)
  process.on('uncaughtException', onStray)
  const heartbeat = setInterval(() => {
    if (current != null && msSinceProgress() >= heartbeatAfterMs) progress(`${current} still running`)
  }, 5_000).unref()
  try {
    for (const [i, name] of names.entries()) {
      current = name
      stray.length = 0
      const startedMs = performance.now()
      setProgressStage({ label: `${i + 1}/${names.length} ${name}`, startedMs, runStartedMs })
      progress(`starting ${name}`)
      try {
        const loader = loaders[name]
        if (loader == null) throw new BenchNotBuiltError(`no benchmark named ${name}`)
        const result = await (await loader())()
        outcomes[name] = { status: 'ok', durationMs: performance.now() - startedMs, result }
      } catch (error) {
        outcomes[name] = {
          status: 'error',
          durationMs: performance.now() - startedMs,
          error: describe(error),
        }
        if (!(error instanceof BenchNotBuiltError))
          process.stderr.write(`${(error as Error)?.stack ?? error}\n`)
      }
      // Let errors from the bench's last turn surface before its outcome is settled.
      await new Promise((resolve) => setImmediate(resolve))
      const outcome = outcomes[name]!
      if (stray.length > 0) {
        const strayText = `uncaught during the run: ${stray.join('; ')}`
        outcome.status = 'error'
        outcome.error = outcome.error == null ? strayText : `${outcome.error}; ${strayText}`
      }
      progress(
        outcome.status === 'ok'
          ? `${name} done in ${formatDuration(outcome.durationMs)}`
          : `${name} FAILED after ${formatDuration(outcome.durationMs)}: ${outcome.error}`,
      )
    }
  } finally {
    current = null
    clearInterval(heartbeat)
    setProgressStage(null)
    process.off('unhandledRejection', onStray)
    process.off('uncaughtException', onStray)
  }
  return outcomes
}

async function osName(): Promise<string> {
  const kernel = `${osType()} ${release()} ${process.arch}`
  const text = await readFile('/etc/os-release', 'utf8').catch(() => '')
  const pretty = /^PRETTY_NAME="?([^"\n]*)"?$/m.exec(text)?.[1]
  return pretty == null ? kernel : `${pretty}, ${kernel}`
}

export function loadAverage(): number[] {
  return loadavg().map((l) => Number(l.toFixed(2)))
}

/** The machine as the summary describes it; the load average at the end is filled in after the run. */
export async function describeMachine(): Promise<Machine> {
  const load = loadAverage()
  return {
    cpus: cpus().length,
    cpu_model: cpus()[0]?.model.trim() ?? 'unknown',
    memory_gb: Math.round(totalmem() / 2 ** 30),
    node: process.version,
    os: await osName(),
    load_average_start: load,
    load_average_end: load,
  }
}

const run = promisify(execFile)

/** HEAD and whether the tree has changes, or null where git or the repository is absent. */
export async function gitCommit(cwd: string): Promise<RunInfo['commit']> {
  try {
    const sha = (await run('git', ['rev-parse', 'HEAD'], { cwd })).stdout.trim()
    const status = (await run('git', ['status', '--porcelain'], { cwd })).stdout.trim()
    return { sha, dirty: status.length > 0 }
  } catch {
    return null
  }
}
