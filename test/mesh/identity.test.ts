import { chmod, mkdtemp, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { afterEach, describe, expect, it } from 'vitest'
import {
  IdentityKeyInvalidError,
  IdentityKeyPermissionsError,
  identityFileName,
  loadOrCreateIdentity,
} from '../../mesh/identity.ts'

describe('persistent identity', () => {
  const dirs: string[] = []
  const tempDir = async (): Promise<string> => {
    const d = await mkdtemp(join(tmpdir(), 'garage-id-'))
    dirs.push(d)
    return d
  }
  afterEach(async () => {
    await Promise.all(dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })))
  })

  it('creates an Ed25519 key with mode 0600 and loads the same identity again', async () => {
    const dir = join(await tempDir(), 'nested', 'data')
    const first = await loadOrCreateIdentity(dir)
    expect(first.type).toBe('Ed25519')
    expect((await stat(join(dir, identityFileName))).mode & 0o777).toBe(0o600)
    const again = await loadOrCreateIdentity(dir)
    expect(peerIdFromPrivateKey(again).equals(peerIdFromPrivateKey(first))).toBe(true)
  })

  it('refuses a key file that others can read, saying how to fix it', async () => {
    const dir = await tempDir()
    await loadOrCreateIdentity(dir)
    const path = join(dir, identityFileName)
    await chmod(path, 0o644)
    const err = await loadOrCreateIdentity(dir).catch((e: Error) => e)
    expect(err).toBeInstanceOf(IdentityKeyPermissionsError)
    expect((err as Error).message).toContain(`chmod 600 '${path}'`)
    await chmod(path, 0o600)
    await expect(loadOrCreateIdentity(dir)).resolves.toBeTruthy()
  })

  it('refuses a corrupt key file instead of replacing it', async () => {
    const dir = await tempDir()
    const path = join(dir, identityFileName)
    await writeFile(path, 'not a key', { mode: 0o600 })
    await expect(loadOrCreateIdentity(dir)).rejects.toThrow(IdentityKeyInvalidError)
  })
})
