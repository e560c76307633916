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

export function progress(text: string): void {
  process.stderr.write(`[bench] ${text}\n`)
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
