import { randomBytes } from 'node:crypto'
import { constants } from 'node:fs'
import { chmod, mkdir, open, readFile, stat } from 'node:fs/promises'
import { dirname } from 'node:path'
import { GarageError } from './errors.ts'

export class SecretFilePermissionsError extends GarageError {}

/**
 * Throws `make(message)` when other users could read the file at `path` (any group or other bit):
 * a token or key they can read is theirs. Windows has no such bits.
 */
export async function refuseReadableByOthers(
  path: string,
  what: string,
  make: (message: string) => GarageError,
): Promise<void> {
  const info = await stat(path)
  if (process.platform === 'win32' || (info.mode & 0o077) === 0) return
  const mode = (info.mode & 0o777).toString(8).padStart(3, '0')
  throw make(`${what} ${path} has mode ${mode}, so other users can read it; run: chmod 600 '${path}'`)
}

/**
 * The secret in a file the user provides (a Hugging Face token): trimmed; undefined when the file is
 * missing or empty; `make(message)` thrown when other users can read it.
 */
export async function readSecretIfPresent(
  path: string,
  what: string,
  make: (message: string) => GarageError,
): Promise<string | undefined> {
  try {
    await refuseReadableByOthers(path, what, make)
    const text = (await readFile(path, 'utf8')).trim()
    return text === '' ? undefined : text
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw err
  }
}

/**
 * A bearer token in a 0600 file, made on first use and kept across restarts (the control API token,
 * the head's API token). A file other users can read is refused, as identity keys are.
 */
export async function loadOrCreateSecret(path: string, bytes = 32): Promise<string> {
  try {
    await refuseReadableByOthers(
      path,
      'secret file',
      (message) => new SecretFilePermissionsError(message, 'SECRET_FILE_PERMISSIONS'),
    )
    const text = (await readFile(path, 'utf8')).trim()
    if (text.length < 16)
      throw new GarageError(
        `secret file ${path} holds no usable secret; delete it to make a new one`,
        'SECRET_FILE_INVALID',
      )
    return text
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
  }
  const secret = randomBytes(bytes).toString('base64url')
  await mkdir(dirname(path), { recursive: true, mode: 0o700 })
  try {
    const handle = await open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600)
    try {
      await handle.writeFile(`${secret}\n`)
    } finally {
      await handle.close()
    }
  } catch (err) {
    // Another process made it first: use theirs.
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return (await readFile(path, 'utf8')).trim()
    throw new GarageError(
      `cannot write secret file ${path}: ${(err as Error).message}`,
      'SECRET_FILE_WRITE',
      {
        cause: err,
      },
    )
  }
  await chmod(path, 0o600)
  return secret
}
