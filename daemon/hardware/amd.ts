import { runTool } from '../../core/tools.ts'
import type { GpuInfo, GpuProbe } from './types.ts'

export const rocmSmiArgs = [
  '--showproductname',
  '--showmeminfo',
  'vram',
  '--showuse',
  '--showtemp',
  '--showpower',
  '--showdriverversion',
  '--json',
]

function num(v: unknown): number | null {
  if (typeof v === 'number') return Number.isFinite(v) ? v : null
  if (typeof v !== 'string' || v.trim() === '' || /N\/A/i.test(v)) return null
  const n = Number(v)
  return Number.isFinite(n) ? n : null
}

function field(card: Record<string, unknown>, pattern: RegExp): unknown {
  const key = Object.keys(card).find((k) => pattern.test(k))
  return key == null ? undefined : card[key]
}

/** Parses `rocm-smi ... --json`: `{ "card0": { "Card series": ..., "VRAM Total Memory (B)": ... }, "system": {...} }`. */
export function parseRocmSmi(json: string): GpuInfo[] {
  const doc = JSON.parse(json) as Record<string, Record<string, unknown>>
  if (typeof doc !== 'object' || doc == null) throw new Error('rocm-smi JSON is not an object')
  const driver =
    doc.system != null ? (field(doc.system, /^driver version$/i) as string | undefined) : undefined
  const gpus: GpuInfo[] = []
  for (const [key, card] of Object.entries(doc)) {
    const m = /^card(\d+)$/.exec(key)
    if (m == null || typeof card !== 'object' || card == null) continue
    const totalBytes = num(field(card, /^VRAM Total Memory \(B\)$/i))
    const usedBytes = num(field(card, /^VRAM Total Used Memory \(B\)$/i))
    const name =
      field(card, /^Card series$/i) ?? field(card, /^Card SKU$/i) ?? field(card, /^Card model$/i) ?? 'AMD GPU'
    gpus.push({
      index: Number(m[1]),
      vendor: 'amd',
      name: String(name),
      uuid: (field(card, /^Unique ID$/i) as string | undefined) ?? null,
      vramTotalMiB: totalBytes == null ? 0 : Math.round(totalBytes / 2 ** 20),
      vramUsedMiB: usedBytes == null ? null : Math.round(usedBytes / 2 ** 20),
      utilizationPct: num(field(card, /^GPU use \(%\)$/i)),
      temperatureC:
        num(field(card, /^Temperature \(Sensor edge\) \(C\)$/i)) ??
        num(field(card, /^Temperature \(Sensor junction\) \(C\)$/i)),
      powerDrawW:
        num(field(card, /Graphics Package Power \(W\)$/i)) ??
        num(field(card, /Socket Graphics Package Power \(W\)$/i)),
      powerLimitW: null,
      driverVersion: driver ?? null,
      computeCapability: null,
      source: 'rocm-smi',
    })
  }
  return gpus.sort((a, b) => a.index - b.index)
}

export async function probeAmd(options: { timeoutMs: number; env?: NodeJS.ProcessEnv }): Promise<GpuProbe> {
  const base = { tool: 'rocm-smi' as const, gpus: [] }
  const r = await runTool('rocm-smi', rocmSmiArgs, options)
  if (r.status === 'not-found')
    return { ...base, status: 'not-installed', message: 'rocm-smi is not installed' }
  if (r.status === 'timeout')
    return { ...base, status: 'timeout', message: `rocm-smi did not answer within ${options.timeoutMs} ms` }
  if (r.status === 'failed' && r.stdout.trim() === '') {
    const said = `${r.stderr}`.trim().split('\n')[0] ?? ''
    return {
      ...base,
      status: /driver|amdgpu/i.test(said) ? 'driver-error' : 'error',
      message: said || `rocm-smi exited with ${r.exitCode}`,
    }
  }
  try {
    const gpus = parseRocmSmi(r.stdout)
    return gpus.length === 0
      ? { ...base, status: 'no-device', message: 'rocm-smi lists no GPU' }
      : { ...base, status: 'ok', message: null, gpus }
  } catch (err) {
    return { ...base, status: 'error', message: `rocm-smi output: ${(err as Error).message}` }
  }
}
