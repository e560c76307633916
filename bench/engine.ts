import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { getLlama, LlamaCompletion } from 'node-llama-cpp'
import { startEmbeddedServer } from '../daemon/engines/llamacpp/server.ts'
import { writeTinyModel } from '../daemon/engines/llamacpp/tiny-model.ts'
import { percentile, progress, table, writeResult } from './report.ts'

/**
 * The embedded engine over HTTP (SSE streaming, as the mesh will call it) against node-llama-cpp
 * called in-process, same model, same threads, same prompts, side by side in one run.
 */
const concurrencies = [1, 4, 8]
const maxTokens = 128
const rounds = 3
const threads = 1
/** Bigger than the test model so compute, not bookkeeping, dominates, as with a real model. */
const modelSize = {
  seed: 11,
  embeddingLength: 256,
  layers: 4,
  heads: 4,
  feedForwardLength: 768,
  contextLength: 512,
}

interface Run {
  tokens: number
  seconds: number
  ttftMs: number[]
}

async function inProcess(modelPath: string, concurrency: number): Promise<Run> {
  const llama = await getLlama({ gpu: false, build: 'never' })
  const model = await llama.loadModel({ modelPath })
  const context = await model.createContext({
    sequences: concurrency,
    contextSize: 512 * concurrency,
    threads,
  })
  try {
    const ttftMs: number[] = []
    let tokens = 0
    const started = performance.now()
    await Promise.all(
      Array.from({ length: concurrency }, async (_, i) => {
        const completion = new LlamaCompletion({ contextSequence: context.getSequence() })
        const t0 = performance.now()
        let first = true
        await completion.generateCompletion(`Prompt number ${i}: once upon a time`, {
          maxTokens,
          temperature: 0,
          onToken: (t) => {
            if (first) ttftMs.push(performance.now() - t0)
            first = false
            tokens += t.length
          },
        })
      }),
    )
    return { tokens, seconds: (performance.now() - started) / 1000, ttftMs }
  } finally {
    await context.dispose()
    await model.dispose()
    await llama.dispose()
  }
}

async function overHttp(modelPath: string, concurrency: number): Promise<Run> {
  const server = await startEmbeddedServer({
    modelPath,
    servedModelName: 'bench',
    parallel: concurrency,
    threads,
    contextSize: 512,
  })
  try {
    const ttftMs: number[] = []
    let tokens = 0
    const started = performance.now()
    await Promise.all(
      Array.from({ length: concurrency }, async (_, i) => {
        const t0 = performance.now()
        const res = await fetch(`${server.url}/v1/completions`, {
          method: 'POST',
          headers: { authorization: `Bearer ${server.apiKey}`, 'content-type': 'application/json' },
          body: JSON.stringify({
            model: 'bench',
            prompt: `Prompt number ${i}: once upon a time`,
            max_tokens: maxTokens,
            temperature: 0,
            stream: true,
            stream_options: { include_usage: true },
          }),
        })
        const decoder = new TextDecoder()
        let first = true
        let buffer = ''
        for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
          if (first) ttftMs.push(performance.now() - t0)
          first = false
          buffer += decoder.decode(chunk, { stream: true })
        }
        for (const line of buffer.split('\n')) {
          if (!line.startsWith('data: {')) continue
          const event = JSON.parse(line.slice(6)) as { usage?: { completion_tokens: number } }
          if (event.usage != null) tokens += event.usage.completion_tokens
        }
      }),
    )
    return { tokens, seconds: (performance.now() - started) / 1000, ttftMs }
  } finally {
    await server.close()
  }
}

function median(xs: number[]): number {
  return percentile(xs, 50)
}

export async function run(): Promise<Record<string, unknown>> {
  const dir = await mkdtemp(join(tmpdir(), 'garage-bench-engine-'))
  try {
    const modelPath = join(dir, 'bench.gguf')
    await writeTinyModel(modelPath, modelSize)
    const rows: Array<Record<string, number>> = []
    for (const c of concurrencies) {
      const http: number[] = []
      const inproc: number[] = []
      const ttft: number[] = []
      for (let r = 0; r < rounds; r++) {
        // alternate the order so drift on a noisy machine hits both sides alike
        const a = r % 2 === 0 ? await inProcess(modelPath, c) : null
        const h = await overHttp(modelPath, c)
        const b = a ?? (await inProcess(modelPath, c))
        inproc.push(b.tokens / b.seconds)
        http.push(h.tokens / h.seconds)
        ttft.push(...h.ttftMs)
        progress(
          `concurrency ${c}, round ${r + 1}/${rounds}: http ${(h.tokens / h.seconds).toFixed(0)} tok/s, in-process ${(b.tokens / b.seconds).toFixed(0)} tok/s`,
        )
      }
      rows.push({
        concurrency: c,
        http_tokens_per_s: Math.round(median(http)),
        inprocess_tokens_per_s: Math.round(median(inproc)),
        ratio: Number((median(http) / median(inproc)).toFixed(3)),
        ttft_ms_p50: Number(median(ttft).toFixed(1)),
      })
    }
    const goalMet = rows.every((r) => (r.ratio ?? 0) >= 0.9)
    const result = {
      model: modelSize,
      threads,
      max_tokens: maxTokens,
      rounds,
      results: rows,
      goal: { ratio: '>= 0.9 at every concurrency' },
      goal_met: goalMet,
    }
    const path = await writeResult('engine', result)
    process.stdout.write(
      `\nengine: embedded HTTP engine vs node-llama-cpp in-process (${threads} thread, ${maxTokens} tokens per request)\n${table(
        rows.flatMap((r) => [
          [`c=${r.concurrency} http_tokens_per_s`, String(r.http_tokens_per_s), ''],
          [`c=${r.concurrency} inprocess_tokens_per_s`, String(r.inprocess_tokens_per_s), ''],
          [`c=${r.concurrency} ratio`, String(r.ratio), '>= 0.9'],
          [`c=${r.concurrency} ttft_ms_p50`, String(r.ttft_ms_p50), ''],
        ]) as Array<[string, string, string]>,
      )}\n${goalMet ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}
