import { mkdtemp, rm } from 'node:fs/promises'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { getLlama, LlamaCompletion, LlamaLogLevel } from 'node-llama-cpp'
import { LlamaCppEngine } from '../daemon/engines/llamacpp/engine.ts'
import { writeTinyModel } from '../daemon/engines/llamacpp/tiny-model.ts'
import { percentile, progress, table, writeResult } from './report.ts'

/**
 * The embedded engine as the daemon runs it (its own process, OpenAI HTTP, SSE streaming) against
 * node-llama-cpp called in-process, same model, same threads, same prompts, side by side in one run.
 */
const concurrencies = [1, 4, 8]
const maxTokens = 128
const rounds = 7
const threads = 1
/**
 * Bigger than the test model so compute, not bookkeeping, dominates, as with a real model: about
 * about 6 ms a token on one core here, where a real 1B model takes 30 ms or more.
 */
const modelSize = {
  seed: 11,
  embeddingLength: 512,
  layers: 8,
  heads: 8,
  feedForwardLength: 1536,
  contextLength: 512,
}

interface Run {
  tokens: number
  seconds: number
  ttftMs: number[]
}

interface Side {
  /** One batch: `concurrency` requests at once, each of maxTokens. */
  batch(round: number): Promise<Run>
  close(): Promise<void>
}

/** node-llama-cpp called directly: one context with `concurrency` sequences, kept warm. */
async function inProcess(modelPath: string, concurrency: number): Promise<Side> {
  const llama = await getLlama({ gpu: false, build: 'never', logLevel: LlamaLogLevel.error })
  const model = await llama.loadModel({ modelPath })
  const context = await model.createContext({
    sequences: concurrency,
    contextSize: 512 * concurrency,
    threads,
  })
  const sequences = Array.from({ length: concurrency }, () => context.getSequence())
  return {
    async batch(round) {
      const ttftMs: number[] = []
      let tokens = 0
      const started = performance.now()
      await Promise.all(
        sequences.map(async (sequence, i) => {
          await sequence.clearHistory()
          const completion = new LlamaCompletion({ contextSequence: sequence, autoDisposeSequence: false })
          const t0 = performance.now()
          let first = true
          let text = ''
          await completion.generateCompletion(prompt(round, i), {
            maxTokens,
            temperature: 0,
            // the same generation work the engine does: a streaming caller wants the text as it comes
            onTextChunk: (chunk) => {
              text += chunk
            },
            onToken: (t) => {
              if (first) ttftMs.push(performance.now() - t0)
              first = false
              tokens += t.length
            },
          })
          completion.dispose({ disposeSequence: false })
          if (text.length === 0) throw new Error('in-process generation produced no text')
        }),
      )
      return { tokens, seconds: (performance.now() - started) / 1000, ttftMs }
    },
    async close() {
      await context.dispose()
      await model.dispose()
      await llama.dispose()
    },
  }
}

/** The embedded engine as the daemon runs it (its own process), over HTTP, streaming. */
async function overHttp(modelPath: string, concurrency: number): Promise<Side> {
  const engine = new LlamaCppEngine()
  const handle = await engine.start({
    model: modelPath,
    servedModelName: 'bench',
    parallel: concurrency,
    threads,
    contextLength: 512,
  })
  const server = { url: handle.baseUrl, apiKey: handle.apiKey }
  return {
    async batch(round) {
      const ttftMs: number[] = []
      let tokens = 0
      const started = performance.now()
      await Promise.all(
        Array.from({ length: concurrency }, async (_, i) => {
          const t0 = performance.now()
          const body = JSON.stringify({
            model: 'bench',
            prompt: prompt(round, i),
            max_tokens: maxTokens,
            temperature: 0,
            stream: true,
            stream_options: { include_usage: true },
          })
          // node:http rather than fetch: a lean client, as the daemon's proxy will be
          const text = await new Promise<string>((resolve, reject) => {
            const req = request(
              `${server.url}/v1/completions`,
              {
                method: 'POST',
                headers: { authorization: `Bearer ${server.apiKey}`, 'content-type': 'application/json' },
              },
              (res) => {
                const chunks: Buffer[] = []
                res.on('data', (c: Buffer) => {
                  if (chunks.length === 0) ttftMs.push(performance.now() - t0)
                  chunks.push(c)
                })
                res.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')))
                res.on('error', reject)
              },
            )
            req.on('error', reject)
            req.end(body)
          })
          for (const line of text.split('\n')) {
            if (!line.startsWith('data: {')) continue
            const event = JSON.parse(line.slice(6)) as { usage?: { completion_tokens: number } }
            if (event.usage != null) tokens += event.usage.completion_tokens
          }
        }),
      )
      return { tokens, seconds: (performance.now() - started) / 1000, ttftMs }
    },
    close: () => engine.stop(),
  }
}

function prompt(round: number, i: number): string {
  return `Prompt ${round}.${i}: once upon a time`
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
      const sides = { inproc: await inProcess(modelPath, c), http: await overHttp(modelPath, c) }
      try {
        // warm both up: the first batch on a fresh context pays for buffer allocation
        await sides.inproc.batch(-1)
        await sides.http.batch(-1)
        const http: number[] = []
        const inproc: number[] = []
        const ratios: number[] = []
        const ttft: number[] = []
        for (let r = 0; r < rounds; r++) {
          // alternate the order so drift on a noisy machine hits both sides alike
          const order = r % 2 === 0 ? (['inproc', 'http'] as const) : (['http', 'inproc'] as const)
          const got: Partial<Record<'inproc' | 'http', Run>> = {}
          for (const side of order) got[side] = await sides[side].batch(r)
          const h = got.http!
          const b = got.inproc!
          inproc.push(b.tokens / b.seconds)
          http.push(h.tokens / h.seconds)
          // paired: both sides of one round saw the same moment of this noisy machine
          ratios.push(h.tokens / h.seconds / (b.tokens / b.seconds))
          ttft.push(...h.ttftMs)
          progress(
            `concurrency ${c}, round ${r + 1}/${rounds}: http ${(h.tokens / h.seconds).toFixed(0)} tok/s, in-process ${(b.tokens / b.seconds).toFixed(0)} tok/s`,
          )
        }
        rows.push({
          concurrency: c,
          http_tokens_per_s: Math.round(median(http)),
          inprocess_tokens_per_s: Math.round(median(inproc)),
          ratio: Number(median(ratios).toFixed(3)),
          ttft_ms_p50: Number(median(ttft).toFixed(1)),
        })
      } finally {
        await sides.inproc.close()
        await sides.http.close()
      }
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
