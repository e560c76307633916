import type { NodeSettings } from '../../../daemon/control/types.ts'
import type { HostInput } from '../../../daemon/host/types.ts'

export function settings(patch: Partial<NodeSettings> = {}): NodeSettings {
  return {
    games: [],
    schedule: [],
    vramCapMiB: null,
    maxGpuTemperatureC: null,
    pauseOnBattery: false,
    idleOnlyMinutes: null,
    resumeAfterSeconds: 60,
    ...patch,
  }
}

/** A quiet desktop: a shell, Steam left open, Xorg on the GPU, our engine running as pid 500. */
export function quietHost(patch: Partial<HostInput> = {}): HostInput {
  return {
    processes: [
      { pid: 1, name: 'systemd', ppid: 0 },
      { pid: 100, name: 'bash', ppid: 1 },
      { pid: 200, name: 'steam', ppid: 1 },
      { pid: 201, name: 'steamwebhelper', ppid: 200 },
      { pid: 500, name: 'node', ppid: 100 },
    ],
    gpu: { utilizationPct: 3, temperatureC: 45 },
    gpuApps: [
      { pid: 300, name: '/usr/lib/xorg/Xorg', usedMemoryMiB: 412 },
      { pid: 500, name: 'node', usedMemoryMiB: 9000 },
    ],
    ourPids: new Set([500]),
    onBattery: false,
    idleSeconds: 3600,
    ...patch,
  }
}
