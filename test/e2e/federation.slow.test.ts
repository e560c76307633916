import { mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Devnet, startDevnet } from '../../cli/commands/devnet.ts'

/** A raw streamed completion through the federation: what a client without an SDK sees. */
interface Received {
  status: number
  region: string
  node: string
  path: string
  text: string
  tokens: number
  finish: string | null
  done: boolean
  error: string | null
  firstByte: boolean
}

async function rawStream(devnet: Devnet, key: string, prompt: string, maxTokens: number): Promise<Received> {
  const res = await fetch(`${devnet.info.federation.url}/v1/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model: 'garage-tiny',
      prompt,
      max_tokens: maxTokens,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    }),
    signal: AbortSignal.timeout(30_000),
  })
  const out: Received = {
    status: res.status,
    region: res.headers.get('x-garage-region') ?? '',
    node: res.headers.get('x-garage-node') ?? '',
    path: res.headers.get('x-garage-path') ?? '',
    text: '',
    tokens: 0,
    finish: null,
    done: false,
    error: null,
    firstByte: false,
  }
  const body = await res.text()
  if (res.status !== 200) {
    out.error = body
    return out
  }
  out.firstByte = body.length > 0
  for (const event of body.split('\n\n')) {
    const data = event.replace(/^data: /, '')
    if (data === '') continue
    if (data === '[DONE]') {
      out.done = true
      continue
    }
    const json = JSON.parse(data) as {
      error?: { message: string }
      usage?: { completion_tokens: number }
      choices?: Array<{ text: string; finish_reason: string | null }>
    }
    if (json.error != null) out.error = json.error.message
    if (json.usage != null) out.tokens = json.usage.completion_tokens
    for (const c of json.choices ?? []) {
      out.text += c.text
      if (c.finish_reason != null) out.finish = c.finish_reason
    }
  }
  return out
}

describe('the federation on a devnet, through the official openai client', () => {
  let dir: string
  let devnet: Devnet
  let client: OpenAI
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-federation-'))
    devnet = await startDevnet({ dataDir: dir, regions: 2, nodes: 4, port: 0 })
    client = new OpenAI({
      baseURL: `${devnet.info.federation.url}/v1`,
      apiKey: devnet.info.federation.apiKey,
      maxRetries: 0,
    })
  }, 120_000)
  afterAll(async () => {
    await devnet?.stop()
    if (dir != null) await rm(dir, { recursive: true, force: true })
  })

  it('writes devnet.json (0600) with the federation, regions and nodes', async () => {
    const path = join(dir, 'devnet.json')
    expect((await stat(path)).mode & 0o777).toBe(0o600)
    const written = JSON.parse(await readFile(path, 'utf8'))
    expect(written.federation.url).toBe(devnet.info.federation.url)
    expect(written.federation.apiKey).toMatch(/^gk_/)
    expect(written.federation.adminToken.length).toBeGreaterThan(20)
    expect(written.regions.map((r: { name: string }) => r.name)).toEqual(['local', 'local-2'])
    expect(written.nodes.map((n: { region: string }) => n.region).sort()).toEqual([
      'local',
      'local',
      'local-2',
      'local-2',
    ])
  })

  it('lists models, answers chat and completions, and streams the same text as the non-streamed answer', async () => {
    const models = await client.models.list()
    const tiny = models.data.find((m) => m.id === 'garage-tiny') as unknown as {
      garage: { regions: string[] }
    }
    expect(tiny).toBeDefined()
    expect(tiny.garage.regions.sort()).toEqual(['local', 'local-2'])

    const chat = await client.chat.completions.create({
      model: 'garage-tiny',
      messages: [{ role: 'user', content: 'Hello' }],
      max_tokens: 12,
      seed: 7,
    })
    expect(chat.choices[0]?.message.content?.length).toBeGreaterThan(0)
    expect(chat.usage?.completion_tokens).toBe(12)

    const completion = await client.completions.create({
      model: 'garage-tiny',
      prompt: 'Once',
      max_tokens: 10,
      seed: 7,
    })
    expect(completion.choices[0]?.text.length).toBeGreaterThan(0)
    expect(completion.choices[0]?.finish_reason).toBe('length')

    const whole = await client.chat.completions.create({
      model: 'garage-tiny',
      messages: [{ role: 'user', content: 'Tell me about garages' }],
      max_tokens: 24,
      seed: 42,
      temperature: 0.8,
    })
    const stream = await client.chat.completions.create({
      model: 'garage-tiny',
      messages: [{ role: 'user', content: 'Tell me about garages' }],
      max_tokens: 24,
      seed: 42,
      temperature: 0.8,
      stream: true,
    })
    let joined = ''
    let finish: string | null = null
    for await (const chunk of stream) {
      joined += chunk.choices[0]?.delta.content ?? ''
      finish = chunk.choices[0]?.finish_reason ?? finish
    }
    expect(joined).toBe(whole.choices[0]?.message.content)
    expect(finish).toBe('length')
    // The SDK hides [DONE]; a plain client sees it.
    const raw = await rawStream(devnet, devnet.info.federation.apiKey, 'Once upon', 8)
    expect(raw.done).toBe(true)
    expect(raw.finish).toBe('length')
    expect(raw.tokens).toBe(8)
  })

  it('refuses wrong and revoked keys, limits a key past its rpm, and names bad requests', async () => {
    const wrong = new OpenAI({
      baseURL: `${devnet.info.federation.url}/v1`,
      apiKey: 'gk_not-a-key',
      maxRetries: 0,
    })
    await expect(wrong.models.list()).rejects.toMatchObject({ status: 401, code: 'invalid_api_key' })

    const revokedKey = await devnet.federation.keys.create({ name: 'to-revoke' })
    const revoked = new OpenAI({
      baseURL: `${devnet.info.federation.url}/v1`,
      apiKey: revokedKey.key,
      maxRetries: 0,
    })
    expect((await revoked.models.list()).data.length).toBeGreaterThan(0)
    await devnet.federation.keys.revoke(revokedKey.id)
    devnet.federation.keys.invalidate()
    await expect(revoked.models.list()).rejects.toMatchObject({ status: 401, code: 'invalid_api_key' })

    const limitedKey = await devnet.federation.keys.create({ name: 'two-a-minute', rpm: 2 })
    const limited = new OpenAI({
      baseURL: `${devnet.info.federation.url}/v1`,
      apiKey: limitedKey.key,
      maxRetries: 0,
    })
    for (let i = 0; i < 2; i++)
      await limited.completions.create({ model: 'garage-tiny', prompt: 'x', max_tokens: 2 })
    const refused = await limited.completions
      .create({ model: 'garage-tiny', prompt: 'x', max_tokens: 2 })
      .catch((e: unknown) => e as InstanceType<typeof OpenAI.APIError>)
    expect(refused).toBeInstanceOf(OpenAI.RateLimitError)
    expect((refused as InstanceType<typeof OpenAI.APIError>).code).toBe('rate_limit_exceeded')
    const headers = (refused as InstanceType<typeof OpenAI.APIError>).headers
    expect(Number(headers?.get('retry-after'))).toBeGreaterThanOrEqual(1)
    expect(headers?.get('x-ratelimit-limit-requests')).toBe('2')
    expect(headers?.get('x-ratelimit-remaining-requests')).toBe('0')

    await expect(
      client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] }),
    ).rejects.toMatchObject({ status: 404, code: 'model_not_found' })

    const post = (body: string): Promise<Response> =>
      fetch(`${devnet.info.federation.url}/v1/chat/completions`, {
        method: 'POST',
        headers: {
          authorization: `Bearer ${devnet.info.federation.apiKey}`,
          'content-type': 'application/json',
        },
        body,
      })
    const malformed = await post('{"model": "garage-tiny", ')
    expect(malformed.status).toBe(400)
    expect(((await malformed.json()) as { error: { code: string } }).error.code).toBe('invalid_json')
    expect(malformed.headers.get('x-request-id')).toMatch(/^[0-9a-f-]{36}$/)
    const huge = await post(JSON.stringify({ model: 'garage-tiny', prompt: 'x'.repeat(10 * 1024 * 1024) }))
    expect(huge.status).toBe(413)
    expect(((await huge.json()) as { error: { code: string } }).error.code).toBe('request_too_large')
  })

  it('keeps serving through the other region when a head is killed under load; the ledger bills what clients got', async () => {
    const key = await devnet.federation.keys.create({ name: 'failover' })
    const creditsBefore = new Map<string, number>()
    for (const c of await devnet.federation.ledger.creditsByNode()) {
      creditsBefore.set(c.node, (creditsBefore.get(c.node) ?? 0) + c.completionTokens)
    }
    const total = 48
    const results: Received[] = []
    let next = 0
    let killed = false
    const victim = devnet.info.regions[0]!.name
    const workers = Array.from({ length: 8 }, async () => {
      while (next < total) {
        const i = next++
        if (i === 16 && !killed) {
          killed = true
          // The head goes away abruptly, with its bootstrap node: connections drop, nothing drains.
          const h = devnet.heads[0]!
          void h.stop()
          void devnet.federation.directory.refresh()
          await devnet.bootstraps[0]!.node.stop()
        }
        results.push(await rawStream(devnet, key.key, `load ${i}`, 30))
      }
    })
    await Promise.all(workers)
    expect(results).toHaveLength(total)
    for (const r of results) {
      if (r.error != null) {
        // Only a stream that had started through the killed region may fail, and it ends properly.
        expect(r.status).toBe(200)
        expect(r.region).toBe(victim)
        expect(r.firstByte).toBe(true)
        expect(r.done).toBe(true)
      } else {
        expect(r.status).toBe(200)
        expect(r.done).toBe(true)
        expect(r.tokens).toBe(30)
      }
    }
    // Later requests all succeed: through the other region, or straight to the killed head's nodes,
    // which serve on until the leases it granted this gateway lapse (the direct path needs no head
    // per request); never through the dead head.
    const late = results.slice(24)
    expect(late.every((r) => r.error == null)).toBe(true)
    expect(late.filter((r) => r.region === victim).every((r) => r.path === 'direct')).toBe(true)

    // Ledger: this key's usage and each node's credits equal the tokens clients received; a stream
    // cut mid-way is billed for the chunks that reached its client (at most its max_tokens).
    const received = results.filter((r) => r.error == null)
    const interrupted = results.filter((r) => r.error != null)
    const receivedTokens = received.reduce((n, r) => n + r.tokens, 0)
    const usage = await devnet.federation.ledger.usageByKey({ keyId: key.id })
    const billed = usage.reduce((n, u) => n + u.completionTokens, 0)
    expect(billed).toBeGreaterThanOrEqual(receivedTokens)
    expect(billed - receivedTokens).toBeLessThanOrEqual(30 * interrupted.length)
    if (interrupted.length === 0) expect(billed).toBe(receivedTokens)
    expect(usage.reduce((n, u) => n + u.requests, 0)).toBe(total)
    const byNode = new Map<string, number>()
    for (const r of received) byNode.set(r.node, (byNode.get(r.node) ?? 0) + r.tokens)
    const admin = await fetch(`${devnet.info.federation.url}/admin/ledger`, {
      headers: { authorization: `Bearer ${devnet.info.federation.adminToken}` },
    })
    expect(admin.status).toBe(200)
    const ledger = (await admin.json()) as { credits: Array<{ node: string; completionTokens: number }> }
    for (const [node, tokens] of byNode) {
      const credited =
        ledger.credits.filter((c) => c.node === node).reduce((n, c) => n + c.completionTokens, 0) -
        (creditsBefore.get(node) ?? 0)
      const cut = interrupted.filter((r) => r.node === node).length
      expect(credited).toBeGreaterThanOrEqual(tokens)
      expect(credited - tokens).toBeLessThanOrEqual(30 * cut)
    }
    process.stdout.write(
      `failover: ${total} requests, ${interrupted.length} streams cut by the kill, ${received.length} complete; billed ${billed} tokens\n`,
    )
  })
})
