import { readdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { parse as parseYaml } from 'yaml'
import { runTool } from '../../core/tools.ts'
import type { NvidiaContainerPath } from './types.ts'

interface ToolOptions {
  timeoutMs: number
  env?: NodeJS.ProcessEnv
}

export const defaultCdiDirs = ['/etc/cdi', '/var/run/cdi']

/**
 * The containers.conf files Podman reads, in the order it reads them (a later setting wins):
 * $CONTAINERS_CONF alone when set, else the distribution's, the system's and the user's; then
 * $CONTAINERS_CONF_OVERRIDE.
 */
export function containersConfFiles(env: NodeJS.ProcessEnv = process.env): string[] {
  const files =
    env.CONTAINERS_CONF != null && env.CONTAINERS_CONF !== ''
      ? [env.CONTAINERS_CONF]
      : [
          '/usr/share/containers/containers.conf',
          '/etc/containers/containers.conf',
          join(env.XDG_CONFIG_HOME ?? join(env.HOME ?? '/root', '.config'), 'containers', 'containers.conf'),
        ]
  if (env.CONTAINERS_CONF_OVERRIDE != null && env.CONTAINERS_CONF_OVERRIDE !== '')
    files.push(env.CONTAINERS_CONF_OVERRIDE)
  return files
}

/** `cdi_spec_dirs = [...]` of a containers.conf's [engine] table, or null when it sets none. */
export function cdiSpecDirsOf(conf: string): string[] | null {
  let table = ''
  let found: string[] | null = null
  for (const line of conf.split('\n')) {
    const header = /^\s*\[([^\]]+)\]\s*(#.*)?$/.exec(line)
    if (header != null) {
      table = header[1]!.trim()
      continue
    }
    const m = /^\s*cdi_spec_dirs\s*=\s*\[([^\]]*)\]/.exec(line)
    if (m != null && table === 'engine')
      found = [...m[1]!.matchAll(/"([^"]*)"|'([^']*)'/g)].map((q) => q[1] ?? q[2]!)
  }
  return found
}

/** Where Podman looks for CDI specs on this machine: containers.conf's cdi_spec_dirs, else the defaults. */
export async function cdiSpecDirs(env: NodeJS.ProcessEnv = process.env): Promise<string[]> {
  let dirs = defaultCdiDirs
  for (const file of containersConfFiles(env)) {
    const text = await readFile(file, 'utf8').catch(() => null)
    const set = text != null ? cdiSpecDirsOf(text) : null
    if (set != null) dirs = set
  }
  return dirs
}

/** CDI spec files and the `nvidia.com/gpu` devices they declare (what --device nvidia.com/gpu=all needs). */
export async function probeNvidiaContainerPath(
  options: ToolOptions & { cdiDirs?: string[] },
): Promise<NvidiaContainerPath> {
  const files: string[] = []
  const devices = new Set<string>()
  for (const dir of options.cdiDirs ?? (await cdiSpecDirs(options.env ?? process.env))) {
    const names = await readdir(dir).catch(() => [] as string[])
    for (const name of names.filter((n) => /\.(ya?ml|json)$/.test(n)).sort()) {
      const path = join(dir, name)
      const spec = await readFile(path, 'utf8')
        .then((text) => parseYaml(text) as { kind?: unknown; devices?: Array<{ name?: unknown }> })
        .catch(() => null)
      if (spec?.kind !== 'nvidia.com/gpu') continue
      files.push(path)
      for (const d of Array.isArray(spec.devices) ? spec.devices : []) {
        if (d?.name != null) devices.add(`nvidia.com/gpu=${String(d.name)}`)
      }
    }
  }
  const ctk = await runTool('nvidia-ctk', ['--version'], options)
  return { cdiSpecFiles: files, cdiDevices: [...devices].sort(), toolkitInstalled: ctk.status === 'ok' }
}
