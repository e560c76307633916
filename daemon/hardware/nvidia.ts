import { runTool } from '../../core/tools.ts'
import type { GpuComputeApp, GpuInfo, GpuProbe } from './types.ts'

export const nvidiaGpuQuery =
  'index,uuid,name,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw,power.limit,driver_version,compute_cap'
export const nvidiaGpuArgs = [`--query-gpu=${nvidiaGpuQuery}`, '--format=csv,noheader,nounits']
export const nvidiaAppsArgs = [
  '--query-compute-apps=pid,process_name,used_memory',
  '--format=csv,noheader,nounits',
]

const driverUnreachable =
  /couldn't communicate with the NVIDIA driver|NVIDIA driver is not loaded|Driver\/library version mismatch/i
const noDevices = /No devices were found/i

/** "[N/A]", "[Not Supported]" and friends: nvidia-smi's way of saying it does not know. */
function num(field: string | undefined): number | null {
  if (field == null) return null
  const v = field.trim()
  if (v === '' || v.startsWith('[')) return null
  const n = Number(v)
  return Number.isFinite(n) ? n : null
}

function text(field: string | undefined): string | null {
  const v = field?.trim()
  return v == null || v === '' || v.startsWith('[') ? null : v
}

/** Parses `--query-gpu=... --format=csv,noheader,nounits` lines. */
export function parseNvidiaGpus(csv: string): GpuInfo[] {
  const gpus: GpuInfo[] = []
  for (const line of csv.split(/\r?\n/)) {
    if (line.trim() === '') continue
    const parts = line.split(',')
    if (parts.length < 11) throw new Error(`unexpected nvidia-smi line: ${line}`)
    // A name never holds a comma today, but keep the 8 trailing fields right if one ever does.
    const tail = parts.slice(-8)
    const name = parts
      .slice(2, parts.length - 8)
      .join(',')
      .trim()
    const [memTotal, memUsed, util, temp, draw, limit, driver, cc] = tail
    const index = num(parts[0])
    const total = num(memTotal)
    if (index == null || total == null) throw new Error(`unexpected nvidia-smi line: ${line}`)
    gpus.push({
      index,
      vendor: 'nvidia',
      name,
      uuid: text(parts[1]),
      vramTotalMiB: total,
      vramUsedMiB: num(memUsed),
      utilizationPct: num(util),
      temperatureC: num(temp),
      powerDrawW: num(draw),
      powerLimitW: num(limit),
      driverVersion: text(driver),
      computeCapability: text(cc),
      source: 'nvidia-smi',
    })
  }
  return gpus
}

/** Parses `--query-compute-apps=pid,process_name,used_memory` lines. */
export function parseNvidiaComputeApps(csv: string): GpuComputeApp[] {
  const apps: GpuComputeApp[] = []
  for (const line of csv.split(/\r?\n/)) {
    if (line.trim() === '' || noDevices.test(line)) continue
    const first = line.indexOf(',')
    const last = line.lastIndexOf(',')
    const pid = num(line.slice(0, first))
    if (first < 0 || last <= first || pid == null) continue
    apps.push({
      pid,
      processName: line.slice(first + 1, last).trim(),
      usedMemoryMiB: num(line.slice(last + 1)),
    })
  }
  return apps
}

function firstLine(s: string): string {
  return (
    s
      .split(/\r?\n/)
      .find((l) => l.trim() !== '')
      ?.trim() ?? ''
  )
}

export async function probeNvidia(options: {
  timeoutMs: number
  env?: NodeJS.ProcessEnv
}): Promise<GpuProbe> {
  const r = await runTool('nvidia-smi', nvidiaGpuArgs, options)
  const base = { tool: 'nvidia-smi' as const, gpus: [] }
  if (r.status === 'not-found')
    return { ...base, status: 'not-installed', message: 'nvidia-smi is not installed' }
  if (r.status === 'timeout') {
    return { ...base, status: 'timeout', message: `nvidia-smi did not answer within ${options.timeoutMs} ms` }
  }
  const said = `${r.stdout}\n${r.stderr}`
  if (r.status === 'failed') {
    if (driverUnreachable.test(said)) return { ...base, status: 'driver-error', message: firstLine(said) }
    if (noDevices.test(said)) return { ...base, status: 'no-device', message: firstLine(said) }
    return { ...base, status: 'error', message: firstLine(said) || `nvidia-smi exited with ${r.exitCode}` }
  }
  try {
    const gpus = parseNvidiaGpus(r.stdout)
    if (gpus.length === 0) return { ...base, status: 'no-device', message: 'nvidia-smi lists no GPU' }
    return { ...base, status: 'ok', message: null, gpus }
  } catch (err) {
    return { ...base, status: 'error', message: (err as Error).message }
  }
}

export async function probeNvidiaComputeApps(options: {
  timeoutMs: number
  env?: NodeJS.ProcessEnv
}): Promise<GpuComputeApp[]> {
  const r = await runTool('nvidia-smi', nvidiaAppsArgs, options)
  return r.status === 'ok' ? parseNvidiaComputeApps(r.stdout) : []
}
