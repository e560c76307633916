import { type Advice, adviseFixes } from './advice.ts'
import { assessCapability, type Capability } from './capability.ts'
import { type CatalogModel, loadCatalog } from './catalog.ts'
import { type ProbeOptions, probeHardware } from './probe.ts'
import type { GpuInfo, HardwareReport } from './types.ts'

export const doctorSchema = 'garage.doctor/v1'

/** The `garage doctor --json` document; docs/doctor.md describes every field. */
export interface DoctorReport {
  schema: typeof doctorSchema
  canServe: boolean
  reason: string | null
  hardware: HardwareReport
  capability: Capability
  advice: Advice[]
}

export async function runDoctor(options: ProbeOptions & { catalog?: CatalogModel[] }): Promise<DoctorReport> {
  const [hardware, catalog] = await Promise.all([probeHardware(options), options.catalog ?? loadCatalog()])
  const capability = assessCapability(hardware, catalog)
  return {
    schema: doctorSchema,
    canServe: capability.canServe,
    reason: capability.reason,
    hardware,
    capability,
    advice: adviseFixes(hardware, capability),
  }
}

const gib = (mib: number | null): string =>
  mib == null ? '?' : `${(mib / 1024).toFixed(mib < 10 * 1024 ? 1 : 0)} GiB`

function gpuLine(g: GpuInfo): string {
  const bits = [`${gib(g.vramTotalMiB)} VRAM`]
  if (g.computeCapability != null) bits.push(`compute ${g.computeCapability}`)
  if (g.driverVersion != null) bits.push(`driver ${g.driverVersion}`)
  if (g.temperatureC != null) bits.push(`${g.temperatureC} °C`)
  return `#${g.index} ${g.name} (${bits.join(', ')})`
}

function rows(pairs: Array<[string, string]>): string[] {
  const w = Math.max(...pairs.map(([k]) => k.length))
  return pairs.map(([k, v]) => `  ${k.padEnd(w)}  ${v}`)
}

/** The human-readable form: what was found, what can run, what fits, what to fix. */
export function formatDoctor(d: DoctorReport): string {
  const h = d.hardware
  const s = h.system
  const out: string[] = ['Garage doctor', '']
  const found: Array<[string, string]> = [
    ['OS', `${s.os.distro} (${s.os.platform} ${s.os.arch}, kernel ${s.os.release})${s.wsl2 ? ', WSL2' : ''}`],
    ['CPU', `${s.cpu.model}, ${s.cpu.cores} cores / ${s.cpu.threads} threads`],
    ['RAM', `${gib(s.memory.totalMiB)} (${gib(s.memory.freeMiB)} free)`],
    ['Disk', `${gib(s.disk.freeMiB)} free of ${gib(s.disk.totalMiB)} at ${s.disk.path}`],
    [
      'NVIDIA',
      h.nvidia.status === 'ok'
        ? h.nvidia.gpus.map(gpuLine).join('; ')
        : `${h.nvidia.status}: ${h.nvidia.message}`,
    ],
    ['AMD', h.amd.status === 'ok' ? h.amd.gpus.map(gpuLine).join('; ') : `${h.amd.status}: ${h.amd.message}`],
  ]
  const others = h.gpus.filter((g) => g.source === 'systeminformation')
  if (others.length > 0) found.push(['Other GPUs', others.map(gpuLine).join('; ')])
  for (const c of [h.containers.podman, h.containers.docker]) {
    const label = c.name === 'podman' ? 'Podman' : 'Docker'
    if (!c.installed) found.push([label, 'not installed'])
    else
      found.push([
        label,
        `${c.version ?? '?'}, ${c.reachable ? `engine running${c.rootless ? ', rootless' : ''}${c.nvidiaRuntime ? ', nvidia runtime' : ''}` : `engine not answering${c.message != null ? ` (${c.message})` : ''}`}`,
      ])
  }
  found.push([
    'NVIDIA CDI',
    h.nvidiaContainer.cdiDevices.length > 0
      ? `${h.nvidiaContainer.cdiDevices.join(', ')} (${h.nvidiaContainer.cdiSpecFiles.join(', ')})`
      : `none${h.nvidiaContainer.toolkitInstalled ? ' (nvidia-ctk installed)' : ''}`,
  ])
  found.push([
    'llama.cpp',
    h.llama.available
      ? `back-ends: ${[...h.llama.gpu, 'cpu'].join(', ')}`
      : `unavailable: ${h.llama.message}`,
  ])
  out.push('Found', ...rows(found), '', 'Engines')
  for (const e of d.capability.engines) {
    const label = e.engine === 'llamacpp' ? 'embedded (llama.cpp)' : 'vLLM (container)'
    out.push(
      `  ${e.available ? '✓' : '✗'} ${label.padEnd(21)} ${e.available ? `on ${e.device}${e.gpus.length > 0 ? ` (GPU ${e.gpus.join(', ')})` : ''}${e.runtime != null ? ` via ${e.runtime}` : ''}` : e.reason}`,
    )
  }
  const fits = d.capability.models.filter((m) => m.fits)
  out.push('', `Models that fit (${fits.length} of ${d.capability.models.length})`)
  for (const m of fits)
    out.push(
      `  ${m.name.padEnd(36)} ${m.engine.padEnd(8)} ${m.placement}${m.gpus.length > 0 ? ` ${m.gpus.join('+')}` : ''}  needs ${gib(m.requiredMiB)}`,
    )
  if (fits.length === 0) out.push('  none')
  if (d.advice.length > 0) {
    out.push('', 'To fix')
    d.advice.forEach((a, i) => {
      out.push(`  ${i + 1}. [${a.level}] ${a.problem}`)
      for (const f of a.fix) out.push(`       ${f}`)
    })
  }
  out.push('', d.canServe ? 'This machine can serve.' : `This machine cannot serve: ${d.reason}`)
  return out.join('\n')
}
