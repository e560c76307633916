import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { DatabaseSync } from 'node:sqlite'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { ApiKeyStore, authCacheTtlMs, hashApiKey } from '../../federation/keys.ts'
import {
  federationDataDir,
  federationDbPath,
  migrations,
  openFederationStore,
} from '../../federation/store.ts'

describe('API keys', () => {
  let dir: string
  let db: DatabaseSync
  let clock: number
  let keys: ApiKeyStore

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-keys-'))
    db = openFederationStore(dir)
    clock = Date.parse('2025-03-01T12:00:00Z')
    keys = new ApiKeyStore(db, { now: () => clock })
  })
  afterEach(async () => {
    if (db.isOpen) db.close()
    await rm(dir, { recursive: true, force: true })
  })

  it('creates a key that authenticates, with its limits, and stops it at revocation', () => {
    const created = keys.create({ name: 'alice', rpm: 60, tpm: 10_000 })
    expect(created.key).toMatch(/^gk_[A-Za-z0-9_-]{43}$/)
    expect(created.prefix).toBe(created.key.slice(3, 11))
    expect(created.limits).toEqual({ rpm: 60, tpm: 10_000, concurrency: null })
    expect(created.createdAt.toISOString()).toBe('2025-03-01T12:00:00.000Z')

    const info = keys.authenticate(created.key)
    expect(info).toMatchObject({ id: created.id, name: 'alice', revokedAt: null })
    expect(info).not.toHaveProperty('key')
    expect(keys.authenticate(`${created.key.slice(0, -1)}x`)).toBeNull()
    expect(keys.authenticate('not-a-key')).toBeNull()
    expect(keys.authenticate('')).toBeNull()

    clock += 1000
    const revoked = keys.revoke('alice')
    expect(revoked.revokedAt?.toISOString()).toBe('2025-03-01T12:00:01.000Z')
    expect(keys.authenticate(created.key)).toBeNull()
  })

  it('notices a revocation made by another process within the cache time, or at once after invalidate()', () => {
    const created = keys.create({ name: 'bob' })
    expect(keys.authenticate(created.key)?.id).toBe(created.id)
    // What `garage keys revoke` does from another process: another store on the same file.
    const otherDb = openFederationStore(dir)
    const other = new ApiKeyStore(otherDb, { now: () => clock })
    other.revoke(created.id)
    expect(keys.authenticate(created.key)?.id).toBe(created.id)
    keys.invalidate()
    expect(keys.authenticate(created.key)).toBeNull()

    const second = keys.create({ name: 'bob' })
    expect(keys.authenticate(second.key)?.id).toBe(second.id)
    other.revoke('bob')
    clock += authCacheTtlMs
    expect(keys.authenticate(second.key)).toBeNull()
    otherDb.close()
  })

  it('stores only the hash of a key', async () => {
    const created = keys.create({ name: 'carol' })
    db.close()
    // The database and its WAL: the key text must be in neither.
    const files = (await readdir(dir)).filter((f) => f.startsWith('federation.db'))
    const bytes = Buffer.concat(await Promise.all(files.map((f) => readFile(join(dir, f)))))
    expect(bytes.includes(Buffer.from(created.key))).toBe(false)
    expect(bytes.includes(Buffer.from(created.key.slice(3)))).toBe(false)
    expect(bytes.includes(Buffer.from(hashApiKey(created.key)))).toBe(true)
  })

  it('lists keys without their secrets, revoked ones included', () => {
    const a = keys.create({ name: 'a', concurrency: 2 })
    clock += 1
    keys.create({ name: 'b' })
    keys.revoke(a.prefix)
    const list = keys.list()
    expect(list.map((k) => [k.name, k.revokedAt != null])).toEqual([
      ['a', true],
      ['b', false],
    ])
    const text = JSON.stringify(list)
    expect(text).not.toContain(a.key)
    expect(text).not.toContain(hashApiKey(a.key))
    expect(Object.keys(list[0]!).sort()).toEqual(['createdAt', 'id', 'limits', 'name', 'prefix', 'revokedAt'])
  })

  it('validates names and limits, and keeps active names unique', () => {
    for (const name of ['', 'x'.repeat(65), 'tab\there', 'new\nline', ' padded', 'padded ', '\u200b'])
      expect(() => keys.create({ name }), JSON.stringify(name)).toThrow(
        expect.objectContaining({ name: 'ApiKeyNameError' }),
      )
    expect(keys.create({ name: 'x'.repeat(64) }).name).toHaveLength(64)
    expect(keys.create({ name: 'équipe données #2' }).name).toBe('équipe données #2')
    for (const rpm of [0, -1, 1.5, Number.NaN])
      expect(() => keys.create({ name: `rpm ${rpm}`, rpm })).toThrow(
        expect.objectContaining({ name: 'ApiKeyLimitError' }),
      )

    keys.create({ name: 'dup' })
    expect(() => keys.create({ name: 'dup' })).toThrow(
      expect.objectContaining({ name: 'ApiKeyNameTakenError' }),
    )
    keys.revoke('dup')
    expect(keys.create({ name: 'dup' }).name).toBe('dup')
  })

  it('revokes by id, prefix (with or without gk_) or name, and says when none or several match', () => {
    const a = keys.create({ name: 'one' })
    const b = keys.create({ name: 'two' })
    const c = keys.create({ name: 'three' })
    expect(keys.revoke(a.id).id).toBe(a.id)
    expect(keys.revoke(`gk_${b.prefix}`).id).toBe(b.id)
    expect(keys.revoke(c.prefix).id).toBe(c.id)
    expect(() => keys.revoke('nobody')).toThrow(expect.objectContaining({ name: 'ApiKeyNotFoundError' }))
    expect(() => keys.revoke('one')).toThrow(expect.objectContaining({ name: 'ApiKeyAlreadyRevokedError' }))

    // Two keys whose prefix equals another's name: ambiguous, and the message lists both ids.
    const d = keys.create({ name: 'dee' })
    const e = keys.create({ name: d.prefix })
    expect(() => keys.revoke(d.prefix)).toThrow(expect.objectContaining({ name: 'ApiKeyAmbiguousError' }))
    expect(() => keys.revoke(d.prefix)).toThrow(new RegExp(`${d.id}.*${e.id}|${e.id}.*${d.id}`))
  })

  it('makes the database file 0600 in <data dir>/federation by default', async () => {
    keys.create({ name: 'mode' })
    expect((await stat(federationDbPath(dir))).mode & 0o777).toBe(0o600)
    expect((await stat(`${federationDbPath(dir)}-wal`)).mode & 0o777).toBe(0o600)
    expect(federationDataDir({ GARAGE_DATA_DIR: '/srv/garage' })).toBe(join('/srv/garage', 'federation'))
    expect(federationDataDir({ GARAGE_DATA_DIR: '/srv/garage' }, '/elsewhere')).toBe('/elsewhere')
  })

  it('migrates by user_version, refuses a newer schema and a missing file when asked not to create', async () => {
    expect(db.prepare('PRAGMA user_version').get()?.user_version).toBe(migrations.length)
    expect(db.prepare('PRAGMA journal_mode').get()?.journal_mode).toBe('wal')
    expect(Number(db.prepare('PRAGMA busy_timeout').get()?.timeout)).toBeGreaterThan(0)
    db.exec(`PRAGMA user_version = ${migrations.length + 1}`)
    db.close()
    expect(() => openFederationStore(dir)).toThrow(
      expect.objectContaining({ name: 'FederationStoreVersionError' }),
    )
    expect(() => openFederationStore(join(dir, 'nowhere'), { create: false })).toThrow(
      expect.objectContaining({ name: 'FederationStoreMissingError' }),
    )
    const junk = join(dir, 'junk')
    await mkdir(junk)
    await writeFile(federationDbPath(junk), 'this is not a database, it is just text long enough')
    expect(() => openFederationStore(junk)).toThrow(expect.objectContaining({ name: 'FederationStoreError' }))
  })
})
