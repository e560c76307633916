import { delimiter } from 'node:path'
import si from 'systeminformation'
import { probeDocker, probePodman } from '../../containers/probe.ts'
import { probeAmd } from './amd.ts'
import { probeNvidiaContainerPath } from './containers.ts'
import { probeLlamaBackends } from './llama.ts'
import { probeNvidia, probeNvidiaComputeApps } from './nvidia.ts'
import { probeSystem } from './system.ts'
import type { GpuInfo, GpuVendor, HardwareReport, LlamaBackends } from './types.ts'

export const defaultCommandTimeoutMs = 5_000

export interface ProbeOptions {
  /** Where Garage keeps its data: free disk is measured there. */
  dataDir: string
  /** Environment of the probed tools (PATH); default: this process's. */
  env?: NodeJS.ProcessEnv
  /** Deadline for each external command. A hung driver costs at most this. */
  commandTimeoutMs?: number
  cdiDirs?: string[]
  /** For tests and recorded machines: what the OS would report. */
  platform?: NodeJS.Platform
  kernelRelease?: string
  osRelease?: string
  /** The embedded engine's GPU back-ends; default asks node-llama-cpp. */
  llamaBackends?: () => Promise<LlamaBackends>
  /** Ask systeminformation for GPUs the vendor tools did not list (Apple, Intel, others). Default: yes. */
  otherGpus?: boolean
}

function vendorOf(text: string): GpuVendor {
  if (/nvidia/i.test(text)) return 'nvidia'
  if (/amd|ati|radeon/i.test(text)) return 'amd'
  if (/apple/i.test(text)) return 'apple'
  if (/intel/i.test(text)) return 'intel'
  return 'other'
}

async function otherGpus(totalRamMiB: number, timeoutMs: number, skip: Set<GpuVendor>): Promise<GpuInfo[]> {
  let timer: NodeJS.Timeout | undefined
  const graphics = await Promise.race([
    si.graphics().catch(() => null),
    new Promise<null>((resolve) => {
      timer = setTimeout(() => resolve(null), timeoutMs)
    }),
  ]).finally(() => clearTimeout(timer))
  return (graphics?.controllers ?? [])
    .map((c, i): GpuInfo => {
      const vendor = vendorOf(`${c.vendor} ${c.model}`)
      // Apple silicon shares RAM with the GPU; Metal lets a process use about three quarters of it.
      const vram = c.vram ?? (vendor === 'apple' ? Math.floor(totalRamMiB * 0.75) : 0)
      return {
        index: i,
        vendor,
        name: c.model || c.name || 'GPU',
        uuid: null,
        vramTotalMiB: vram,
        vramUsedMiB: c.memoryUsed ?? null,
        utilizationPct: c.utilizationGpu ?? null,
        temperatureC: c.temperatureGpu ?? null,
        powerDrawW: c.powerDraw ?? null,
        powerLimitW: c.powerLimit ?? null,
        driverVersion: c.driverVersion ?? null,
        computeCapability: null,
        source: 'systeminformation',
      }
    })
    .filter((g) => !skip.has(g.vendor))
}

/**
 * Probes the machine: GPUs (nvidia-smi, rocm-smi, systeminformation), CPU, RAM, disk, OS and WSL2,
 * container runtimes and the NVIDIA container path, and the embedded engine's GPU back-ends.
 * Every external command has a deadline; nothing here throws for a missing or broken tool.
 */
export async function probeHardware(options: ProbeOptions): Promise<HardwareReport> {
  const started = performance.now()
  const env = options.env ?? process.env
  const timeoutMs = options.commandTimeoutMs ?? defaultCommandTimeoutMs
  const system = await probeSystem({
    dataDir: options.dataDir,
    env,
    timeoutMs,
    ...(options.platform != null ? { platform: options.platform } : {}),
    ...(options.kernelRelease != null ? { kernelRelease: options.kernelRelease } : {}),
    ...(options.osRelease != null ? { osRelease: options.osRelease } : {}),
  })
  // Under WSL2 the Windows driver's nvidia-smi lives in /usr/lib/wsl/lib, often not on PATH.
  const toolEnv = system.wsl2 ? { ...env, PATH: `${env.PATH ?? ''}${delimiter}/usr/lib/wsl/lib` } : env
  const tool = { timeoutMs, env: toolEnv }
  const [nvidia, amd, computeApps, podman, docker, nvidiaContainer, llama] = await Promise.all([
    probeNvidia(tool),
    probeAmd(tool),
    probeNvidiaComputeApps(tool),
    probePodman(tool),
    probeDocker(tool),
    probeNvidiaContainerPath({ ...tool, ...(options.cdiDirs != null ? { cdiDirs: options.cdiDirs } : {}) }),
    (options.llamaBackends ?? (() => probeLlamaBackends(timeoutMs)))(),
  ])
  const found = new Set<GpuVendor>()
  if (nvidia.gpus.length > 0) found.add('nvidia')
  if (amd.gpus.length > 0) found.add('amd')
  const others = options.otherGpus === false ? [] : await otherGpus(system.memory.totalMiB, timeoutMs, found)
  return {
    probedAt: new Date().toISOString(),
    durationMs: Math.round(performance.now() - started),
    system,
    nvidia,
    amd,
    gpus: [...nvidia.gpus, ...amd.gpus, ...others],
    computeApps,
    containers: { podman, docker },
    nvidiaContainer,
    llama,
  }
}
