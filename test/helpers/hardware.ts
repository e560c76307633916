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
