import { runTool } from '../../core/tools.ts'
import { nvidiaAppsArgs, nvidiaGpuArgs, parseNvidiaComputeApps, parseNvidiaGpus } from '../hardware/nvidia.ts'
import type { GpuInfo } from '../hardware/types.ts'
import type { HostGpuApp, HostGpuReading } from './types.ts'

export interface NvidiaHostReading {
  /** null when nvidia-smi failed, timed out or listed no GPU. */
  gpu: HostGpuReading | null
  apps: HostGpuApp[]
}

export interface NvidiaHostReaderInit {
  /** Each nvidia-smi call's deadline: a hung driver must not stall the game check. */
  timeoutMs?: number
  /** A reading this recent is reused: nvidia-smi costs tens of ms of CPU per call. */
  maxAgeMs?: number
  env?: NodeJS.ProcessEnv
  now?: () => number
}

export const defaultNvidiaTimeoutMs = 1_500
export const defaultNvidiaMaxAgeMs = 1_000

/** Several GPUs: the busiest and the hottest decide (a game on one still heats the case). */
export function summarizeGpus(gpus: readonly GpuInfo[]): HostGpuReading | null {
  if (gpus.length === 0) return null
  const max = (values: Array<number | null>): number | null => {
    const known = values.filter((v): v is number => v != null)
    return known.length === 0 ? null : Math.max(...known)
  }
  return {
    utilizationPct: max(gpus.map((g) => g.utilizationPct)),
    temperatureC: max(gpus.map((g) => g.temperatureC)),
  }
}

/** Utilisation, temperature and compute apps from two nvidia-smi queries (runTool runs them one at a time), kept for maxAgeMs. */
export class NvidiaHostReader {
  private readonly timeoutMs: number
  private readonly maxAgeMs: number
  private readonly env: NodeJS.ProcessEnv | undefined
  private readonly now: () => number
  private last: { at: number; reading: NvidiaHostReading } | null = null
  private pending: Promise<NvidiaHostReading> | null = null

  constructor(init: NvidiaHostReaderInit = {}) {
    this.timeoutMs = init.timeoutMs ?? defaultNvidiaTimeoutMs
    this.maxAgeMs = init.maxAgeMs ?? defaultNvidiaMaxAgeMs
    this.env = init.env
    this.now = init.now ?? Date.now
  }

  /**
   * The first call waits for nvidia-smi; later ones answer from the last reading and refresh it
   * behind the answer when older than maxAgeMs, so a slow or hung driver never delays the game check.
   */
  async read(): Promise<NvidiaHostReading> {
    if (this.last == null) return this.refresh()
    if (this.now() - this.last.at >= this.maxAgeMs) void this.refresh()
    return this.last.reading
  }

  /** A fresh reading (joins one in flight). */
  refresh(): Promise<NvidiaHostReading> {
    this.pending ??= this.query().finally(() => {
      this.pending = null
    })
    return this.pending
  }

  private async query(): Promise<NvidiaHostReading> {
    const options = { timeoutMs: this.timeoutMs, ...(this.env != null ? { env: this.env } : {}) }
    const [gpuRun, appsRun] = await Promise.all([
      runTool('nvidia-smi', nvidiaGpuArgs, options),
      runTool('nvidia-smi', nvidiaAppsArgs, options),
    ])
    let gpu: HostGpuReading | null = null
    if (gpuRun.status === 'ok') {
      try {
        gpu = summarizeGpus(parseNvidiaGpus(gpuRun.stdout))
      } catch {
        gpu = null // a line this nvidia-smi prints differently: the GPU rules wait for the next reading
      }
    }
    const apps =
      appsRun.status === 'ok'
        ? parseNvidiaComputeApps(appsRun.stdout).map((a) => ({
            pid: a.pid,
            name: a.processName,
            usedMemoryMiB: a.usedMemoryMiB,
          }))
        : []
    const reading = { gpu, apps }
    this.last = { at: this.now(), reading }
    return reading
  }
}
