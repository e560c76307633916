import type { ContainerRuntimeInfo } from '../../containers/types.ts'

/** What the hardware probe reports. docs/doctor.md documents the JSON form of these. */

export type GpuVendor = 'nvidia' | 'amd' | 'apple' | 'intel' | 'other'

export interface GpuInfo {
  index: number
  vendor: GpuVendor
  name: string
  uuid: string | null
  vramTotalMiB: number
  vramUsedMiB: number | null
  utilizationPct: number | null
  temperatureC: number | null
  powerDrawW: number | null
  powerLimitW: number | null
  driverVersion: string | null
  /** NVIDIA compute capability, "8.9"; null elsewhere. */
  computeCapability: string | null
  source: 'nvidia-smi' | 'rocm-smi' | 'systeminformation'
}

/**
 * ok: GPUs listed. not-installed: the tool is absent. no-device: the tool runs and sees no GPU.
 * driver-error: the tool cannot reach the driver. timeout: the tool hung. error: anything else.
 */
export type GpuProbeStatus = 'ok' | 'not-installed' | 'no-device' | 'driver-error' | 'timeout' | 'error'

export interface GpuProbe {
  tool: 'nvidia-smi' | 'rocm-smi'
  status: GpuProbeStatus
  /** The tool's own words when it failed. */
  message: string | null
  gpus: GpuInfo[]
}

/** A process using an NVIDIA GPU (for game and heavy-user detection). */
export interface GpuComputeApp {
  pid: number
  processName: string
  usedMemoryMiB: number | null
}

export interface SystemInfo {
  os: {
    platform: NodeJS.Platform
    distro: string
    distroId: string | null
    release: string
    kernel: string
    arch: string
  }
  wsl2: boolean
  cpu: { model: string; cores: number; threads: number }
  memory: { totalMiB: number; freeMiB: number }
  disk: { path: string; totalMiB: number | null; freeMiB: number | null }
}

export interface NvidiaContainerPath {
  /** CDI spec files found, and the nvidia.com/gpu devices they declare. */
  cdiSpecFiles: string[]
  cdiDevices: string[]
  /** nvidia-ctk (NVIDIA Container Toolkit) on PATH. */
  toolkitInstalled: boolean
}

export interface LlamaBackends {
  /** GPU back-ends node-llama-cpp can use on this machine: "cuda", "vulkan", "metal". */
  gpu: string[]
  /** The embedded engine's binaries load on this platform. */
  available: boolean
  message: string | null
}

export interface HardwareReport {
  probedAt: string
  durationMs: number
  system: SystemInfo
  nvidia: GpuProbe
  amd: GpuProbe
  /** Every GPU found, NVIDIA first, then AMD, then what systeminformation saw. */
  gpus: GpuInfo[]
  computeApps: GpuComputeApp[]
  containers: { podman: ContainerRuntimeInfo; docker: ContainerRuntimeInfo }
  nvidiaContainer: NvidiaContainerPath
  llama: LlamaBackends
}
