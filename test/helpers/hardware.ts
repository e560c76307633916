import type { HardwareReport } from '../../daemon/hardware/types.ts'

/** A CPU-only machine with 16 GiB of RAM, as the probe would report it: it can run the tiny model. */
export function cpuOnlyMachine(): HardwareReport {
  const noRuntime = (name: 'podman' | 'docker') => ({
    name,
    installed: false,
    version: null,
    reachable: false,
    rootless: null,
    nvidiaRuntime: false,
    cdiEnabled: false,
    message: null,
  })
  return {
    gpus: [],
    nvidia: { tool: 'nvidia-smi', status: 'not-installed', message: null, gpus: [] },
    amd: { tool: 'rocm-smi', status: 'not-installed', message: null, gpus: [] },
    system: {
      os: {
        platform: 'linux',
        distro: 'Debian',
        distroId: 'debian',
        release: '13',
        kernel: '6.1',
        arch: 'x64',
      },
      wsl2: false,
      cpu: { model: 'test', cores: 8, threads: 16 },
      memory: { totalMiB: 16_384, freeMiB: 8_192 },
      disk: { path: '/', totalMiB: null, freeMiB: null },
    },
    computeApps: [],
    containers: { podman: noRuntime('podman'), docker: noRuntime('docker') },
    nvidiaContainer: { cdiSpecFiles: [], cdiDevices: [], toolkitInstalled: false },
    llama: { gpu: [], available: true, message: null },
    probedAt: new Date().toISOString(),
    durationMs: 1,
  }
}

/** A gamer's PC as the probe sees it: an RTX 4090 (24 GiB), Podman running, a CDI spec for the GPU. */
export function nvidiaMachine(): HardwareReport {
  const m = cpuOnlyMachine()
  const gpu = {
    index: 0,
    vendor: 'nvidia' as const,
    name: 'NVIDIA GeForce RTX 4090',
    uuid: 'GPU-5d3f2a9c-8e1b-4c7d-9f02-6a1b3c4d5e6f',
    vramTotalMiB: 24_564,
    vramUsedMiB: 1_387,
    utilizationPct: 4,
    temperatureC: 42,
    powerDrawW: 31,
    powerLimitW: 450,
    driverVersion: '580.95',
    computeCapability: '8.9',
    source: 'nvidia-smi' as const,
  }
  return {
    ...m,
    gpus: [gpu],
    nvidia: { tool: 'nvidia-smi', status: 'ok', message: null, gpus: [gpu] },
    containers: {
      ...m.containers,
      podman: { ...m.containers.podman, installed: true, version: '4.3.1', reachable: true, rootless: false },
    },
    nvidiaContainer: {
      cdiSpecFiles: ['/etc/cdi/nvidia.yaml'],
      cdiDevices: ['nvidia.com/gpu=0', 'nvidia.com/gpu=all'],
      toolkitInstalled: true,
    },
  }
}
