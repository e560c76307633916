import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { LlamaCppEngine } from '../../../daemon/engines/llamacpp/engine.ts'
import { writeTinyModel } from '../../../daemon/engines/llamacpp/tiny-model.ts'
import type { EngineHandle } from '../../../daemon/engines/types.ts'

/** Raw HTTP, for what the SDK won't send: malformed JSON, oversized bodies, a socket cut mid-stream. */
function post(
  url: string,
  key: string,
  body: string | Buffer,
): Promise<{ status: number; json: Record<string, unknown>; headers: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request(
      url,
      { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' } },
      (res) => {
        const chunks: Buffer[] = []
        res.on('data', (c: Buffer) => chunks.push(c))
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8')
          resolve({
            status: res.statusCode ?? 0,
            json: text === '' ? {} : (JSON.parse(text) as Record<string, unknown>),
            headers: res.headers,
          })
        })
      },
    )
    req.on('error', reject)
    req.end(body)
  })
}

async function metric(handle: EngineHandle, name: string): Promise<number> {
  const text = await (await fetch(`${handle.baseUrl}/metrics`)).text()
  const m = new RegExp(`^${name}\\{[^}]*\\} (\\S+)$`, 'm').exec(text)
  return m == null ? Number.NaN : Number(m[1])
}

async function waitFor(check: () => Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

describe('embedded engine (node-llama-cpp) on the generated tiny model, through the official openai client', () => {
  let dir: string
  let engine: LlamaCppEngine
  let handle: EngineHandle
  let client: OpenAI
  const model = 'garage-tiny'

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-engine-'))
    const modelPath = join(dir, 'tiny.gguf')
    await writeTinyModel(modelPath, { seed: 7 })
    engine = new LlamaCppEngine()
    handle = await engine.start({
      model: modelPath,
      servedModelName: model,
      parallel: 2,
      maxQueue: 6,
      threads: 1,
    })
    client = new OpenAI({
      baseURL: `${handle.baseUrl}/v1`,
      apiKey: handle.apiKey,
      maxRetries: 0,
      timeout: 30_000,
    })
  })
  afterAll(async () => {
    await engine?.stop()
    if (dir != null) await rm(dir, { recursive: true, force: true })
  })

  it('binds to loopback and requires the key', async () => {
    expect(handle.baseUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
    const anonymous = new OpenAI({ baseURL: `${handle.baseUrl}/v1`, apiKey: 'wrong', maxRetries: 0 })
    await expect(anonymous.models.list()).rejects.toMatchObject({ status: 401 })
    const models = await client.models.list()
    expect(models.data.map((m) => m.id)).toEqual([model])
  })

  it('answers chat and completions, and counts the tokens it produced', async () => {
    const before = await metric(handle, 'vllm:generation_tokens_total')
    const chat = await client.chat.completions.create({
      model,
      messages: [{ role: 'user', content: 'Hello there' }],
      max_tokens: 12,
      temperature: 0,
    })
    expect(chat.object).toBe('chat.completion')
    expect(chat.choices[0]!.message.role).toBe('assistant')
    expect(chat.choices[0]!.message.content!.length).toBeGreaterThan(0)
    // the tiny model never ends a turn by itself: it runs to max_tokens
    expect(chat.choices[0]!.finish_reason).toBe('length')
    expect(chat.usage!.completion_tokens).toBe(12)
    // the chat template wraps the message: more prompt tokens than the 11 characters typed
    expect(chat.usage!.prompt_tokens).toBeGreaterThan(11)
    const completion = await client.completions.create({
      model,
      prompt: 'Once upon a time',
      max_tokens: 10,
      temperature: 0,
    })
    expect(completion.object).toBe('text_completion')
    expect(completion.choices[0]!.finish_reason).toMatch(/^(length|stop)$/)
    const after = await metric(handle, 'vllm:generation_tokens_total')
    expect(after - before).toBe(chat.usage!.completion_tokens + completion.usage!.completion_tokens)
  })

  it('streams the same text as it answers whole, for the same seed, with usage and [DONE]', async () => {
    const params = {
      model,
      messages: [{ role: 'user' as const, content: 'Tell me a story' }],
      max_tokens: 24,
      temperature: 1,
      seed: 42,
    }
    const whole = await client.chat.completions.create(params)
    const stream = await client.chat.completions.create({
      ...params,
      stream: true,
      stream_options: { include_usage: true },
    })
    let text = ''
    let finish: string | null = null
    let usage: OpenAI.CompletionUsage | undefined
    for await (const chunk of stream) {
      if (chunk.usage != null) usage = chunk.usage
      const choice = chunk.choices[0]
      if (choice == null) continue
      text += choice.delta.content ?? ''
      if (choice.finish_reason != null) finish = choice.finish_reason
    }
    expect(text).toBe(whole.choices[0]!.message.content)
    expect(finish).toBe(whole.choices[0]!.finish_reason)
    expect(usage).toEqual(whole.usage)
    // the raw stream ends with data: [DONE]
    const raw = await fetch(`${handle.baseUrl}/v1/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${handle.apiKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model, prompt: 'abc', max_tokens: 3, stream: true }),
    })
    expect(raw.headers.get('content-type')).toContain('text/event-stream')
    expect((await raw.text()).trimEnd().endsWith('data: [DONE]')).toBe(true)
  })

  it('stops at a stop sequence', async () => {
    const free = await client.completions.create({ model, prompt: 'The', max_tokens: 40, temperature: 0 })
    const text = free.choices[0]!.text
    expect(text.length).toBeGreaterThanOrEqual(10)
    const cut = text.slice(5, 7)
    const stopped = await client.completions.create({
      model,
      prompt: 'The',
      max_tokens: 40,
      temperature: 0,
      stop: [cut],
    })
    expect(stopped.choices[0]!.finish_reason).toBe('stop')
    expect(stopped.choices[0]!.text).toBe(text.slice(0, text.indexOf(cut)))
  })

  it('completes 8 concurrent requests (2 running, the rest queued)', async () => {
    const results = await Promise.all(
      Array.from({ length: 8 }, (_, i) =>
        client.completions.create({ model, prompt: `request ${i}`, max_tokens: 8, temperature: 0 }),
      ),
    )
    expect(results).toHaveLength(8)
    for (const r of results) {
      expect(r.choices[0]!.finish_reason).toBe('length')
      expect(r.usage!.completion_tokens).toBe(8)
    }
    expect(await metric(handle, 'vllm:num_requests_running')).toBe(0)
  })

  it('gives an OpenAI-shaped 4xx for malformed JSON, an unknown model, negative max_tokens, an oversized body, an unsupported parameter', async () => {
    const url = `${handle.baseUrl}/v1/chat/completions`
    const malformed = await post(url, handle.apiKey, '{"model": "garage-tiny", "messages": [')
    expect(malformed.status).toBe(400)
    expect(malformed.json.error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_json' })
    await expect(
      client.chat.completions.create({ model: 'gpt-9', messages: [{ role: 'user', content: 'hi' }] }),
    ).rejects.toMatchObject({
      status: 404,
      code: 'model_not_found',
    })
    await expect(
      client.chat.completions.create({ model, messages: [{ role: 'user', content: 'hi' }], max_tokens: -1 }),
    ).rejects.toMatchObject({
      status: 400,
      param: 'max_tokens',
    })
    const big = await post(url, handle.apiKey, Buffer.alloc(2 * 1024 * 1024, 0x20))
    expect(big.status).toBe(413)
    expect(big.json.error).toMatchObject({ code: 'request_too_large' })
    await expect(
      client.chat.completions.create({
        model,
        messages: [{ role: 'user', content: 'hi' }],
        functions: [{ name: 'f' }],
      } as never),
    ).rejects.toMatchObject({ status: 400, param: 'functions', code: 'unsupported_parameter' })
    // and the engine still serves
    const ok = await client.chat.completions.create({
      model,
      messages: [{ role: 'user', content: 'still there?' }],
      max_tokens: 2,
    })
    expect(ok.choices).toHaveLength(1)
  })

  it('reports vLLM metric names and drains', async () => {
    const text = await (await fetch(`${handle.baseUrl}/metrics`)).text()
    for (const name of [
      'vllm:num_requests_running',
      'vllm:num_requests_waiting',
      'vllm:generation_tokens_total',
      'vllm:prompt_tokens_total',
      'vllm:kv_cache_usage_perc',
      'vllm:time_to_first_token_seconds_bucket',
      'vllm:inter_token_latency_seconds_bucket',
    ]) {
      expect(text).toContain(name)
    }
    const m = await engine.metrics()
    expect(m['vllm:generation_tokens_total']).toBeGreaterThan(0)
    expect(await engine.health()).toBe(true)
    await engine.drain({ graceMs: 5_000 })
    expect(engine.state).toBe('draining')
    expect(await engine.health()).toBe(false)
  })
})

describe('embedded engine under load: a bounded queue and client disconnects', () => {
  let dir: string
  let engine: LlamaCppEngine
  let handle: EngineHandle
  let client: OpenAI
  const model = 'garage-small'

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-engine-load-'))
    const modelPath = join(dir, 'small.gguf')
    // 14 MB: slow enough (about 1 ms a token) that a request runs while the test looks at the queue
    await writeTinyModel(modelPath, {
      seed: 3,
      embeddingLength: 256,
      layers: 4,
      feedForwardLength: 768,
      contextLength: 512,
    })
    engine = new LlamaCppEngine()
    handle = await engine.start({
      model: modelPath,
      servedModelName: model,
      parallel: 1,
      maxQueue: 2,
      threads: 1,
    })
    client = new OpenAI({
      baseURL: `${handle.baseUrl}/v1`,
      apiKey: handle.apiKey,
      maxRetries: 0,
      timeout: 60_000,
    })
  })
  afterAll(async () => {
    await engine?.stop()
    if (dir != null) await rm(dir, { recursive: true, force: true })
  })

  it('answers 429 with Retry-After once 1 request runs and 2 wait', async () => {
    const long = Array.from({ length: 3 }, () =>
      client.completions.create({ model, prompt: 'fill', max_tokens: 450, temperature: 0 }),
    )
    await waitFor(
      async () => (await metric(handle, 'vllm:num_requests_waiting')) === 2,
      10_000,
      'a full queue',
    )
    const refused = await post(
      `${handle.baseUrl}/v1/completions`,
      handle.apiKey,
      JSON.stringify({ model, prompt: 'one more', max_tokens: 1 }),
    )
    expect(refused.status).toBe(429)
    expect(refused.headers['retry-after']).toBe('1')
    expect(refused.json.error).toMatchObject({ type: 'rate_limit_error', code: 'engine_overloaded' })
    // the queued ones are served, not dropped
    for (const r of await Promise.all(long)) expect(r.usage!.completion_tokens).toBe(450)
  })

  it('stops generating when the client disconnects mid-stream', async () => {
    const before = await metric(handle, 'vllm:generation_tokens_total')
    const controller = new AbortController()
    const stream = await client.completions.create(
      { model, prompt: 'a very long story', max_tokens: 450, temperature: 0, stream: true },
      { signal: controller.signal },
    )
    let chunks = 0
    try {
      for await (const _ of stream) {
        chunks++
        if (chunks === 3) controller.abort()
      }
    } catch {
      // depending on timing the SDK ends the iteration or throws an abort error
    }
    expect(chunks).toBeGreaterThanOrEqual(3)
    await waitFor(
      async () => (await metric(handle, 'vllm:num_requests_running')) === 0,
      5_000,
      'running back to 0',
    )
    const produced = (await metric(handle, 'vllm:generation_tokens_total')) - before
    expect(produced).toBeGreaterThanOrEqual(3)
    expect(produced).toBeLessThan(450)
    // and the engine serves the next request
    const next = await client.completions.create({ model, prompt: 'next', max_tokens: 4, temperature: 0 })
    expect(next.usage!.completion_tokens).toBe(4)
  })
})

describe('embedded engine process isolation', () => {
  it('reports a killed engine process as crashed, leaves this process running, and starts again', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'garage-engine-crash-'))
    const engine = new LlamaCppEngine()
    try {
      const modelPath = join(dir, 'tiny.gguf')
      await writeTinyModel(modelPath)
      await engine.start({ model: modelPath, servedModelName: 'tiny', threads: 1 })
      const crashed = new Promise<Error>((resolve) =>
        engine.addEventListener('crashed', (e) => resolve(e.detail.error), { once: true }),
      )
      process.kill(engine.pid!, 'SIGKILL')
      expect((await crashed).message).toContain('exited')
      expect(engine.state).toBe('crashed')
      expect(await engine.health()).toBe(false)
      const again = await engine.start({ model: modelPath, servedModelName: 'tiny', threads: 1 })
      const res = await fetch(`${again.baseUrl}/v1/models`, {
        headers: { authorization: `Bearer ${again.apiKey}` },
      })
      expect(res.status).toBe(200)
    } finally {
      await engine.stop()
      await rm(dir, { recursive: true, force: true })
    }
  })

  it("fails to start with llama.cpp's reason when the file is not a model", async () => {
    const dir = await mkdtemp(join(tmpdir(), 'garage-engine-bad-'))
    try {
      const bad = join(dir, 'not-a-model.gguf')
      await writeFile(bad, 'GGUF but not really')
      const engine = new LlamaCppEngine()
      await expect(engine.start({ model: bad, threads: 1 })).rejects.toThrow(
        /could not serve .*not-a-model\.gguf/,
      )
      expect(engine.state).toBe('crashed')
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})
