import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { NodeDaemon } from '../../daemon/node-daemon.ts'
import { TestMesh } from '../helpers/mesh.ts'
import { startTestRegion, type TestRegion, tinyModel } from '../helpers/region.ts'

/** One request through the head; returns who served it, the text, the usage and how it ended. */
interface Outcome {
  node: string
  status: number
  text: string
  completionTokens: number
  finish: string | null
  done: boolean
  error: string | null
}

async function complete(
  region: TestRegion,
  body: Record<string, unknown>,
  options: { signal?: AbortSignal; onFirstChunk?: (node: string) => void } = {},
): Promise<Outcome> {
  const res = await fetch(`${region.head.url}/v1/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${region.head.apiToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: tinyModel, ...body }),
    ...(options.signal != null ? { signal: options.signal } : {}),
  })
  const node = res.headers.get('x-garage-node') ?? ''
  const outcome: Outcome = {
    node,
    status: res.status,
    text: '',
    completionTokens: 0,
    finish: null,
    done: false,
    error: null,
  }
  if (body.stream !== true) {
    const json = (await res.json()) as {
      choices?: Array<{ text: string; finish_reason: string }>
      usage?: { completion_tokens: number }
      error?: { message: string }
    }
    outcome.text = json.choices?.[0]?.text ?? ''
    outcome.finish = json.choices?.[0]?.finish_reason ?? null
    outcome.completionTokens = json.usage?.completion_tokens ?? 0
    outcome.error = json.error?.message ?? null
    outcome.done = res.status === 200
    return outcome
  }
  const decoder = new TextDecoder()
  let buffer = ''
  let first = true
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    if (first) options.onFirstChunk?.(node)
    first = false
    buffer += decoder.decode(chunk, { stream: true })
    let cut = buffer.indexOf('\n\n')
    while (cut >= 0) {
      const event = buffer.slice(0, cut)
      buffer = buffer.slice(cut + 2)
      cut = buffer.indexOf('\n\n')
      const data = event.replace(/^data: /, '')
      if (data === '[DONE]') {
        outcome.done = true
        continue
      }
      const json = JSON.parse(data) as {
        choices?: Array<{ text: string; finish_reason: string | null }>
        usage?: { completion_tokens: number }
        error?: { message: string }
      }
      if (json.error != null) outcome.error = json.error.message
      for (const c of json.choices ?? []) {
        outcome.text += c.text
        if (c.finish_reason != null) outcome.finish = c.finish_reason
      }
      if (json.usage != null) outcome.completionTokens = json.usage.completion_tokens
    }
  }
  return outcome
}

/** Runs `total` requests with `concurrency` workers; `make(i)` builds the i-th request body. */
async function load(
  region: TestRegion,
  total: number,
  concurrency: number,
  make: (i: number) => Record<string, unknown>,
): Promise<Outcome[]> {
  const outcomes: Outcome[] = []
  let next = 0
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < total) {
        const i = next++
        outcomes[i] = await complete(region, make(i))
      }
    }),
  )
  return outcomes
}

async function until(
  check: () => boolean | Promise<boolean>,
  timeoutMs: number,
  what: string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

async function engineMetric(daemon: NodeDaemon, name: string): Promise<number> {
  const info = daemon.info()
  const res = await fetch(`${info.engineUrl}/metrics`, {
    headers: { authorization: `Bearer ${info.engineKey}` },
  })
  const text = await res.text()
  const line = text.split('\n').find((l) => l.startsWith(name))
  return Number(line?.split(' ').at(-1) ?? Number.NaN)
}

describe('a region: a head and three nodes on the embedded engine, over the mesh', () => {
  const mesh = new TestMesh()
  let region: TestRegion
  let fast: NodeDaemon[]
  let slow: NodeDaemon
  beforeAll(async () => {
    region = await startTestRegion(mesh, 'eu-test')
    // Per-sequence caps: the slow node has half the capacity of the others.
    ;[fast, slow] = await Promise.all([
      Promise.all([region.addNode({ maxTokensPerSecond: 60 }), region.addNode({ maxTokensPerSecond: 60 })]),
      region.addNode({ maxTokensPerSecond: 30 }),
    ])
  }, 120_000)
  afterAll(() => mesh.cleanup())

  it('serves 200 requests at concurrency 16; shares follow capacity; reports match verified counts', async () => {
    const outcomes = await load(region, 200, 16, (i) => ({
      prompt: `Request ${i}: the garage`,
      max_tokens: 24,
      temperature: 0,
      stream: i % 2 === 0,
      ...(i % 4 === 0 ? { stream_options: { include_usage: true } } : {}),
    }))
    expect(outcomes).toHaveLength(200)
    const failed = outcomes.filter((o) => o.status !== 200 || !o.done || o.error != null)
    expect(failed).toEqual([])
    for (const [i, o] of outcomes.entries()) {
      expect(o.finish).toBe('length')
      // A stream carries usage only when the client asked for it, as OpenAI's does.
      expect(o.completionTokens).toBe(i % 4 === 2 ? 0 : 24)
    }
    const share = (d: NodeDaemon): number => outcomes.filter((o) => o.node === d.peerId).length
    const fastMean = (share(fast[0]!) + share(fast[1]!)) / 2
    const ratio = share(slow) / fastMean
    process.stdout.write(
      `shares: fast ${share(fast[0]!)}, ${share(fast[1]!)}; half-capacity ${share(slow)} (ratio ${ratio.toFixed(2)})\n`,
    )
    expect(ratio).toBeGreaterThan(0.3)
    expect(ratio).toBeLessThan(0.7)

    // The next telemetry report of each node carries its totals; the head verified what it proxied.
    const nodes = [...fast, slow]
    // Every request produced 24 tokens (whether or not its client asked to see the usage).
    const totalFor = (d: NodeDaemon): number => 24 * share(d)
    await until(
      () => nodes.every((d) => region.head.registry.get(d.peerId!)?.telemetry?.tokensTotal === totalFor(d)),
      10_000,
      'telemetry to carry every token',
    )
    for (const d of nodes) {
      const verified = region.head.verified.verified(d.peerId!)
      const reported = region.head.registry.get(d.peerId!)!.telemetry!.tokensTotal
      expect(verified).toBe(totalFor(d))
      expect(Math.abs(reported - verified) / verified).toBeLessThanOrEqual(0.05)
      expect(region.head.verified.flagged(d.peerId!)).toBe(false)
    }
    const metrics = await (await fetch(`${region.head.url}/metrics`)).text()
    expect(metrics).toContain('garage_head_node_verified_tokens')
    expect(metrics).toMatch(/garage_head_nodes\{state="serving"\} 3/)
  })

  it('stops generation on the node when the client disconnects mid-stream', async () => {
    const controller = new AbortController()
    let servedBy = ''
    const before = await Promise.all(
      [...fast, slow].map((d) => engineMetric(d, 'vllm:generation_tokens_total')),
    )
    const request = complete(
      region,
      { prompt: 'a long story', max_tokens: 400, temperature: 0, stream: true },
      {
        signal: controller.signal,
        onFirstChunk: (node) => {
          servedBy = node
          controller.abort()
        },
      },
    ).catch((err: Error) => err)
    expect(await request).toBeInstanceOf(Error)
    const daemon = [...fast, slow].find((d) => d.peerId === servedBy)!
    await until(
      async () => (await engineMetric(daemon, 'vllm:num_requests_running')) === 0,
      5_000,
      'the engine to stop generating',
    )
    const after = await Promise.all(
      [...fast, slow].map((d) => engineMetric(d, 'vllm:generation_tokens_total')),
    )
    const generated = after.reduce((a, b) => a + b, 0) - before.reduce((a, b) => a + b, 0)
    expect(generated).toBeLessThan(100)
  })

  it('routes nothing to a paused node, and a draining node finishes its streams before its engine stops', async () => {
    const paused = fast[1]!
    await paused.pause({ reason: 'test' })
    await region.nodeState(paused.peerId!, 'paused')
    // Paused means the engine let go of the model: no engine process, no engine URL.
    expect(paused.info().engineUrl).toBeNull()
    const whilePaused = await load(region, 24, 8, (i) => ({
      prompt: `p${i}`,
      max_tokens: 8,
      stream: i % 2 === 0,
    }))
    expect(whilePaused.every((o) => o.status === 200 && o.done)).toBe(true)
    expect(whilePaused.some((o) => o.node === paused.peerId)).toBe(false)
    await paused.resume()
    await region.nodeState(paused.peerId!, 'serving')

    // Long streams on every node, then drain the one serving the first of them.
    const started: string[] = []
    const streams = Array.from({ length: 6 }, (_, i) =>
      complete(
        region,
        {
          prompt: `drain ${i}`,
          max_tokens: 90,
          temperature: 0,
          stream: true,
          stream_options: { include_usage: true },
        },
        { onFirstChunk: (node) => started.push(node) },
      ),
    )
    await until(() => started.length === 6, 10_000, 'six streams to start')
    const draining = [...fast, slow].find((d) => d.peerId === started[0])!
    const drainingId = draining.peerId!
    const onDraining = started.filter((n) => n === drainingId).length
    const stopped = draining.stop({ graceMs: 30_000 })
    await region.nodeState(drainingId, 'draining')
    const during = await complete(region, { prompt: 'during the drain', max_tokens: 4 })
    expect(during.status).toBe(200)
    expect(during.node).not.toBe(drainingId)
    await stopped
    const results = await Promise.all(streams)
    const drained = results.filter((o) => o.node === drainingId)
    expect(drained).toHaveLength(onDraining)
    for (const o of results) {
      expect(o.error).toBeNull()
      expect(o.done).toBe(true)
      expect(o.finish).toBe('length')
      expect(o.completionTokens).toBe(90)
    }
    expect(region.head.registry.get(drainingId)).toBeUndefined()
  })
})
