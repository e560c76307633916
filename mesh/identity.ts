import { constants } from 'node:fs'
import { chmod, mkdir, open, readFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } from '@libp2p/crypto/keys'
import type { Ed25519PrivateKey, PrivateKey } from '@libp2p/interface'
import { GarageError } from '../core/errors.ts'
import { refuseReadableByOthers } from '../core/secret-file.ts'

export class IdentityKeyPermissionsError extends GarageError {}
export class IdentityKeyInvalidError extends GarageError {}

export const identityFileName = 'identity.key'

/**
 * Loads a private key file written by {@link saveKeyFile}, refusing one that other users could read:
 * whoever holds the key is this node on the mesh.
 */
export async function loadKeyFile(path: string): Promise<PrivateKey> {
  await refuseReadableByOthers(
    path,
    'key file',
    (message) => new IdentityKeyPermissionsError(message, 'KEY_FILE_PERMISSIONS'),
  )
  const bytes = await readFile(path)
  try {
    return privateKeyFromProtobuf(bytes)
  } catch (err) {
    throw new IdentityKeyInvalidError(
      `key file ${path} is not a libp2p private key: ${(err as Error).message}`,
      'KEY_FILE_INVALID',
      {
        cause: err,
      },
    )
  }
}

/** Writes a key with mode 0600, never replacing an existing file. */
export async function saveKeyFile(path: string, key: PrivateKey): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o700 })
  const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL
  const handle = await open(path, flags, 0o600)
  try {
    await handle.writeFile(privateKeyToProtobuf(key))
  } finally {
    await handle.close()
  }
  // The umask may have narrowed the mode but never widens it; make it exact anyway.
  await chmod(path, 0o600)
}

/** The node's persistent Ed25519 identity: `<dataDir>/identity.key`, created on first use. */
export async function loadOrCreateIdentity(dataDir: string): Promise<PrivateKey> {
  const path = join(dataDir, identityFileName)
  try {
    return await loadKeyFile(path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
  }
  const key: Ed25519PrivateKey = await generateKeyPair('Ed25519')
  try {
    await saveKeyFile(path, key)
  } catch (err) {
    // Another process created it between our read and write: use theirs.
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return loadKeyFile(path)
    throw new GarageError(`cannot write identity ${path}: ${(err as Error).message}`, 'KEY_FILE_WRITE', {
      cause: err,
    })
  }
  return key
}
