import { readFile, statfs } from 'node:fs/promises'
import { arch, cpus, freemem, platform, release, totalmem } from 'node:os'
import { dirname } from 'node:path'
import si from 'systeminformation'
import type { SystemInfo } from './types.ts'

export interface SystemProbeOptions {
  dataDir: string
  env: NodeJS.ProcessEnv
  timeoutMs: number
  /** For tests: what `os.release()` and `process.platform` would say. */
  kernelRelease?: string
  platform?: NodeJS.Platform
  osRelease?: string
}

/** WSL2 kernels say so in their release ("5.15.153.1-microsoft-standard-WSL2"); WSL sets WSL_DISTRO_NAME. */
export function isWsl2(kernelRelease: string, env: NodeJS.ProcessEnv): boolean {
  return (
    /microsoft-standard-WSL2/i.test(kernelRelease) ||
    (env.WSL_DISTRO_NAME != null && /microsoft/i.test(kernelRelease))
  )
}

/** /etc/os-release fields we use: ID and PRETTY_NAME. */
export function parseOsRelease(text: string): { id: string | null; pretty: string | null } {
  const get = (key: string): string | null => {
    const m = new RegExp(`^${key}=(.*)$`, 'm').exec(text)
    return m?.[1] == null ? null : m[1].replace(/^["']|["']$/g, '')
  }
  return { id: get('ID'), pretty: get('PRETTY_NAME') }
}

/** Free space where the data dir will be (its nearest existing ancestor). */
async function diskFree(path: string): Promise<{ totalMiB: number | null; freeMiB: number | null }> {
  let p = path
  for (let i = 0; i < 64; i++) {
    try {
      const s = await statfs(p)
      return {
        totalMiB: Math.floor((s.blocks * s.bsize) / 2 ** 20),
        freeMiB: Math.floor((s.bavail * s.bsize) / 2 ** 20),
      }
    } catch {
      const parent = dirname(p)
      if (parent === p) break
      p = parent
    }
  }
  return { totalMiB: null, freeMiB: null }
}

function withTimeout<T>(p: Promise<T>, ms: number, fallback: T): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([
    p.catch(() => fallback),
    new Promise<T>((resolve) => (timer = setTimeout(() => resolve(fallback), ms))),
  ]).finally(() => clearTimeout(timer))
}

export async function probeSystem(options: SystemProbeOptions): Promise<SystemInfo> {
  const plat = options.platform ?? platform()
  const kernel = options.kernelRelease ?? release()
  let distro = plat as string
  let distroId: string | null = null
  if (plat === 'linux') {
    const text = options.osRelease ?? (await readFile('/etc/os-release', 'utf8').catch(() => ''))
    const os = parseOsRelease(text)
    distroId = os.id
    distro = os.pretty ?? 'Linux'
  } else {
    const info = await withTimeout(si.osInfo(), options.timeoutMs, null)
    if (info != null) distro = `${info.distro} ${info.release}`.trim()
  }
  const cpuList = cpus()
  const physical = await withTimeout(
    si.cpu().then((c) => c.physicalCores),
    options.timeoutMs,
    cpuList.length,
  )
  return {
    os: { platform: plat, distro, distroId, release: kernel, kernel, arch: arch() },
    wsl2: plat === 'linux' && isWsl2(kernel, options.env),
    cpu: {
      model: cpuList[0]?.model.trim() ?? 'unknown',
      cores: physical || cpuList.length,
      threads: cpuList.length,
    },
    memory: { totalMiB: Math.floor(totalmem() / 2 ** 20), freeMiB: Math.floor(freemem() / 2 ** 20) },
    disk: { path: options.dataDir, ...(await diskFree(options.dataDir)) },
  }
}
