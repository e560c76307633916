import si from 'systeminformation'
import type { NodeSettings } from '../control/types.ts'
import { gameListFor } from './games.ts'
import { NvidiaHostReader, type NvidiaHostReaderInit } from './gpu.ts'
import { IdleTracker, linuxIdleFallback } from './idle.ts'
import { listProcesses } from './processes.ts'
import type { HostInput } from './types.ts'

export interface HostSamplerInit {
  /** The machine has an NVIDIA GPU (the hardware probe's nvidia.status is 'ok'): nvidia-smi is asked. */
  nvidia: boolean
  /** The engine's processes now (the embedded engine's child, a container's init pid); may be empty. */
  ourPids: () => Iterable<number>
  settings: () => NodeSettings
  /** Where the tray app's idle reports go; by default a tracker with the Linux fallback on Linux. */
  idle?: IdleTracker
  platform?: NodeJS.Platform
  /** For tests: a fake /proc, a PATH with a fake nvidia-smi. */
  procDir?: string
  env?: NodeJS.ProcessEnv
  nvidiaReader?: NvidiaHostReaderInit
  /** On battery power? Default: systeminformation.battery(). */
  battery?: () => Promise<boolean | null>
  batteryMaxAgeMs?: number
  now?: () => number
  /** The daemon's own pid: excluded from the GPU apps (node-llama-cpp's probe may hold a context). */
  selfPid?: number
}

export interface HostSampler {
  sample(options?: { signal?: AbortSignal }): Promise<HostInput>
  idle: IdleTracker
  /** Releases the persistent PowerShell systeminformation keeps on Windows. */
  close(): void
}

export const defaultBatteryMaxAgeMs = 5_000

/** systeminformation.battery(): on battery when the machine has one and AC is not connected. */
export async function readOnBattery(): Promise<boolean | null> {
  const b = await si.battery()
  if (!b.hasBattery) return false
  return !b.acConnected
}

/**
 * The real sampler behind HostPolicyMonitor: processes (fast /proc reader on Linux), nvidia-smi
 * when there is an NVIDIA GPU, battery (cached: on Windows it is a PowerShell call), idle time.
 */
export function createHostSampler(init: HostSamplerInit): HostSampler {
  const platform = init.platform ?? process.platform
  const now = init.now ?? Date.now
  const selfPid = init.selfPid ?? process.pid
  const nvidia = init.nvidia
    ? new NvidiaHostReader({ ...(init.env != null ? { env: init.env } : {}), ...init.nvidiaReader })
    : null
  const idle =
    init.idle ??
    new IdleTracker({
      fallback: platform === 'linux' ? linuxIdleFallback(init.env != null ? { env: init.env } : {}) : null,
    })
  const readBattery = init.battery ?? readOnBattery
  const batteryMaxAgeMs = init.batteryMaxAgeMs ?? defaultBatteryMaxAgeMs
  let battery: { at: number; onBattery: boolean | null } | null = null
  let batteryRefresh: Promise<boolean | null> | null = null
  let powerShell = false

  const refreshBattery = (): Promise<boolean | null> => {
    batteryRefresh ??= readBattery()
      .catch(() => null)
      .then((onBattery) => {
        battery = { at: now(), onBattery }
        return onBattery
      })
      .finally(() => {
        batteryRefresh = null
      })
    return batteryRefresh
  }
  // The first reading is awaited; later ones return the cached value and refresh behind it.
  const onBattery = async (): Promise<boolean | null> => {
    if (battery == null) return refreshBattery()
    if (now() - battery.at >= batteryMaxAgeMs) void refreshBattery()
    return battery.onBattery
  }

  return {
    idle,
    async sample(options = {}): Promise<HostInput> {
      if (platform === 'win32' && !powerShell) {
        // One PowerShell kept for si.battery() (and si.processes() where fastlist cannot run): a new one per call costs about a second.
        si.powerShellStart()
        powerShell = true
      }
      const settings = init.settings()
      const games = gameListFor(settings.games)
      const [processes, gpu, batteryState, idleSeconds] = await Promise.all([
        listProcesses({
          platform,
          needsCommandLine: (name) => games.needsCommandLine(name),
          ...(init.procDir != null ? { procDir: init.procDir } : {}),
          ...(options.signal != null ? { signal: options.signal } : {}),
        }),
        nvidia?.read() ?? Promise.resolve(null),
        settings.pauseOnBattery ? onBattery() : Promise.resolve(null),
        settings.idleOnlyMinutes != null ? idle.idleSeconds() : Promise.resolve(null),
      ])
      return {
        processes,
        gpu: gpu?.gpu ?? null,
        gpuApps: (gpu?.apps ?? []).filter((a) => a.pid !== selfPid),
        ourPids: new Set(init.ourPids()),
        onBattery: batteryState,
        idleSeconds,
      }
    },
    close(): void {
      if (powerShell) si.powerShellRelease()
      powerShell = false
    },
  }
}
