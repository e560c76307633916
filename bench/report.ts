import { mkdir, writeFile } from 'node:fs/promises'
import { cpus, totalmem } from 'node:os'

export const resultsDir = new URL('./results/', import.meta.url)

export function percentile(values: number[], p: number): number {
  const s = [...values].sort((a, b) => a - b)
  if (s.length === 0) return Number.NaN
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] as number
}

export function machine(): Record<string, unknown> {
  return {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    memoryGb: Math.round(totalmem() / 2 ** 30),
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
  }
}

/** Which benchmark of the run is going, so every progress line says where the run stands. */
let stage: { label: string; startedMs: number; runStartedMs: number } | null = null
let lastProgressMs = 0

export function setProgressStage(
  next: { label: string; startedMs: number; runStartedMs: number } | null,
): void {
  stage = next
}

/** Milliseconds since the last progress line: the runner prints a heartbeat when a bench is quiet. */
export function msSinceProgress(): number {
  return performance.now() - lastProgressMs
}

export function formatDuration(ms: number): string {
  const seconds = Math.round(ms / 1000)
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)}s`
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, '0')}s`
  return `${Math.floor(seconds / 3600)}h${String(Math.floor((seconds % 3600) / 60)).padStart(2, '0')}m`
}

export function progress(text: string): void {
  lastProgressMs = performance.now()
  const where =
    stage == null
      ? 'bench'
      : `bench ${stage.label} · ${formatDuration(lastProgressMs - stage.startedMs)} · total ${formatDuration(lastProgressMs - stage.runStartedMs)}`
  process.stderr.write(`[${where}] ${text}\n`)
}

export async function writeResult(name: string, result: Record<string, unknown>): Promise<string> {
  await mkdir(resultsDir, { recursive: true })
  const url = new URL(`${name}.json`, resultsDir)
  await writeFile(
    url,
    `${JSON.stringify({ benchmark: name, date: new Date().toISOString(), machine: machine(), ...result }, null, 2)}\n`,
  )
  return url.pathname
}

export function table(rows: Array<[string, string, string]>): string {
  const header: [string, string, string] = ['metric', 'value', 'goal']
  const all = [header, ...rows]
  const w = [0, 1, 2].map((i) => Math.max(...all.map((r) => r[i]!.length)))
  return all.map((r) => r.map((c, i) => c.padEnd(w[i]!)).join('  ')).join('\n')
}
