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
 * Then grammar-constrained generation (a json_schema request) beside unconstrained generation of the
 * same length on the same engine. The tiny model's vocabulary is 270 tokens: a grammar checks each
 * candidate token, so on a real model's 100k+ vocabulary the constrained side pays more than here.
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

/** One streamed request: the path and the body of request `i` of round `round`. */
type Ask = (round: number, i: number) => { path: string; body: Record<string, unknown> }

const completionAsk: Ask = (round, i) => ({
  path: '/v1/completions',
  body: { prompt: prompt(round, i), max_tokens: maxTokens, temperature: 0 },
})

/** The embedded engine as the daemon runs it (its own process), over HTTP, streaming. */
async function overHttp(modelPath: string, concurrency: number, ask: Ask = completionAsk): Promise<Side> {
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
          const { path, body } = ask(round, i)
          const payload = JSON.stringify({
            model: 'bench',
            ...body,
            stream: true,
            stream_options: { include_usage: true },
          })
          // node:http rather than fetch: a lean client, as the daemon's proxy will be
          const { status, text } = await new Promise<{ status: number; text: string }>((resolve, reject) => {
            const req = request(
              `${server.url}${path}`,
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
                res.on('end', () =>
                  resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }),
                )
                res.on('error', reject)
              },
            )
            req.on('error', reject)
            req.end(payload)
          })
          if (status !== 200) throw new Error(`${path} answered ${status}: ${text.slice(0, 300)}`)
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

/**
 * Structured output: a list of records far longer than max_tokens, so every answer, constrained or
 * not, is exactly max_tokens long and the two differ only by the grammar.
 */
const recordsSchema = {
  type: 'object',
  properties: {
    items: {
      type: 'array',
      minItems: 64,
      items: {
        type: 'object',
        properties: {
          name: { type: 'string', maxLength: 12 },
          qty: { type: 'integer' },
          price: { type: 'number' },
          ok: { type: 'boolean' },
          tag: { enum: ['a', 'b', 'c'] },
        },
        required: ['name', 'qty', 'price', 'ok', 'tag'],
        additionalProperties: false,
      },
    },
  },
  required: ['items'],
  additionalProperties: false,
}
const chatAsk =
  (constrained: boolean): Ask =>
  (round, i) => ({
    path: '/v1/chat/completions',
    body: {
      messages: [{ role: 'user', content: `${prompt(round, i)}: list the stock as JSON` }],
      max_tokens: maxTokens,
      temperature: 0,
      ...(constrained
        ? {
            response_format: {
              type: 'json_schema',
              json_schema: { name: 'stock', strict: true, schema: recordsSchema },
            },
          }
        : {}),
    },
  })
const structuredConcurrencies = [1, 4]

/** Grammar-constrained (json_schema) against unconstrained chat, same engine, same length, paired. */
async function structured(modelPath: string): Promise<Array<Record<string, number>>> {
  const rows: Array<Record<string, number>> = []
  for (const c of structuredConcurrencies) {
    const sides = {
      free: await overHttp(modelPath, c, chatAsk(false)),
      constrained: await overHttp(modelPath, c, chatAsk(true)),
    }
    try {
      await sides.free.batch(-1)
      await sides.constrained.batch(-1) // compiles and caches the grammar
      const free: number[] = []
      const constrained: number[] = []
      const ratios: number[] = []
      for (let r = 0; r < rounds; r++) {
        const order = r % 2 === 0 ? (['free', 'constrained'] as const) : (['constrained', 'free'] as const)
        const got: Partial<Record<'free' | 'constrained', Run>> = {}
        for (const side of order) got[side] = await sides[side].batch(r)
        const f = got.free!.tokens / got.free!.seconds
        const k = got.constrained!.tokens / got.constrained!.seconds
        free.push(f)
        constrained.push(k)
        ratios.push(k / f)
        progress(
          `structured output, concurrency ${c}, round ${r + 1}/${rounds}: json_schema ${k.toFixed(0)} tok/s, free ${f.toFixed(0)} tok/s`,
        )
      }
      rows.push({
        concurrency: c,
        constrained_tokens_per_s: Math.round(median(constrained)),
        unconstrained_tokens_per_s: Math.round(median(free)),
        constrained_tokens_per_s_ratio: Number(median(ratios).toFixed(3)),
      })
    } finally {
      await sides.free.close()
      await sides.constrained.close()
    }
  }
  return rows
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
    const structuredRows = await structured(modelPath)
    const goalMet =
      rows.every((r) => (r.ratio ?? 0) >= 0.9) &&
      structuredRows.every((r) => (r.constrained_tokens_per_s_ratio ?? 0) >= 0.8)
    const result = {
      model: modelSize,
      threads,
      max_tokens: maxTokens,
      rounds,
      results: rows,
      structured: structuredRows,
      goal: {
        ratio: '>= 0.9 at every concurrency',
        constrained_tokens_per_s_ratio: '>= 0.8 at every concurrency (json_schema vs free chat)',
      },
      goal_met: goalMet,
    }
    const path = await writeResult('engine', result)
    process.stdout.write(
      `\nengine: embedded HTTP engine vs node-llama-cpp in-process (${threads} thread, ${maxTokens} tokens per request)\n${table(
        rows
          .flatMap((r) => [
            [`c=${r.concurrency} http_tokens_per_s`, String(r.http_tokens_per_s), ''],
            [`c=${r.concurrency} inprocess_tokens_per_s`, String(r.inprocess_tokens_per_s), ''],
            [`c=${r.concurrency} ratio`, String(r.ratio), '>= 0.9'],
            [`c=${r.concurrency} ttft_ms_p50`, String(r.ttft_ms_p50), ''],
          ])
          .concat(
            structuredRows.flatMap((r) => [
              [`c=${r.concurrency} json_schema tokens_per_s`, String(r.constrained_tokens_per_s), ''],
              [`c=${r.concurrency} unconstrained tokens_per_s`, String(r.unconstrained_tokens_per_s), ''],
              [
                `c=${r.concurrency} constrained_tokens_per_s_ratio`,
                String(r.constrained_tokens_per_s_ratio),
                '>= 0.8',
              ],
            ]),
          ) as Array<[string, string, string]>,
      )}\n${goalMet ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}
