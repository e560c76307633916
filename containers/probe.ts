import { runTool } from '../core/tools.ts'
import type { ContainerRuntimeInfo } from './types.ts'

/** Probing Podman and Docker: installed, reachable, rootless, which GPU paths they offer. */

interface ToolOptions {
  timeoutMs: number
  env?: NodeJS.ProcessEnv
}

function json(text: string): Record<string, unknown> | null {
  try {
    const v = JSON.parse(text) as unknown
    return typeof v === 'object' && v != null ? (v as Record<string, unknown>) : null
  } catch {
    return null
  }
}

function firstLine(s: string): string | null {
  return (
    s
      .split(/\r?\n/)
      .find((l) => l.trim() !== '')
      ?.trim() ?? null
  )
}

const absent = (name: 'podman' | 'docker'): ContainerRuntimeInfo => ({
  name,
  installed: false,
  version: null,
  reachable: false,
  rootless: null,
  nvidiaRuntime: false,
  cdiEnabled: false,
  message: `${name} is not installed`,
})

export async function probePodman(options: ToolOptions): Promise<ContainerRuntimeInfo> {
  const version = await runTool('podman', ['--version'], options)
  if (version.status === 'not-found') return absent('podman')
  const v = /version\s+(\S+)/i.exec(version.stdout)?.[1] ?? null
  const info = await runTool('podman', ['info', '--format', 'json'], options)
  const doc = info.status === 'ok' ? json(info.stdout) : null
  const host = doc?.host as { security?: { rootless?: boolean } } | undefined
  return {
    name: 'podman',
    installed: true,
    version: v,
    reachable: doc != null,
    rootless: host?.security?.rootless ?? null,
    nvidiaRuntime: false,
    // Podman reads CDI specs natively (--device nvidia.com/gpu=all) since 4.1.
    cdiEnabled: doc != null,
    message: doc != null ? null : (firstLine(info.stderr) ?? `podman info: ${info.status}`),
  }
}

export async function probeDocker(options: ToolOptions): Promise<ContainerRuntimeInfo> {
  const version = await runTool('docker', ['version', '--format', '{{json .}}'], options)
  if (version.status === 'not-found') return absent('docker')
  const v = json(version.stdout)
  const client = v?.Client as { Version?: string } | undefined
  const info = await runTool('docker', ['info', '--format', '{{json .}}'], options)
  const doc = info.status === 'ok' ? json(info.stdout) : null
  // `docker info` prints ServerErrors instead of failing when the daemon is down.
  const serverErrors = (doc?.ServerErrors as string[] | undefined) ?? []
  const reachable = doc != null && serverErrors.length === 0 && v?.Server != null
  const runtimes = (doc?.Runtimes as Record<string, unknown> | undefined) ?? {}
  const security = (doc?.SecurityOptions as string[] | undefined) ?? []
  const cdiDirs = (doc?.CDISpecDirs as string[] | undefined) ?? []
  return {
    name: 'docker',
    installed: true,
    version: client?.Version ?? null,
    reachable,
    rootless: reachable ? security.some((s) => s.includes('rootless')) : null,
    nvidiaRuntime: reachable && Object.hasOwn(runtimes, 'nvidia'),
    cdiEnabled: reachable && cdiDirs.length > 0,
    message: reachable
      ? null
      : (serverErrors[0] ??
        firstLine(version.stderr) ??
        firstLine(info.stderr) ??
        'the Docker engine does not answer'),
  }
}
