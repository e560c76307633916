import type { Capability } from './capability.ts'
import type { HardwareReport } from './types.ts'

/** blocker: no engine can serve until fixed. engine: an engine is unavailable. warning: works, but worse. */
export type AdviceLevel = 'blocker' | 'engine' | 'warning'

export interface Advice {
  id: string
  level: AdviceLevel
  problem: string
  /** Steps for this OS, commands verbatim. */
  fix: string[]
}

export type OsFamily = 'debian' | 'fedora' | 'arch' | 'linux' | 'wsl2' | 'windows' | 'macos'

/** The family whose commands apply: WSL2 first (its GPU comes from Windows), then the distro. */
export function osFamily(r: HardwareReport): OsFamily {
  const { platform, distroId } = r.system.os
  if (platform === 'win32') return 'windows'
  if (platform === 'darwin') return 'macos'
  if (r.system.wsl2) return 'wsl2'
  if (distroId != null && /^(debian|ubuntu|linuxmint|pop|raspbian)$/.test(distroId)) return 'debian'
  if (distroId != null && /^(fedora|rhel|centos|rocky|almalinux)$/.test(distroId)) return 'fedora'
  if (distroId != null && /^(arch|manjaro|endeavouros)$/.test(distroId)) return 'arch'
  return 'linux'
}

const driverInstall: Record<OsFamily, string[]> = {
  debian: [
    'Debian: enable the non-free component, then: sudo apt-get install -y nvidia-driver firmware-misc-nonfree',
    'Ubuntu: sudo ubuntu-drivers install',
    'Reboot, then check: nvidia-smi',
  ],
  fedora: [
    'Enable RPM Fusion (rpmfusion.org/Configuration), then: sudo dnf install -y akmod-nvidia',
    'Reboot, then check: nvidia-smi',
  ],
  arch: ['sudo pacman -S --needed nvidia-open nvidia-utils', 'Reboot, then check: nvidia-smi'],
  linux: ["Install your distribution's NVIDIA driver package (535 or newer), reboot, then check: nvidia-smi"],
  wsl2: [
    'Install the NVIDIA driver on Windows (NVIDIA App or nvidia.com/drivers), not inside WSL: WSL2 uses the Windows driver.',
    'In PowerShell: wsl --update, then restart WSL: wsl --shutdown',
    'Check inside WSL: /usr/lib/wsl/lib/nvidia-smi',
  ],
  windows: [
    'Install the NVIDIA Game Ready or Studio driver (NVIDIA App or nvidia.com/drivers), then check: nvidia-smi',
  ],
  macos: ['Macs have no NVIDIA GPU support: the embedded engine uses the Apple GPU through Metal instead.'],
}

const podmanInstall: Record<OsFamily, string[]> = {
  debian: ['sudo apt-get install -y podman'],
  fedora: ['sudo dnf install -y podman'],
  arch: ['sudo pacman -S --needed podman'],
  linux: ["Install Podman from your distribution's packages (podman.io/docs/installation)"],
  wsl2: [
    'Inside WSL: sudo apt-get install -y podman',
    'or install Docker Desktop on Windows with the WSL2 back-end and WSL integration on',
  ],
  windows: [
    'vLLM runs inside WSL2. In PowerShell: wsl --install',
    'then install Garage inside WSL, or Docker Desktop with the WSL2 back-end',
  ],
  macos: ['brew install podman && podman machine init && podman machine start'],
}

const toolkitInstall: Record<OsFamily, string[]> = {
  debian: [
    "Add NVIDIA's repository (docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html), then: sudo apt-get install -y nvidia-container-toolkit",
    'Podman: sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml',
    'Docker: sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker',
  ],
  fedora: [
    "Add NVIDIA's repository (see the install guide), then: sudo dnf install -y nvidia-container-toolkit",
    'Podman: sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml',
  ],
  arch: [
    'sudo pacman -S --needed nvidia-container-toolkit',
    'Podman: sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml',
  ],
  linux: [
    'Install the NVIDIA Container Toolkit, then: sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml',
  ],
  wsl2: [
    "Inside WSL, install nvidia-container-toolkit (NVIDIA's apt repository), then: sudo nvidia-ctk cdi generate --mode=wsl --output=/etc/cdi/nvidia.yaml",
    'Docker Desktop users: GPU support is built in; turn on "Use the WSL 2 based engine"',
  ],
  windows: [
    'Use Docker Desktop with the WSL2 back-end (GPU support built in), or Podman inside WSL2 with a CDI spec',
  ],
  macos: [],
}

const engineStart: Record<OsFamily, string[]> = {
  debian: [
    'Docker: sudo systemctl enable --now docker',
    'Podman (rootless): systemctl --user enable --now podman.socket',
  ],
  fedora: [
    'Docker: sudo systemctl enable --now docker',
    'Podman (rootless): systemctl --user enable --now podman.socket',
  ],
  arch: [
    'Docker: sudo systemctl enable --now docker',
    'Podman (rootless): systemctl --user enable --now podman.socket',
  ],
  linux: ['Docker: sudo systemctl enable --now docker'],
  wsl2: ['Start Docker Desktop on Windows and turn on WSL integration for this distribution'],
  windows: ['Start Docker Desktop, or: podman machine start'],
  macos: ['podman machine start (or start Docker Desktop)'],
}

const minFreeDiskMiB = 20 * 1024

/** What is missing and the exact fix for this OS, most important first. */
export function adviseFixes(r: HardwareReport, cap: Capability): Advice[] {
  const family = osFamily(r)
  const advice: Advice[] = []
  const llama = cap.engines.find((e) => e.engine === 'llamacpp')!
  const vllm = cap.engines.find((e) => e.engine === 'vllm')!
  if (!llama.available) {
    advice.push({
      id: 'embedded-engine',
      level: 'blocker',
      problem: llama.reason ?? 'the embedded engine cannot load here',
      fix: [
        'Reinstall Garage (npm install) on a supported platform: Linux, Windows or macOS on x64 or arm64',
      ],
    })
  }
  if (r.nvidia.status === 'driver-error') {
    advice.push({
      id: 'nvidia-driver-error',
      level: 'engine',
      problem: `nvidia-smi cannot reach the driver: ${r.nvidia.message}`,
      fix: [
        ...(family === 'wsl2' || family === 'windows'
          ? ['Update the NVIDIA driver on Windows, then in PowerShell: wsl --shutdown']
          : [
              'The kernel module is not loaded. After a driver install or kernel update, reboot.',
              'Check: lsmod | grep nvidia; with Secure Boot on (mokutil --sb-state), enroll the module key or turn Secure Boot off',
              ...(driverInstall[family] ?? []),
            ]),
      ],
    })
  } else if (r.nvidia.status === 'timeout') {
    advice.push({
      id: 'nvidia-driver-hung',
      level: 'engine',
      problem: `${r.nvidia.message}: the driver is hung`,
      fix: ['Reboot; if it happens again, reinstall or update the driver:', ...driverInstall[family]],
    })
  } else if (vllm.missing.includes('nvidia-gpu')) {
    const other = r.gpus.find((g) => g.vendor !== 'nvidia')
    advice.push({
      id: 'nvidia-gpu',
      level: 'engine',
      problem:
        other != null
          ? `vLLM needs an NVIDIA GPU; this machine has ${other.name}. The embedded engine serves instead${llama.device !== 'cpu' ? ` on ${llama.device}` : ''}.`
          : 'vLLM needs an NVIDIA GPU; none was found (the embedded engine serves on the CPU). If this PC has one, install its driver:',
      fix:
        other != null && family !== 'macos' && llama.device === 'cpu'
          ? [
              'Install Vulkan drivers so the embedded engine can use this GPU (Debian/Ubuntu: sudo apt-get install -y mesa-vulkan-drivers)',
            ]
          : driverInstall[family],
    })
  } else if (vllm.missing.includes('compute-capability')) {
    advice.push({
      id: 'compute-capability',
      level: 'engine',
      problem: vllm.reason ?? '',
      fix: ['Nothing to install: this GPU is too old for vLLM. The embedded engine still serves.'],
    })
  }
  // Container advice only matters where vLLM could use an NVIDIA GPU.
  const nvidiaPresent =
    r.nvidia.status === 'ok' || r.nvidia.status === 'driver-error' || r.nvidia.status === 'timeout'
  if (!nvidiaPresent) return finish(advice, r)
  if (vllm.missing.includes('container-runtime')) {
    advice.push({
      id: 'container-runtime',
      level: 'engine',
      problem: 'vLLM runs in a container: install Podman (or Docker)',
      fix: podmanInstall[family],
    })
  } else if (vllm.missing.includes('container-engine-stopped')) {
    const d = r.containers.docker
    advice.push({
      id: 'container-engine-stopped',
      level: 'engine',
      problem: `a container runtime is installed but its engine does not answer${d.message != null ? ` (${d.message})` : ''}`,
      fix: engineStart[family],
    })
  }
  if (
    vllm.missing.includes('gpu-container-path') ||
    (vllm.missing.length > 0 &&
      r.nvidia.status === 'ok' &&
      r.nvidiaContainer.cdiDevices.length === 0 &&
      !r.containers.docker.nvidiaRuntime)
  ) {
    advice.push({
      id: 'gpu-container-path',
      level: 'engine',
      problem: r.nvidiaContainer.toolkitInstalled
        ? 'the NVIDIA Container Toolkit is installed but no CDI spec lists the GPU'
        : 'containers cannot see the GPU: the NVIDIA Container Toolkit is missing',
      fix: toolkitInstall[family],
    })
  }
  if (family === 'windows' && !vllm.available) {
    advice.push({
      id: 'wsl2',
      level: 'engine',
      problem: 'on Windows, vLLM runs inside WSL2',
      fix: ['In PowerShell as administrator: wsl --install', 'then run Garage inside WSL2'],
    })
  }
  return finish(advice, r)
}

function finish(advice: Advice[], r: HardwareReport): Advice[] {
  const free = r.system.disk.freeMiB
  if (free != null && free < minFreeDiskMiB) {
    advice.push({
      id: 'disk-space',
      level: 'warning',
      problem: `only ${(free / 1024).toFixed(1)} GiB free in ${r.system.disk.path}; models need 1-40 GiB each`,
      fix: [
        'Free some space, or put the data dir on a larger disk: garage ... --data-dir /path/on/large/disk',
      ],
    })
  }
  return advice
}
