import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { ApiKeyStore, authCacheTtlMs, hashApiKey } from '../../federation/keys.ts'
import { federationDataDir, federationDbPath } from '../../federation/store.ts'
import { migrations, openFederationStore, type SqliteStore } from '../../federation/store-sqlite.ts'

describe('API keys', () => {
  let dir: string
  let store: SqliteStore
  let db: SqliteStore['db']
  let clock: number
  let keys: ApiKeyStore

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-keys-'))
    store = openFederationStore(dir)
    db = store.db
    clock = Date.parse('2025-03-01T12:00:00Z')
    keys = new ApiKeyStore(store, { now: () => clock })
  })
  afterEach(async () => {
    if (db.isOpen) db.close()
    await rm(dir, { recursive: true, force: true })
  })

  it('creates a key that authenticates, with its limits, and stops it at revocation', async () => {
    const created = await keys.create({ name: 'alice', rpm: 60, tpm: 10_000 })
    expect(created.key).toMatch(/^gk_[A-Za-z0-9_-]{43}$/)
    expect(created.prefix).toBe(created.key.slice(3, 11))
    expect(created.limits).toEqual({ rpm: 60, tpm: 10_000, concurrency: null })
    expect(created.createdAt.toISOString()).toBe('2025-03-01T12:00:00.000Z')

    const info = await keys.authenticate(created.key)
    expect(info).toMatchObject({ id: created.id, name: 'alice', revokedAt: null })
    expect(info).not.toHaveProperty('key')
    expect(await keys.authenticate(`${created.key.slice(0, -1)}x`)).toBeNull()
    expect(await keys.authenticate('not-a-key')).toBeNull()
    expect(await keys.authenticate('')).toBeNull()

    clock += 1000
    const revoked = await keys.revoke('alice')
    expect(revoked.revokedAt?.toISOString()).toBe('2025-03-01T12:00:01.000Z')
    expect(await keys.authenticate(created.key)).toBeNull()
  })

  it('notices a revocation made by another process within the cache time, or at once after invalidate()', async () => {
    const created = await keys.create({ name: 'bob' })
    expect((await keys.authenticate(created.key))?.id).toBe(created.id)
    // What `garage keys revoke` does from another process: another store on the same file.
    const otherDb = openFederationStore(dir)
    const other = new ApiKeyStore(otherDb, { now: () => clock })
    await other.revoke(created.id)
    expect((await keys.authenticate(created.key))?.id).toBe(created.id)
    keys.invalidate()
    expect(await keys.authenticate(created.key)).toBeNull()

    const second = await keys.create({ name: 'bob' })
    expect((await keys.authenticate(second.key))?.id).toBe(second.id)
    await other.revoke('bob')
    clock += authCacheTtlMs
    expect(await keys.authenticate(second.key)).toBeNull()
    await otherDb.close()
  })

  it('stores only the hash of a key', async () => {
    const created = await keys.create({ name: 'carol' })
    db.close()
    // The database and its WAL: the key text must be in neither.
    const files = (await readdir(dir)).filter((f) => f.startsWith('federation.db'))
    const bytes = Buffer.concat(await Promise.all(files.map((f) => readFile(join(dir, f)))))
    expect(bytes.includes(Buffer.from(created.key))).toBe(false)
    expect(bytes.includes(Buffer.from(created.key.slice(3)))).toBe(false)
    expect(bytes.includes(Buffer.from(hashApiKey(created.key)))).toBe(true)
  })

  it('lists keys without their secrets, revoked ones included', async () => {
    const a = await keys.create({ name: 'a', concurrency: 2 })
    clock += 1
    await keys.create({ name: 'b' })
    await keys.revoke(a.prefix)
    const list = await keys.list()
    expect(list.map((k) => [k.name, k.revokedAt != null])).toEqual([
      ['a', true],
      ['b', false],
    ])
    const text = JSON.stringify(list)
    expect(text).not.toContain(a.key)
    expect(text).not.toContain(hashApiKey(a.key))
    expect(Object.keys(list[0]!).sort()).toEqual(['createdAt', 'id', 'limits', 'name', 'prefix', 'revokedAt'])
  })

  it('validates names and limits, and keeps active names unique', async () => {
    for (const name of ['', 'x'.repeat(65), 'tab\there', 'new\nline', ' padded', 'padded ', '\u200b'])
      await expect(keys.create({ name }), JSON.stringify(name)).rejects.toThrow(
        expect.objectContaining({ name: 'ApiKeyNameError' }),
      )
    expect((await keys.create({ name: 'x'.repeat(64) })).name).toHaveLength(64)
    expect((await keys.create({ name: 'équipe données #2' })).name).toBe('équipe données #2')
    for (const rpm of [0, -1, 1.5, Number.NaN])
      await expect(keys.create({ name: `rpm ${rpm}`, rpm })).rejects.toThrow(
        expect.objectContaining({ name: 'ApiKeyLimitError' }),
      )

    await keys.create({ name: 'dup' })
    await expect(keys.create({ name: 'dup' })).rejects.toThrow(
      expect.objectContaining({ name: 'ApiKeyNameTakenError' }),
    )
    await keys.revoke('dup')
    expect((await keys.create({ name: 'dup' })).name).toBe('dup')
  })

  it('revokes by id, prefix (with or without gk_) or name, and says when none or several match', async () => {
    const a = await keys.create({ name: 'one' })
    const b = await keys.create({ name: 'two' })
    const c = await keys.create({ name: 'three' })
    expect((await keys.revoke(a.id)).id).toBe(a.id)
    expect((await keys.revoke(`gk_${b.prefix}`)).id).toBe(b.id)
    expect((await keys.revoke(c.prefix)).id).toBe(c.id)
    await expect(keys.revoke('nobody')).rejects.toThrow(
      expect.objectContaining({ name: 'ApiKeyNotFoundError' }),
    )
    await expect(keys.revoke('one')).rejects.toThrow(
      expect.objectContaining({ name: 'ApiKeyAlreadyRevokedError' }),
    )

    // Two keys whose prefix equals another's name: ambiguous, and the message lists both ids.
    const d = await keys.create({ name: 'dee' })
    const e = await keys.create({ name: d.prefix })
    await expect(keys.revoke(d.prefix)).rejects.toThrow(
      expect.objectContaining({ name: 'ApiKeyAmbiguousError' }),
    )
    await expect(keys.revoke(d.prefix)).rejects.toThrow(new RegExp(`${d.id}.*${e.id}|${e.id}.*${d.id}`))
  })

  it('makes the database file 0600 in <data dir>/federation by default', async () => {
    await keys.create({ name: 'mode' })
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
