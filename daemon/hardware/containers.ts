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

/** CDI spec files and the `nvidia.com/gpu` devices they declare (what --device nvidia.com/gpu=all needs). */
export async function probeNvidiaContainerPath(
  options: ToolOptions & { cdiDirs?: string[] },
): Promise<NvidiaContainerPath> {
  const files: string[] = []
  const devices = new Set<string>()
  for (const dir of options.cdiDirs ?? defaultCdiDirs) {
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
