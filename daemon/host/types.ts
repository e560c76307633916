/** What the host policies read about the machine; docs/host-policies.md describes each rule. */

/** One running process. */
export interface HostProcess {
  pid: number
  /** Executable name as the OS reports it: `Cyberpunk2077.exe`, `cs2`, Linux `comm` (at most 15 chars). */
  name: string
  /** Parent pid when known: lets a container engine's children count as ours. */
  ppid?: number
  /** Full command line, read only for processes a rule needs it for (Steam's `reaper SteamLaunch`). */
  commandLine?: string
}

/** The hottest and busiest of the machine's NVIDIA GPUs. */
export interface HostGpuReading {
  utilizationPct: number | null
  temperatureC: number | null
}

/** A process holding a compute context on an NVIDIA GPU (nvidia-smi --query-compute-apps). */
export interface HostGpuApp {
  pid: number
  /** As nvidia-smi prints it: a full path on Linux, an .exe path on Windows. */
  name: string
  /** null when the driver does not say (Windows WDDM prints [N/A]). */
  usedMemoryMiB: number | null
}

export interface HostInput {
  processes: HostProcess[]
  /** null: no NVIDIA GPU, or nvidia-smi did not answer. */
  gpu: HostGpuReading | null
  gpuApps: HostGpuApp[]
  /** Our engine's processes (and the daemon's); their descendants count as ours too. */
  ourPids: Set<number>
  /** null: unknown (the battery rule does not fire). */
  onBattery: boolean | null
  /** Seconds since the last user input; null: unknown. */
  idleSeconds: number | null
}

export interface HostVerdict {
  pause: boolean
  /** `game: Cyberpunk2077.exe`, `gpu-busy: blender`, `battery`, `schedule`, `temperature: 87 °C`, `not-idle`. */
  reasons: string[]
}
