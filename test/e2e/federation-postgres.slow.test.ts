import { randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { openStore } from '../../federation/store.ts'
import { garage } from '../helpers/cli.ts'
import { startTestPostgres, type TestPostgres } from '../helpers/postgres.ts'
import { ProcessCluster, tinyModel } from '../helpers/process-cluster.ts'

const runId = randomBytes(4).toString('hex')

interface Usage {
  requests: number
  prompt: number
  completion: number
}

/**
 * Two `garage federation` processes on one real PostgreSQL server (started here in a temporary
 * folder, removed after), in front of one region (a head and a node on the embedded engine, each a
 * `garage` process), under OpenAI-client load spread over both: a key's limits hold for the sum,
 * the ledger equals what the clients received, and a PostgreSQL restart in the middle loses no usage.
 */
describe('two federation gateways on one PostgreSQL', () => {
  let root: string
  let pg: TestPostgres
  let cluster: ProcessCluster
  const client = (gateway: number, key: string): OpenAI =>
    new OpenAI({
      baseURL: `${cluster.gateways[gateway]!.url}/v1`,
      apiKey: key,
      maxRetries: 0,
      timeout: 30_000,
    })
  const createKey = async (name: string, ...limits: string[]): Promise<{ id: string; key: string }> => {
    const made = await garage(['keys', 'create', '--name', name, ...limits], { GARAGE_DATABASE_URL: pg.url })
    expect(made.code, made.stderr).toBe(0)
    const listed = JSON.parse(
      (await garage(['keys', 'list', '--json'], { GARAGE_DATABASE_URL: pg.url })).stdout,
    ) as Array<{ id: string; name: string; revokedAt: string | null }>
    return { id: listed.find((k) => k.name === name && k.revokedAt == null)!.id, key: made.stdout.trim() }
  }
  /** Resolves once a gateway lists the tiny model with a node serving it. */
  const serves = async (gateway: number, key: string): Promise<void> => {
    await expect
      .poll(
        async () => {
          const models = await client(gateway, key)
            .models.list()
            .catch(() => null)
          return (models?.data ?? []).some((m) => m.id === tinyModel)
        },
        { timeout: 60_000, interval: 200 },
      )
      .toBe(true)
  }

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'garage-fed-pg-'))
    pg = await startTestPostgres()
    cluster = ProcessCluster.create({
      runId,
      root: join(root, 'cluster'),
      regions: ['pg-region'],
      nodesPerRegion: 1,
      isolateOneNode: false,
      // About a second for 30 tokens: long enough for requests to overlap on purpose.
      maxTokensPerSecond: 30,
      parallel: 4,
      contextLength: 512,
      keyNames: [],
      gateways: 2,
      database: pg.url,
    })
    await cluster.start()
  }, 120_000)

  afterAll(async () => {
    await cluster?.stop()
    await pg?.destroy()
    if (root != null) await rm(root, { recursive: true, force: true })
  })

  it('holds a key’s concurrency and rpm for both gateways together', async () => {
    expect(cluster.gateways.map((g) => g.proc?.stdout.find((l) => l.includes('store')))).toEqual([
      expect.stringContaining('postgres postgresql://garage@127.0.0.1'),
      expect.stringContaining('postgres postgresql://garage@127.0.0.1'),
    ])
    const conc = await createKey('two-at-once', '--concurrency', '2')
    await serves(0, conc.key)
    await serves(1, conc.key)

    // Six long answers at once, three through each gateway: two run, four are refused.
    const outcomes = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        client(i % 2, conc.key)
          .chat.completions.create({
            model: tinyModel,
            messages: [{ role: 'user', content: `count to forty, ${i}` }],
            max_tokens: 30,
          })
          .then(
            () => 'ok',
            (err: unknown) => (err instanceof OpenAI.APIError ? `${err.status} ${err.code}` : String(err)),
          ),
      ),
    )
    expect(outcomes.filter((o) => o === 'ok')).toHaveLength(2)
    expect(outcomes.filter((o) => o === '429 rate_limit_exceeded')).toHaveLength(4)

    // Five a minute, eight asked in turn through the two gateways: five pass, whichever gateway.
    const rpm = await createKey('five-a-minute', '--rpm', '5')
    const statuses: number[] = []
    for (let i = 0; i < 8; i++) {
      const res = await client(i % 2, rpm.key)
        .completions.create({ model: tinyModel, prompt: `r${i}`, max_tokens: 2 })
        .withResponse()
        .then(
          (r) => r.response,
          (err: unknown) => {
            if (!(err instanceof OpenAI.APIError)) throw err
            expect(err.code).toBe('rate_limit_exceeded')
            expect(Number(err.headers?.get('retry-after'))).toBeGreaterThan(0)
            return { status: err.status ?? 0 }
          },
        )
      statuses.push(res.status)
    }
    expect(statuses).toEqual([200, 200, 200, 200, 200, 429, 429, 429])
  }, 60_000)

  it('bills exactly what the clients received, through a PostgreSQL restart', async () => {
    const load = await createKey('load', '--rpm', '100000', '--concurrency', '16')
    const received: Usage = { requests: 0, prompt: 0, completion: 0 }
    const outage = { refused: 0, retryAfter: new Set<string>(), codes: new Set<string>() }
    let phase: 'before' | 'outage' | 'after' = 'before'
    const okIn = { before: 0, outage: 0, after: 0 }
    let stop = false

    const one = async (worker: number, i: number): Promise<void> => {
      const openai = client((worker + i) % 2, load.key)
      try {
        if (i % 2 === 0) {
          const stream = await openai.chat.completions.create({
            model: tinyModel,
            messages: [{ role: 'user', content: `w${worker} i${i}` }],
            max_tokens: 12,
            stream: true,
            stream_options: { include_usage: true },
          })
          let usage: OpenAI.CompletionUsage | undefined
          for await (const chunk of stream) usage = chunk.usage ?? usage
          if (usage == null) throw new Error('a streamed answer without usage')
          received.prompt += usage.prompt_tokens
          received.completion += usage.completion_tokens
        } else {
          const answer = await openai.completions.create({
            model: tinyModel,
            prompt: `w${worker} i${i}`,
            max_tokens: 8,
          })
          received.prompt += answer.usage!.prompt_tokens
          received.completion += answer.usage!.completion_tokens
        }
        received.requests++
        okIn[phase]++
      } catch (err) {
        if (!(err instanceof OpenAI.APIError) || err.status !== 503) throw err
        outage.refused++
        outage.codes.add(String(err.code))
        outage.retryAfter.add(err.headers?.get('retry-after') ?? 'none')
        // As a client that honours Retry-After, a little faster.
        await new Promise((r) => setTimeout(r, 100))
      }
    }
    const workers = Array.from({ length: 4 }, async (_, w) => {
      for (let i = 0; !stop; i++) await one(w, i)
    })
    const until = async (test: () => boolean, what: string): Promise<void> => {
      await expect.poll(test, { timeout: 30_000, interval: 50, message: what }).toBe(true)
    }
    try {
      await until(() => okIn.before >= 12, 'answers before the restart')
      // One long stream spans the stop: it was admitted before, it ends while the database is down,
      // so its usage can only reach the ledger through the gateway's buffer.
      const long = await client(0, load.key).chat.completions.create({
        model: tinyModel,
        messages: [{ role: 'user', content: 'a long one' }],
        max_tokens: 60,
        stream: true,
        stream_options: { include_usage: true },
      })
      const chunks = long[Symbol.asyncIterator]()
      const first = await chunks.next()
      await pg.stopServer()
      phase = 'outage'
      let usage: OpenAI.CompletionUsage | undefined
      for (let r = first; r.done !== true; r = await chunks.next()) usage = r.value.usage ?? usage
      received.requests++
      received.prompt += usage!.prompt_tokens
      received.completion += usage!.completion_tokens
      okIn.outage++
      // Both gateways refuse while it is down (each finds out at its next write or admission).
      await until(() => outage.refused >= 4, '503s during the outage')
      await pg.startServer()
      phase = 'after'
      await until(() => okIn.after >= 12, 'answers after the restart')
    } finally {
      stop = true
      await Promise.all(workers)
    }
    expect([...outage.codes]).toEqual(['store_unavailable'])
    expect([...outage.retryAfter]).toEqual(['1'])

    // What both gateways wrote (the buffered sums included) equals what the clients received.
    const store = await openStore({ dataDir: join(root, 'unused'), database: pg.url })
    try {
      const billed = async (): Promise<Usage> => {
        const rows = await store.usageByKey({ keyId: load.id })
        return {
          requests: rows.reduce((t, r) => t + r.requests, 0),
          prompt: rows.reduce((t, r) => t + r.promptTokens, 0),
          completion: rows.reduce((t, r) => t + r.completionTokens, 0),
        }
      }
      await expect.poll(billed, { timeout: 15_000, interval: 100 }).toEqual(received)
      const credited = (await store.creditsByNode({})).reduce((t, c) => t + c.completionTokens, 0)
      const allBilled = (await store.totals({})).completionTokens
      expect(credited).toBe(allBilled)
    } finally {
      await store.close()
    }
    console.log(
      `two gateways on PostgreSQL: ${received.requests} answers (${okIn.before} before, ${okIn.outage} during, ${okIn.after} after the restart), ${outage.refused} refused with 503 during it; billed = received: ${received.prompt} prompt, ${received.completion} completion tokens`,
    )
  }, 90_000)
})
