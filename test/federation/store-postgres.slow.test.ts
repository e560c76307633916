import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ApiKeyStore, authCacheTtlMs } from '../../federation/keys.ts'
import { UsageLedger, type UsageRecord } from '../../federation/ledger.ts'
import { type FederationStore, FederationStoreUnavailableError, openStore } from '../../federation/store.ts'
import { openPostgresStore, type PostgresStore, postgresMigrations } from '../../federation/store-postgres.ts'
import { openFederationStore } from '../../federation/store-sqlite.ts'
import { garage } from '../helpers/cli.ts'
import { startTestPostgres, type TestPostgres } from '../helpers/postgres.ts'

const node = '12D3KooWNodeNodeNodeNodeNodeNodeNodeNodeNodeNodeNode1'
const entry = (keyId: string, over: Partial<UsageRecord> = {}): UsageRecord => ({
  keyId,
  model: 'garage-tiny',
  region: 'eu-north',
  node,
  promptTokens: 10,
  completionTokens: 20,
  ...over,
})

/** The PostgreSQL store on a real server: what SQLite does, the same way, plus what only a shared store must do. */
describe('the PostgreSQL store', () => {
  let pg: TestPostgres
  let dir: string
  const opened: FederationStore[] = []
  /** A database of its own per test: postgres://.../<name>. */
  const database = async (name: string): Promise<string> => {
    const admin = await openPostgresStore(pg.url)
    try {
      await admin.query(`CREATE DATABASE ${name}`)
    } finally {
      await admin.close()
    }
    return pg.url.replace(/\/postgres$/, `/${name}`)
  }
  const open = async (url: string): Promise<PostgresStore> => {
    const store = await openPostgresStore(url)
    opened.push(store)
    return store
  }

  beforeAll(async () => {
    pg = await startTestPostgres()
    dir = await mkdtemp(join(tmpdir(), 'garage-pg-store-'))
  }, 60_000)
  afterAll(async () => {
    for (const s of opened) await s.close()
    await pg?.destroy()
    if (dir != null) await rm(dir, { recursive: true, force: true })
  })

  it('migrates once when two gateways start at the same moment, and keeps keys as SQLite does', async () => {
    const url = await database('keys_test')
    const [a, b] = await Promise.all([open(url), open(url)])
    expect(await a.schemaVersion()).toBe(postgresMigrations.length)
    let clock = Date.parse('2025-03-01T12:00:00Z')
    const keysA = new ApiKeyStore(a, { now: () => clock })
    const keysB = new ApiKeyStore(b, { now: () => clock })
    const created = await keysA.create({ name: 'alice', rpm: 60, concurrency: 2 })
    expect(await keysB.authenticate(created.key)).toMatchObject({
      id: created.id,
      limits: { rpm: 60, tpm: null, concurrency: 2 },
    })
    await expect(keysB.create({ name: 'alice' })).rejects.toThrow(
      expect.objectContaining({ name: 'ApiKeyNameTakenError' }),
    )
    expect((await keysB.find(`gk_${created.prefix}`)).id).toBe(created.id)
    clock += 1000
    await keysA.revoke('alice')
    // Another gateway notices within its cache time.
    expect((await keysB.authenticate(created.key))?.id).toBe(created.id)
    clock += authCacheTtlMs
    expect(await keysB.authenticate(created.key)).toBeNull()
    expect((await keysB.create({ name: 'alice' })).name).toBe('alice')
    expect((await keysA.list()).map((k) => [k.name, k.revokedAt != null])).toEqual([
      ['alice', true],
      ['alice', false],
    ])
  })

  it('adds the ledgers of two gateways up, and writes a batch whose commit answer was lost only once', async () => {
    const url = await database('ledger_test')
    const [a, b] = [await open(url), await open(url)]
    const ledgerA = new UsageLedger(a)
    const ledgerB = new UsageLedger(b)
    for (let i = 0; i < 50; i++) {
      ledgerA.record(entry('key_a'))
      ledgerB.record(entry('key_a', { requests: i % 2 === 0 ? 1 : 0, completionTokens: 3 }))
    }
    await Promise.all([ledgerA.flush(), ledgerB.flush()])
    expect(await ledgerA.usageByKey()).toEqual([
      {
        keyId: 'key_a',
        keyName: null,
        model: 'garage-tiny',
        requests: 75,
        promptTokens: 1000,
        completionTokens: 1150,
      },
    ])
    expect(await ledgerB.totals()).toMatchObject({ requests: 75, creditedRequests: 75, creditedTokens: 1150 })
    const batch = {
      id: '00000000-0000-4000-8000-000000000001',
      usage: [
        {
          day: '2025-03-01',
          keyId: 'key_b',
          model: 'm',
          requests: 1,
          promptTokens: 2,
          completionTokens: 3,
        },
      ],
      credits: [],
    }
    await a.writeLedger(batch)
    await b.writeLedger(batch)
    expect(await a.usageByKey({ keyId: 'key_b' })).toEqual([
      { keyId: 'key_b', keyName: null, model: 'm', requests: 1, promptTokens: 2, completionTokens: 3 },
    ])
    expect(await a.usageByKey({ since: '2025-03-02', keyId: 'key_b' })).toEqual([])
  })

  it("holds a quarantined node's credits as SQLite does: one hold per quarantine, updated, seen by every gateway", async () => {
    const url = await database('holds_test')
    const [a, b] = [await open(url), await open(url)]
    const ledgerA = new UsageLedger(a)
    const ledgerB = new UsageLedger(b)
    ledgerA.record(entry('key_a'))
    ledgerA.record(entry('key_a', { node: `${node.slice(0, -1)}2` }))
    await ledgerA.flush()
    const hold = {
      node,
      region: 'eu-north',
      since: Date.parse('2025-03-01T12:00:00Z'),
      reason: '3 of 5 checked answers were unlikely under garage-tiny',
      tokens: 120,
    }
    // Two gateways hear the same head: the hold is kept once, with the newest count.
    await ledgerA.recordHolds('eu-north', [hold])
    await ledgerB.recordHolds('eu-north', [{ ...hold, tokens: 130 }])
    expect(await ledgerA.holds()).toEqual([{ ...hold, tokens: 130 }])
    expect(await ledgerB.holds({ node: 'someone-else' })).toEqual([])
    const credits = await ledgerB.creditsByNode()
    expect(credits.find((c) => c.node === node)!.held).toEqual({
      since: '2025-03-01T12:00:00.000Z',
      reason: hold.reason,
      tokens: 130,
    })
    expect(credits.find((c) => c.node !== node)!.held).toBeNull()
  })

  it('holds rpm and concurrency for two gateways together, and frees a dead gateway’s slots after the lease', async () => {
    const url = await database('limits_test')
    const [a, b, c] = [await open(url), await open(url), await open(url)]
    const limiterA = a.createLimiter()
    const limiterB = b.createLimiter()
    try {
      const rpmKey = { id: 'key_rpm', limits: { rpm: 10, tpm: null, concurrency: null } }
      const decisions = await Promise.all(
        Array.from({ length: 30 }, (_, i) => (i % 2 === 0 ? limiterA : limiterB).check(rpmKey)),
      )
      expect(decisions.filter((d) => d.ok)).toHaveLength(10)
      // Admitted one after another across both: each saw the ones before it, whichever gateway.
      expect(
        decisions
          .filter((d) => d.ok)
          .map((d) => Number(d.headers['x-ratelimit-remaining-requests']))
          .sort((x, y) => x - y),
      ).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
      const refused = decisions.find((d) => !d.ok)
      expect(refused).toMatchObject({ ok: false, reason: 'rpm' })
      expect(refused?.headers['x-ratelimit-remaining-requests']).toBe('0')
      expect(Number(refused?.headers['retry-after'])).toBeGreaterThanOrEqual(1)

      const concKey = { id: 'key_conc', limits: { rpm: null, tpm: null, concurrency: 2 } }
      const held = await Promise.all(
        Array.from({ length: 8 }, (_, i) => (i % 2 === 0 ? limiterA : limiterB).check(concKey)),
      )
      const admitted = held.filter((d) => d.ok)
      expect(admitted).toHaveLength(2)
      expect(held.find((d) => !d.ok)).toMatchObject({ reason: 'concurrency', retryAfterSeconds: 1 })
      for (const d of admitted) if (d.ok) d.release()
      // Released slots are given back within a turn and a round trip.
      await expect.poll(async () => (await limiterB.check(concKey)).ok, { timeout: 5_000 }).toBe(true)

      // tpm: tokens charged by one gateway count at the other.
      const tpmKey = { id: 'key_tpm', limits: { rpm: null, tpm: 100, concurrency: null } }
      expect((await limiterA.check(tpmKey)).ok).toBe(true)
      limiterA.record('key_tpm', 150)
      await expect.poll(async () => (await limiterB.check(tpmKey)).ok, { timeout: 5_000 }).toBe(false)

      // A gateway that dies holding a slot: its lease is not renewed and expires.
      const shortLived = c.createLimiter({ slotTtlMs: 1_500 })
      const deadKey = { id: 'key_dead', limits: { rpm: null, tpm: null, concurrency: 1 } }
      expect((await shortLived.check(deadKey)).ok).toBe(true)
      await c.close() // no release, no renewal: as if SIGKILLed
      expect((await limiterA.check(deadKey)).ok).toBe(false)
      const started = performance.now()
      await expect
        .poll(async () => (await limiterA.check(deadKey)).ok, { timeout: 10_000, interval: 200 })
        .toBe(true)
      expect(performance.now() - started).toBeGreaterThan(500)
    } finally {
      await limiterA.close()
      await limiterB.close()
    }
  })

  it('says when the server is away, and writes the buffered ledger once it is back', async () => {
    const url = await database('outage_test')
    const store = await open(url)
    const keys = new ApiKeyStore(store)
    const key = await keys.create({ name: 'outage' })
    const ledger = new UsageLedger(store, { retryIntervalMs: 200 })
    await pg.stopServer()
    try {
      ledger.record(entry(key.id, { completionTokens: 7 }))
      await expect(ledger.flush()).rejects.toThrow(FederationStoreUnavailableError)
      expect(store.available).toBe(false)
      ledger.record(entry(key.id, { completionTokens: 5 }))
      expect(ledger.pending).toBe(4)
      await expect(keys.find('outage')).rejects.toThrow(
        /cannot reach PostgreSQL at postgresql:\/\/garage@127\.0\.0\.1/,
      )
    } finally {
      await pg.startServer()
    }
    await expect.poll(() => store.available, { timeout: 10_000 }).toBe(true)
    await expect.poll(() => ledger.pending, { timeout: 10_000 }).toBe(0)
    expect(await ledger.usageByKey()).toEqual([
      expect.objectContaining({ keyName: 'outage', requests: 2, promptTokens: 20, completionTokens: 12 }),
    ])
    await ledger.close()
  }, 60_000)

  it('garage federation migrate-store moves a SQLite store into PostgreSQL; keys and ledger commands use it', async () => {
    const url = await database('migrate_test')
    const dataDir = join(dir, 'federation')
    const sqlite = openFederationStore(dataDir)
    const created = await new ApiKeyStore(sqlite).create({ name: 'ci', rpm: 60 })
    const ledger = new UsageLedger(sqlite)
    ledger.record(entry(created.id, { at: Date.parse('2025-03-01T10:00:00Z') }))
    await ledger.close()
    await sqlite.close()

    const moved = await garage(['federation', 'migrate-store', '--to', url, '--data-dir', dataDir])
    expect(moved.code, moved.stderr).toBe(0)
    expect(moved.stdout).toContain('copied 1 keys, 1 usage rows, 1 credit rows')
    const again = await garage(['federation', 'migrate-store', '--to', url, '--data-dir', dataDir])
    expect(again.code).toBe(0)
    expect(again.stdout).toContain('nothing to do')

    // The key made in SQLite authenticates against PostgreSQL: its hash moved with it.
    const store = await openStore({ dataDir, database: url })
    opened.push(store)
    expect((await new ApiKeyStore(store).authenticate(created.key))?.name).toBe('ci')

    const env = { GARAGE_DATABASE_URL: url }
    const list = await garage(['keys', 'list', '--json'], env)
    expect(JSON.parse(list.stdout)).toEqual([
      expect.objectContaining({ id: created.id, name: 'ci', rpm: 60 }),
    ])
    const made = await garage(['keys', 'create', '--name', 'second', '--database', url])
    expect(made.code).toBe(0)
    expect(made.stderr).toContain('postgresql://garage@127.0.0.1')
    const json = JSON.parse((await garage(['ledger', '--json', '--database', url])).stdout)
    expect(json.totals).toMatchObject({
      requests: 1,
      promptTokens: 10,
      completionTokens: 20,
      creditedTokens: 20,
    })

    // The target now differs from the file: a second copy is refused, naming what is there.
    const refused = await garage(['federation', 'migrate-store', '--to', url, '--data-dir', dataDir])
    expect(refused.code).toBe(1)
    expect(refused.stderr).toContain('already holds other data (2 keys')

    const badUrl = await garage(['keys', 'list', '--database', 'mysql://x@y/z'])
    expect(badUrl.code).toBe(2)
    expect(badUrl.stderr).toContain('must be a PostgreSQL URL')
  }, 60_000)
})
