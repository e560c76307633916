import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'
import { ApiKeyStore } from '../../federation/keys.ts'
import {
  type KeyUsage,
  type LedgerTotals,
  ledgerRetryIntervalMs,
  type NodeCredit,
  parseLedgerDay,
  UsageLedger,
  type UsageRecord,
} from '../../federation/ledger.ts'
import type { CreditHold, LedgerBatch } from '../../federation/store.ts'
import { openFederationStore, type SqliteStore } from '../../federation/store-sqlite.ts'

const nodeA = '12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'
const nodeB = '12D3KooWBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'

describe('UsageLedger', () => {
  let dir: string
  const stores: SqliteStore[] = []
  let store: SqliteStore
  let clock: number
  let ledger: UsageLedger

  const open = (): SqliteStore => {
    const d = openFederationStore(dir)
    stores.push(d)
    return d
  }
  const rows = (table: string): unknown[] =>
    store.db
      .prepare(`SELECT * FROM ${table} ORDER BY 1, 2, 3`)
      .all()
      .map((r) => ({ ...r }))
  const entry = (over: Partial<UsageRecord> = {}): UsageRecord => ({
    keyId: 'key_a',
    model: 'garage-tiny',
    region: 'eu-north',
    node: nodeA,
    promptTokens: 10,
    completionTokens: 20,
    ...over,
  })

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-ledger-'))
    store = open()
    clock = Date.parse('2025-03-01T12:00:00Z')
    ledger = new UsageLedger(store, { now: () => clock })
  })
  afterEach(async () => {
    vi.useRealTimers()
    await ledger.close()
    for (const d of stores.splice(0)) await d.close()
    await rm(dir, { recursive: true, force: true })
  })

  it('sums records in memory and writes them in one flush, one row per key, model and day', async () => {
    for (let i = 0; i < 100; i++) ledger.record(entry())
    ledger.record(entry({ keyId: 'key_b', node: nodeB, promptTokens: 1, completionTokens: 2 }))
    ledger.record(entry({ model: 'other', node: null }))
    expect(rows('usage_daily')).toEqual([])
    expect(ledger.pending).toBe(5)
    await ledger.flush()
    expect(ledger.pending).toBe(0)
    expect(rows('usage_daily')).toEqual([
      {
        day: '2025-03-01',
        key_id: 'key_a',
        model: 'garage-tiny',
        requests: 100,
        prompt_tokens: 1000,
        completion_tokens: 2000,
      },
      {
        day: '2025-03-01',
        key_id: 'key_a',
        model: 'other',
        requests: 1,
        prompt_tokens: 10,
        completion_tokens: 20,
      },
      {
        day: '2025-03-01',
        key_id: 'key_b',
        model: 'garage-tiny',
        requests: 1,
        prompt_tokens: 1,
        completion_tokens: 2,
      },
    ])
    // A request no node served is billed but credits nobody.
    expect(rows('node_credits_daily')).toEqual([
      {
        day: '2025-03-01',
        node: nodeA,
        model: 'garage-tiny',
        region: 'eu-north',
        requests: 100,
        completion_tokens: 2000,
        prompt_tokens: 1000,
      },
      {
        day: '2025-03-01',
        node: nodeB,
        model: 'garage-tiny',
        region: 'eu-north',
        requests: 1,
        completion_tokens: 2,
        prompt_tokens: 1,
      },
    ])
    // The next flush adds to the rows.
    ledger.record(entry())
    await ledger.flush()
    expect((await ledger.usageByKey({ keyId: 'key_a' }))[0]).toMatchObject({
      model: 'garage-tiny',
      requests: 101,
    })
  })

  it('a stream billed as it streams: the first record counts the request, the later ones add tokens', async () => {
    ledger.record(entry({ requests: 1, promptTokens: 0, completionTokens: 3 }))
    ledger.record(entry({ requests: 0, promptTokens: 0, completionTokens: 4 }))
    ledger.record(entry({ requests: 0, promptTokens: 10, completionTokens: 1 }))
    await ledger.flush()
    expect(await ledger.usageByKey()).toEqual([
      expect.objectContaining({ keyId: 'key_a', requests: 1, promptTokens: 10, completionTokens: 8 }),
    ])
    expect(await ledger.creditsByNode()).toEqual([
      expect.objectContaining({ node: nodeA, requests: 1, promptTokens: 10, completionTokens: 8 }),
    ])
  })

  it("holds a quarantined node's unverified credits, and says why", async () => {
    ledger.record(entry({ node: nodeA }))
    ledger.record(entry({ node: nodeB }))
    const hold = {
      node: nodeA,
      region: 'eu-north',
      since: Date.parse('2025-03-01T12:00:00Z'),
      reason: '3 of 5 checked answers were unlikely under garage-tiny',
      tokens: 120,
    }
    // The head reports it on every status answer while it lasts: one hold, updated.
    await ledger.recordHolds('eu-north', [hold])
    await ledger.recordHolds('eu-north', [{ ...hold, tokens: 130 }])
    expect(await ledger.holds()).toEqual([{ ...hold, tokens: 130 }])
    const credits = await ledger.creditsByNode()
    expect(credits.find((c) => c.node === nodeA)!.held).toEqual({
      since: '2025-03-01T12:00:00.000Z',
      reason: hold.reason,
      tokens: 130,
    })
    expect(credits.find((c) => c.node === nodeB)!.held).toBeNull()
    // Kept across a reopen.
    expect(await new UsageLedger(open()).holds({ node: nodeA })).toHaveLength(1)
  })

  it('writes the records of one event-loop turn together, right after that turn', async () => {
    ledger.record(entry())
    ledger.record(entry({ completionTokens: 5 }))
    // Still the recording turn: nothing written yet, so a request never waits for SQLite.
    expect(rows('usage_daily')).toHaveLength(0)
    await new Promise<void>((resolve) => setImmediate(resolve))
    expect(rows('usage_daily')).toEqual([expect.objectContaining({ requests: 2, completion_tokens: 25 })])
    expect(ledger.pending).toBe(0)
  })

  it('can batch for longer when asked: one timer per batch, none when idle', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] })
    const batched = new UsageLedger(store, { now: () => clock, flushIntervalMs: 1_000 })
    batched.record(entry())
    await vi.advanceTimersByTimeAsync(999)
    expect(rows('usage_daily')).toHaveLength(0)
    await vi.advanceTimersByTimeAsync(1)
    expect(rows('usage_daily')).toHaveLength(1)
    expect(vi.getTimerCount()).toBe(0)
  })

  it('counts each record in its UTC day', async () => {
    ledger.record(entry({ at: Date.parse('2025-03-01T23:59:59.999Z') }))
    ledger.record(entry({ at: new Date('2025-03-02T00:00:00.000Z'), completionTokens: 5 }))
    // 01:30 in UTC+2 is still the 1st in UTC.
    ledger.record(entry({ at: Date.parse('2025-03-02T01:30:00+02:00'), completionTokens: 7 }))
    const day1 = await ledger.usageByKey({ since: '2025-03-01', until: '2025-03-01' })
    const day2 = await ledger.usageByKey({ since: '2025-03-02', until: '2025-03-02' })
    expect(day1).toEqual([expect.objectContaining({ requests: 2, completionTokens: 27 })])
    expect(day2).toEqual([expect.objectContaining({ requests: 1, completionTokens: 5 })])
    expect(await ledger.creditsByNode({ since: new Date('2025-03-02T12:00:00Z') })).toEqual([
      {
        node: nodeA,
        region: 'eu-north',
        model: 'garage-tiny',
        held: null,
        requests: 1,
        promptTokens: 10,
        completionTokens: 5,
      },
    ])
    expect(await ledger.totals({ until: '2025-03-01' })).toEqual({
      requests: 2,
      promptTokens: 20,
      completionTokens: 27,
      creditedRequests: 2,
      creditedTokens: 27,
    })
  })

  it('answers usage per key (with its name) and credits per node, filtered', async () => {
    const keys = new ApiKeyStore(store, { now: () => clock })
    const alice = await keys.create({ name: 'alice' })
    ledger.record(entry({ keyId: alice.id }))
    ledger.record(
      entry({ keyId: alice.id, node: nodeB, region: 'us-east', promptTokens: 3, completionTokens: 4 }),
    )
    ledger.record(entry({ keyId: 'key_gone' }))
    expect(await ledger.usageByKey()).toEqual([
      {
        keyId: 'key_gone',
        keyName: null,
        model: 'garage-tiny',
        requests: 1,
        promptTokens: 10,
        completionTokens: 20,
      },
      {
        keyId: alice.id,
        keyName: 'alice',
        model: 'garage-tiny',
        requests: 2,
        promptTokens: 13,
        completionTokens: 24,
      },
    ])
    expect(await ledger.usageByKey({ keyId: alice.id })).toHaveLength(1)
    expect(await ledger.creditsByNode()).toEqual([
      {
        node: nodeA,
        region: 'eu-north',
        model: 'garage-tiny',
        held: null,
        requests: 2,
        promptTokens: 20,
        completionTokens: 40,
      },
      {
        node: nodeB,
        region: 'us-east',
        model: 'garage-tiny',
        held: null,
        requests: 1,
        promptTokens: 3,
        completionTokens: 4,
      },
    ])
    expect(await ledger.creditsByNode({ node: nodeB })).toHaveLength(1)
    expect(await ledger.usageByKey({ since: '2025-03-02' })).toEqual([])
    expect(await ledger.totals()).toMatchObject({ requests: 3, creditedTokens: 44 })
  })

  it('survives a restart, and two ledgers on one file add up', async () => {
    ledger.record(entry())
    await ledger.close()
    await store.close()
    store = open()
    ledger = new UsageLedger(store, { now: () => clock })
    const other = new UsageLedger(open(), { now: () => clock })
    ledger.record(entry())
    other.record(entry())
    await other.close()
    expect(await ledger.totals()).toMatchObject({ requests: 3, completionTokens: 60, creditedRequests: 3 })
  })

  it('keeps the sums when a flush fails, and writes them on the next', async () => {
    store.db.exec('PRAGMA busy_timeout = 0')
    const other = open().db
    ledger.record(entry())
    other.exec('BEGIN IMMEDIATE')
    await expect(ledger.flush()).rejects.toThrow(/locked/)
    expect(ledger.pending).toBe(2)
    other.exec('ROLLBACK')
    ledger.record(entry())
    await ledger.flush()
    expect(await ledger.totals()).toMatchObject({ requests: 2, completionTokens: 40 })
  })

  it('retries a failed background write after retryIntervalMs, keeping the sums', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'setImmediate', 'clearImmediate'] })
    store.db.exec('PRAGMA busy_timeout = 0')
    const other = open().db
    other.exec('BEGIN IMMEDIATE')
    ledger.record(entry())
    await vi.advanceTimersByTimeAsync(0)
    expect(ledger.pending).toBe(2)
    other.exec('ROLLBACK')
    await vi.advanceTimersByTimeAsync(ledgerRetryIntervalMs - 1)
    expect(rows('usage_daily')).toHaveLength(0)
    await vi.advanceTimersByTimeAsync(1)
    expect(rows('usage_daily')).toEqual([expect.objectContaining({ requests: 1 })])
    expect(vi.getTimerCount()).toBe(0)
  })

  it('refuses bad records and records after close', async () => {
    expect(() => ledger.record(entry({ promptTokens: -1 }))).toThrow(RangeError)
    expect(() => ledger.record(entry({ completionTokens: 1.5 }))).toThrow(RangeError)
    await ledger.close()
    expect(() => ledger.record(entry())).toThrow(expect.objectContaining({ name: 'LedgerClosedError' }))
  })

  it('parses days for queries', async () => {
    expect(parseLedgerDay('2025-01-31')).toBe('2025-01-31')
    expect(parseLedgerDay('2025-01-31T23:30:00-02:00')).toBe('2025-02-01')
    for (const bad of ['2025-02-30', 'yesterday', '31/01/2025', ''])
      expect(() => parseLedgerDay(bad)).toThrow(expect.objectContaining({ name: 'LedgerDateError' }))
  })
})

/** A store whose writes fail while `failing` is set; a lost answer applies the batch and fails anyway. */
class FlakyStore {
  failing: 'no' | 'refuse' | 'lose-answer' = 'no'
  readonly attempts: LedgerBatch[] = []
  readonly applied = new Map<string, LedgerBatch>()
  async writeLedger(batch: LedgerBatch): Promise<void> {
    this.attempts.push(structuredClone(batch))
    if (this.failing === 'refuse') throw new Error('connection refused')
    // As PostgreSQL does: a batch id already applied is not applied again.
    if (!this.applied.has(batch.id)) this.applied.set(batch.id, structuredClone(batch))
    if (this.failing === 'lose-answer') throw new Error('Connection terminated unexpectedly')
  }
  async usageByKey(): Promise<KeyUsage[]> {
    return []
  }
  async creditsByNode(): Promise<NodeCredit[]> {
    return []
  }
  async recordHolds(): Promise<void> {}
  async holds(): Promise<CreditHold[]> {
    return []
  }
  async totals(): Promise<LedgerTotals> {
    return { requests: 0, promptTokens: 0, completionTokens: 0, creditedRequests: 0, creditedTokens: 0 }
  }
  requests(): number {
    return [...this.applied.values()].flatMap((b) => b.usage).reduce((t, u) => t + u.requests, 0)
  }
}

describe('UsageLedger over a store that fails', () => {
  const record = (keyId = 'key_a'): UsageRecord => ({
    keyId,
    model: 'm',
    region: 'r',
    node: nodeA,
    promptTokens: 1,
    completionTokens: 2,
  })

  it('retries a failed batch as it was, with its id, and writes what came meanwhile in the next', async () => {
    const store = new FlakyStore()
    const ledger = new UsageLedger(store, { retryIntervalMs: 60_000 })
    ledger.record(record())
    store.failing = 'lose-answer'
    await expect(ledger.flush()).rejects.toThrow(/terminated/)
    ledger.record(record('key_b'))
    store.failing = 'no'
    await ledger.flush()
    expect(store.attempts.map((b) => b.usage.map((u) => u.keyId))).toEqual([['key_a'], ['key_a'], ['key_b']])
    expect(store.attempts[1]!.id).toBe(store.attempts[0]!.id)
    expect(store.attempts[2]!.id).not.toBe(store.attempts[0]!.id)
    // The first write was applied though its answer was lost: counted once.
    expect(store.requests()).toBe(2)
    expect(ledger.pending).toBe(0)
    await ledger.close()
  })

  it('says its backlog is full at maxPendingSums, and is not once they are written', async () => {
    const store = new FlakyStore()
    store.failing = 'refuse'
    const ledger = new UsageLedger(store, { retryIntervalMs: 60_000, maxPendingSums: 4 })
    ledger.record(record('k1'))
    await expect(ledger.flush()).rejects.toThrow(/refused/)
    expect(ledger.backlogFull).toBe(false)
    ledger.record(record('k2'))
    expect(ledger.pending).toBe(4)
    expect(ledger.backlogFull).toBe(true)
    store.failing = 'no'
    await ledger.flush()
    expect(ledger.backlogFull).toBe(false)
    expect(store.requests()).toBe(2)
    await ledger.close()
  })

  it('gives up at close after its timeout and names the sums it could not write', async () => {
    const store = new FlakyStore()
    store.failing = 'refuse'
    const ledger = new UsageLedger(store, { retryIntervalMs: 20 })
    ledger.record(record('key_lost'))
    await expect(ledger.close(100)).rejects.toThrow(
      expect.objectContaining({ name: 'LedgerUnwrittenError', message: expect.stringContaining('key_lost') }),
    )
    expect(store.attempts.length).toBeGreaterThan(1)
    expect(() => ledger.record(record())).toThrow(expect.objectContaining({ name: 'LedgerClosedError' }))
  })
})
