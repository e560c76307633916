import { randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { SseSplitter } from '../../core/sse.ts'
import { UsageLedger } from '../../federation/ledger.ts'
import { openFederationStore } from '../../federation/store-sqlite.ts'
import { ProcessCluster, tinyModel } from '../helpers/process-cluster.ts'

const runId = randomBytes(4).toString('hex')

/** Resolves once the gateway lists the tiny model with a node serving it (its directory has the region). */
async function gatewayServes(cluster: ProcessCluster, key: string): Promise<void> {
  const deadline = Date.now() + 60_000
  while (Date.now() < deadline) {
    const res = await fetch(`${cluster.federation.url}/v1/models`, {
      headers: { authorization: `Bearer ${key}` },
      signal: AbortSignal.timeout(2_000),
    }).catch(() => null)
    const models = (await res?.json().catch(() => null)) as {
      data?: Array<{ id: string; garage?: { nodes: number } }>
    } | null
    if ((models?.data ?? []).some((m) => m.id === tinyModel && (m.garage?.nodes ?? 0) > 0)) return
    await new Promise((r) => setTimeout(r, 200))
  }
  throw new Error('the gateway did not come to serve the tiny model within 60 s')
}

/**
 * A stream through a real `garage federation` process, SIGKILLed mid-answer: the ledger it leaves
 * behind bills what the client received, short by at most the writes of its last event-loop turn.
 */
describe('the gateway SIGKILLed mid-stream', () => {
  let root: string
  let cluster: ProcessCluster

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'garage-gateway-kill-'))
    cluster = ProcessCluster.create({
      runId,
      root: join(root, 'cluster'),
      regions: ['kill-region'],
      nodesPerRegion: 1,
      isolateOneNode: false,
      // Slow enough that the kill lands mid-stream.
      maxTokensPerSecond: 40,
      parallel: 2,
      contextLength: 1024,
      keyNames: ['app'],
    })
    await cluster.start()
  })

  afterAll(async () => {
    await cluster?.stop()
    if (root != null) await rm(root, { recursive: true, force: true })
  })

  it('bills what the client received before the kill, and a restarted gateway serves on', async () => {
    const key = cluster.keys[0]!
    await gatewayServes(cluster, key.key)
    const res = await fetch(`${cluster.federation.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        model: tinyModel,
        messages: [{ role: 'user', content: 'Tell me a long story.' }],
        max_tokens: 400,
        stream: true,
      }),
    })
    expect(res.status).toBe(200)
    // Count the content chunks the client received (the tiny model's chunks carry a token each; the
    // gateway bills an unfinished stream by its content-bearing chunks, as it verifies any stream).
    const reader = res.body!.getReader()
    const splitter = new SseSplitter()
    let received = 0
    let killed = false
    for (;;) {
      const { done, value } = await reader.read().catch(() => ({ done: true, value: undefined }))
      if (done || value == null) break
      for (const event of splitter.push(value)) {
        if (event.data == null || event.data === '[DONE]') continue
        const chunk = JSON.parse(event.data) as { choices?: Array<{ delta?: { content?: string } }> }
        if ((chunk.choices ?? []).some((c) => (c.delta?.content ?? '') !== '')) received++
      }
      if (!killed && received >= 20) {
        killed = true
        await cluster.kill(cluster.federation.proc)
      }
    }
    expect(killed).toBe(true)
    expect(received).toBeGreaterThanOrEqual(20)
    expect(received).toBeLessThan(400)

    // The ledger the killed gateway left on disk.
    const db = openFederationStore(cluster.federation.dir, { create: false })
    try {
      const ledger = new UsageLedger(db)
      const usage = await ledger.usageByKey({ keyId: key.id })
      const billed = usage.reduce((t, u) => t + u.completionTokens, 0)
      const requests = usage.reduce((t, u) => t + u.requests, 0)
      const credited = (await ledger.creditsByNode()).reduce((t, c) => t + c.completionTokens, 0)
      console.log(`gateway SIGKILLed mid-stream: client received ${received} tokens, billed ${billed}`)
      expect(requests).toBe(1)
      expect(billed).toBeLessThanOrEqual(received)
      // At most the last turn's writes are lost: a chunk or two at 40 tokens/s.
      expect(received - billed).toBeLessThanOrEqual(2)
      expect(credited).toBe(billed)
      await ledger.close()
    } finally {
      await db.close()
    }

    // The gateway comes back on the same store and serves.
    await cluster.startFederation()
    await gatewayServes(cluster, key.key)
    const again = await fetch(`${cluster.federation.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: tinyModel, messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 }),
    })
    expect(again.status).toBe(200)
  })
})
