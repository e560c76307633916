import { randomBytes } from 'node:crypto'
import { chmod, mkdir, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { ContainerSpecError } from './errors.ts'

export interface SecretEnvFile {
  path: string
  /** Deletes the file; the container keeps the values it was created with. */
  remove(): Promise<void>
}

/**
 * Writes secrets (the Ray token, a Hugging Face token) as KEY=value lines to a new 0600 file in a
 * 0700 folder, for `--env-file`: the values never appear on a command line, where every local user
 * can read them in `ps`, nor in labels.
 */
export async function writeSecretEnvFile(
  dir: string,
  entries: Record<string, string>,
): Promise<SecretEnvFile> {
  const lines: string[] = []
  for (const [key, value] of Object.entries(entries)) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) {
      throw new ContainerSpecError(
        `environment variable name ${JSON.stringify(key)} is not allowed`,
        'CONTAINER_SPEC_INVALID',
      )
    }
    // The CLIs read each line literally: a line break would start another variable.
    if (/[\0\r\n]/.test(value)) {
      throw new ContainerSpecError(`the value of ${key} must be one line`, 'CONTAINER_SPEC_INVALID')
    }
    lines.push(`${key}=${value}`)
  }
  await mkdir(dir, { recursive: true, mode: 0o700 })
  await chmod(dir, 0o700)
  const path = join(dir, `${randomBytes(9).toString('base64url')}.env`)
  // 'wx': a file that already exists (planted by someone else) is an error, never reused.
  await writeFile(path, `${lines.join('\n')}\n`, { mode: 0o600, flag: 'wx' })
  return { path, remove: () => rm(path, { force: true }) }
}
