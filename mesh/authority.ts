import { join } from 'node:path'
import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { GarageError } from '../core/errors.ts'
import { loadKeyFile, saveKeyFile } from './identity.ts'

export const authorityKeyFileName = 'authority.key'

export class AuthorityExistsError extends GarageError {}
export class AuthorityMissingError extends GarageError {}

export interface Authority {
  key: PrivateKey
  /** The public key in PeerId form: what nodes pin as `--authority`. */
  id: string
  path: string
}

/** Creates the federation authority key; refuses to replace one (every certificate hangs on it). */
export async function initAuthority(dir: string): Promise<Authority> {
  const path = join(dir, authorityKeyFileName)
  const key = await generateKeyPair('Ed25519')
  try {
    await saveKeyFile(path, key)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new AuthorityExistsError(
        `an authority key already exists at ${path}; remove it first if you really mean to replace it`,
        'AUTHORITY_EXISTS',
      )
    }
    throw err
  }
  return { key, id: peerIdFromPrivateKey(key).toString(), path }
}

export async function loadAuthority(dir: string): Promise<Authority> {
  const path = join(dir, authorityKeyFileName)
  try {
    const key = await loadKeyFile(path)
    return { key, id: peerIdFromPrivateKey(key).toString(), path }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new AuthorityMissingError(
        `no authority key at ${path}; create one with: garage authority init`,
        'AUTHORITY_MISSING',
      )
    }
    throw err
  }
}
