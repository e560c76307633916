import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { LlamaCppEngine } from '../../../../daemon/engines/llamacpp/engine.ts'
import { writeTinyModel } from '../../../../daemon/engines/llamacpp/tiny-model.ts'
import type { EngineHandle, EngineStartOptions } from '../../../../daemon/engines/types.ts'

/** One 40-token completion; resolves with how long it took and how many tokens came back. */
async function complete(handle: EngineHandle): Promise<{ ms: number; tokens: number }> {
  const started = performance.now()
  const res = await fetch(`${handle.baseUrl}/v1/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${handle.apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: handle.servedModelName, prompt: 'hello there', max_tokens: 40, seed: 1 }),
  })
  const body = (await res.json()) as { usage: { completion_tokens: number } }
  expect(res.status).toBe(200)
  return { ms: performance.now() - started, tokens: body.usage.completion_tokens }
}

describe('embedded engine throughput cap (maxTokensPerSecond)', () => {
  let dir: string
  const engines: LlamaCppEngine[] = []
  let options: EngineStartOptions

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-throttle-'))
    const model = join(dir, 'tiny.gguf')
    await writeTinyModel(model, { seed: 7 })
    options = { model, servedModelName: 'garage-tiny', parallel: 2, threads: 1 }
  })
  afterAll(async () => {
    await Promise.all(engines.map((e) => e.stop()))
    await rm(dir, { recursive: true, force: true })
  })

  it('50 tok/s: 40 tokens take at least 39 intervals, both sequences busy at once; uncapped is far faster', async () => {
    const [capped, uncapped] = [new LlamaCppEngine(), new LlamaCppEngine()]
    engines.push(capped, uncapped)
    const [cappedHandle, uncappedHandle] = await Promise.all([
      capped.start({ ...options, maxTokensPerSecond: 50 }),
      uncapped.start(options),
    ])
    const fast = await complete(uncappedHandle)
    // Every sequence busy: where node-llama-cpp's context would decode without waiting for a schedule.
    const slow = await Promise.all([complete(cappedHandle), complete(cappedHandle)])
    expect(fast.tokens).toBe(40)
    for (const run of slow) {
      expect(run.tokens).toBe(40)
      // 39 gaps of 20 ms after the first token.
      expect(run.ms).toBeGreaterThanOrEqual(750)
      expect(fast.ms * 2).toBeLessThan(run.ms)
    }
  })

  it('refuses a cap that is not a positive finite number before starting anything', async () => {
    const engine = new LlamaCppEngine()
    for (const maxTokensPerSecond of [0, -5, Number.NaN, Number.POSITIVE_INFINITY]) {
      await expect(engine.start({ ...options, maxTokensPerSecond })).rejects.toMatchObject({
        name: 'EngineStartError',
        code: 'ENGINE_OPTIONS_INVALID',
      })
    }
    expect(engine.state).toBe('stopped')
    expect(engine.pid).toBeNull()
  })
})
