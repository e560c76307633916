import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ApiKeyStore } from '../../federation/keys.ts'
import { UsageLedger } from '../../federation/ledger.ts'
import { openFederationStore } from '../../federation/store-sqlite.ts'
import { garage } from '../helpers/cli.ts'

const node = '12D3KooWNodeNodeNodeNodeNodeNodeNodeNodeNodeNodeNode1'

describe('garage keys and garage ledger', () => {
  let dir: string
  let dataDir: string

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-cli-keys-'))
    dataDir = join(dir, 'federation')
  })
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('creates a key, printing it alone on stdout once, without the SQLite warning', async () => {
    const created = await garage(['keys', 'create', '--name', 'ci', '--rpm', '60', '--data-dir', dataDir])
    expect(created.code).toBe(0)
    expect(created.stdout).toMatch(/^gk_[A-Za-z0-9_-]{43}\n$/)
    expect(created.stderr).toContain('shown only this once')
    expect(created.stderr).not.toContain(created.stdout.trim())
    expect(created.stderr).not.toContain('ExperimentalWarning')
    expect((await stat(join(dataDir, 'federation.db'))).mode & 0o777).toBe(0o600)

    // The gateway's side: the printed key authenticates.
    const db = openFederationStore(dataDir)
    try {
      expect(await new ApiKeyStore(db).authenticate(created.stdout.trim())).toMatchObject({
        name: 'ci',
        limits: { rpm: 60, tpm: null, concurrency: null },
      })
    } finally {
      await db.close()
    }

    const list = await garage(['keys', 'list', '--data-dir', dataDir])
    expect(list.code).toBe(0)
    expect(list.stdout).toMatch(/ID\s+NAME\s+PREFIX\s+RPM/)
    expect(list.stdout).toContain(`${created.stdout.slice(0, 11)}...`)
    expect(list.stdout).not.toContain(created.stdout.trim())
    expect(list.stderr).not.toContain('ExperimentalWarning')
  })

  it('lists as JSON, revokes by name, and says when a key is unknown or taken', async () => {
    const b = await garage(['keys', 'create', '--name', 'batch jobs', '--tpm', '5000', '--data-dir', dataDir])
    expect(b.code).toBe(0)
    const taken = await garage(['keys', 'create', '--name', 'batch jobs', '--data-dir', dataDir])
    expect(taken.code).toBe(1)
    expect(taken.stderr).toContain('already named "batch jobs"')

    const json = JSON.parse((await garage(['keys', 'list', '--json', '--data-dir', dataDir])).stdout)
    expect(json.map((k: { name: string }) => k.name)).toEqual(['ci', 'batch jobs'])
    expect(json[1]).toMatchObject({ tpm: 5000, rpm: null, revokedAt: null, prefix: b.stdout.slice(0, 11) })
    expect(JSON.stringify(json)).not.toContain(b.stdout.trim())

    const revoked = await garage(['keys', 'revoke', 'batch jobs', '--data-dir', dataDir])
    expect(revoked.code).toBe(0)
    expect(revoked.stdout.trim()).toBe(json[1].id)
    const after = JSON.parse((await garage(['keys', 'list', '--json', '--data-dir', dataDir])).stdout)
    expect(after[1].revokedAt).not.toBeNull()

    const again = await garage(['keys', 'revoke', json[1].id, '--data-dir', dataDir])
    expect(again.code).toBe(1)
    expect(again.stderr).toContain('already revoked')
    const unknown = await garage(['keys', 'revoke', 'nobody', '--data-dir', dataDir])
    expect(unknown.code).toBe(1)
    expect(unknown.stderr.trim().split('\n')).toHaveLength(1)
    expect(unknown.stderr).toContain('no API key has the id, prefix or name "nobody"')
  })

  it('rejects bad options with the usage (exit 2), and a missing database in one line (exit 1)', async () => {
    for (const args of [
      ['keys', 'create', '--data-dir', dataDir],
      ['keys', 'create', '--name', 'x', '--rpm', '0', '--data-dir', dataDir],
      ['keys', 'create', '--name', 'x', '--tpm', 'lots', '--data-dir', dataDir],
      ['keys', 'create', '--name', ' x', '--data-dir', dataDir],
      ['keys', 'create', '--name', 'x', '--frobnicate'],
      ['keys', 'revoke', '--data-dir', dataDir],
      ['keys', 'rotate'],
      ['ledger', '--since', 'last tuesday', '--data-dir', dataDir],
      ['ledger', '--since', '2025-03-02', '--until', '2025-03-01', '--data-dir', dataDir],
    ]) {
      const r = await garage(args)
      expect(r.code, args.join(' ')).toBe(2)
      expect(r.stderr, args.join(' ')).toContain('Usage:')
    }
    const missing = await garage(['keys', 'list', '--data-dir', join(dir, 'typo')])
    expect(missing.code).toBe(1)
    expect(missing.stderr).toContain('no federation database in')
    const missingLedger = await garage(['ledger'], { GARAGE_DATA_DIR: join(dir, 'nothing-here') })
    expect(missingLedger.code).toBe(1)
    expect(missingLedger.stderr).toContain(join(dir, 'nothing-here', 'federation'))
  })

  it('prints usage per key and credits per node, as tables or JSON, filtered', async () => {
    const db = openFederationStore(dataDir)
    const keys = new ApiKeyStore(db)
    const ci = (await keys.list()).find((k) => k.name === 'ci')!
    const ledger = new UsageLedger(db)
    const record = { model: 'garage-tiny', region: 'local', node, promptTokens: 12, completionTokens: 30 }
    ledger.record({ ...record, keyId: ci.id, at: Date.parse('2025-03-01T23:59:59Z') })
    ledger.record({ ...record, keyId: ci.id, at: Date.parse('2025-03-02T00:00:01Z') })
    await ledger.close()
    await db.close()

    const table = await garage(['ledger', '--data-dir', dataDir])
    expect(table.code).toBe(0)
    expect(table.stderr).not.toContain('ExperimentalWarning')
    expect(table.stdout).toMatch(new RegExp(`${ci.id}\\s+ci\\s+garage-tiny\\s+2\\s+24\\s+60`))
    expect(table.stdout).toMatch(new RegExp(`${node}\\s+local\\s+garage-tiny\\s+2\\s+24\\s+60`))

    const oneDay = JSON.parse(
      (
        await garage([
          'ledger',
          '--since',
          '2025-03-02',
          '--until',
          '2025-03-02',
          '--json',
          '--data-dir',
          dataDir,
        ])
      ).stdout,
    )
    expect(oneDay).toMatchObject({
      since: '2025-03-02',
      until: '2025-03-02',
      usage: [{ keyId: ci.id, keyName: 'ci', requests: 1, promptTokens: 12, completionTokens: 30 }],
      credits: [{ node, region: 'local', held: null, requests: 1, promptTokens: 12, completionTokens: 30 }],
      totals: { requests: 1, creditedTokens: 30 },
    })

    const byKey = await garage(['ledger', '--key', 'ci', '--data-dir', dataDir])
    expect(byKey.stdout).toContain('Usage by key')
    expect(byKey.stdout).not.toContain('Credits by node')
    const byNode = await garage(['ledger', '--node', node, '--json', '--data-dir', dataDir])
    expect(JSON.parse(byNode.stdout)).toMatchObject({ usage: [], credits: [{ node, requests: 2 }] })
    const unknownKey = await garage(['ledger', '--key', 'nobody', '--data-dir', dataDir])
    expect(unknownKey.code).toBe(1)
  })
})
