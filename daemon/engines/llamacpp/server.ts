import { randomBytes, randomUUID } from 'node:crypto'
import { open } from 'node:fs/promises'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { availableParallelism } from 'node:os'
import { setTimeout as sleep } from 'node:timers/promises'
import {
  type ChatHistoryItem,
  type ChatWrapper,
  getLlama,
  type Llama,
  LlamaCompletion,
  type LlamaContext,
  type LlamaContextSequence,
  LlamaLogLevel,
  type LlamaModel,
  resolveChatWrapper,
  type Token,
} from 'node-llama-cpp'
import { Counter, Gauge, Histogram, Registry } from 'prom-client'
import { ApiError, apiError, internalError } from '../../../core/errors.ts'
import {
  bearerMatches,
  closeServer,
  listen,
  readJsonBody,
  requestPath,
  sendError,
} from '../../../core/http.ts'
import { generationKind, modelsPath } from '../../../openai/endpoints.ts'
import { type GenerationRequest, parseGenerationRequest } from './request.ts'

export interface EmbeddedServerOptions {
  modelPath: string
  servedModelName: string
  /** Sequences decoded at once. */
  parallel?: number
  /** Requests that may wait for a sequence; past it, 429. */
  maxQueue?: number
  /** CPU threads for llama.cpp. Default: all cores but one (at least one) so the PC stays usable. */
  threads?: number
  /** Context per sequence, in tokens. Default: the model's training context, capped at 4096. */
  contextSize?: number
  /** Largest request body accepted. */
  maxBodyBytes?: number
  /** Use a GPU back-end when node-llama-cpp has one ('auto'), or the CPU only (false). */
  gpu?: 'auto' | false
  /** Bearer key clients must send; random when not given. */
  apiKey?: string
  /** Tokens per second per sequence: a volunteer's cap on how hard the engine works. None: no cap. */
  maxTokensPerSecond?: number
}

export interface EmbeddedServer {
  url: string
  apiKey: string
  servedModelName: string
  chatTemplate: string
  registry: Registry
  /** Stop accepting requests (503) and resolve when the running ones are done, or after graceMs. */
  drain(graceMs?: number): Promise<void>
  close(): Promise<void>
}

export const defaultMaxBodyBytes = 1024 * 1024
/** Longest a streamed token waits to share a write with the next ones; far below what a reader sees. */
export const streamFlushMs = 10

export function defaultThreads(): number {
  return Math.max(1, availableParallelism() - 1)
}

/** Milliseconds between one sequence's tokens under a cap; anything but a positive finite cap is refused. */
export function tokenIntervalMs(maxTokensPerSecond: number): number {
  if (
    typeof maxTokensPerSecond !== 'number' ||
    !Number.isFinite(maxTokensPerSecond) ||
    maxTokensPerSecond <= 0
  ) {
    throw new RangeError(
      `maxTokensPerSecond must be a positive finite number (tokens per second per sequence); got ${String(maxTokensPerSecond)}`,
    )
  }
  return 1000 / maxTokensPerSecond
}

// Node's timers fire after 1 ms instead of waiting longer than this.
const maxTimerMs = 2 ** 31 - 1

/** Passes a sequence's tokens on, asking for each after the first no sooner than intervalMs after the one before. */
async function* pacedTokens<T, N>(
  inner: AsyncGenerator<T, void, N>,
  intervalMs: number,
  signal: AbortSignal,
): AsyncGenerator<T, void, N> {
  let input: N | undefined
  let lastAt = Number.NEGATIVE_INFINITY
  try {
    while (true) {
      // An abort ends the wait: the caller sees its signal at the next token and stops.
      for (let wait = lastAt + intervalMs - performance.now(); wait > 0 && !signal.aborted; ) {
        await sleep(Math.min(wait, maxTimerMs), undefined, { signal }).catch(() => undefined)
        wait = lastAt + intervalMs - performance.now()
      }
      const { value, done } = await inner.next(input as N)
      if (done) return
      lastAt = performance.now()
      input = yield value
    }
  } finally {
    await inner.return()
  }
}

/**
 * The sequence as one capped generation sees it. Not the context's batching `dispatchSchedule`: in
 * node-llama-cpp 3.22 the context decodes at once when every sequence is waiting and keeps decoding
 * inside one dispatch while sequences keep queueing, so paced dispatches do not cap a sequence.
 */
function pacedSequence(
  sequence: LlamaContextSequence,
  intervalMs: number,
  signal: AbortSignal,
): LlamaContextSequence {
  const evaluateWithMetadata: LlamaContextSequence['evaluateWithMetadata'] = (tokens, metadata, options) =>
    pacedTokens(sequence.evaluateWithMetadata(tokens, metadata, options), intervalMs, signal)
  // evaluate() calls this.evaluateWithMetadata, so this one method paces both.
  return new Proxy(sequence, {
    get: (target, key, receiver) =>
      key === 'evaluateWithMetadata' ? evaluateWithMetadata : Reflect.get(target, key, receiver),
  })
}

interface Slot {
  sequence: LlamaContextSequence
  busy: boolean
}

/** Grants sequences to requests: `parallel` at once, a bounded queue behind them. */
class SequencePool {
  private readonly slots: Slot[]
  private readonly waiting: Array<{
    resolve: (s: Slot) => void
    reject: (e: Error) => void
    signal: AbortSignal
  }> = []
  private readonly maxQueue: number

  constructor(sequences: LlamaContextSequence[], maxQueue: number) {
    this.slots = sequences.map((sequence) => ({ sequence, busy: false }))
    this.maxQueue = maxQueue
  }

  get running(): number {
    return this.slots.filter((s) => s.busy).length
  }

  get queued(): number {
    return this.waiting.length
  }

  get usedTokens(): number {
    return this.slots.reduce((n, s) => n + (s.busy ? s.sequence.nextTokenIndex : 0), 0)
  }

  acquire(signal: AbortSignal): Promise<Slot> {
    const free = this.slots.find((s) => !s.busy)
    if (free != null) {
      free.busy = true
      return Promise.resolve(free)
    }
    if (this.waiting.length >= this.maxQueue) {
      return Promise.reject(
        apiError(
          'engine_overloaded',
          `the engine is busy: ${this.slots.length} requests running and ${this.waiting.length} waiting`,
          { headers: { 'retry-after': '1' } },
        ),
      )
    }
    return new Promise((resolve, reject) => {
      const entry = { resolve, reject, signal }
      this.waiting.push(entry)
      signal.addEventListener(
        'abort',
        () => {
          const i = this.waiting.indexOf(entry)
          if (i >= 0) this.waiting.splice(i, 1)
          reject(new Error('client went away while queued'))
        },
        { once: true },
      )
    })
  }

  release(slot: Slot): void {
    const next = this.waiting.shift()
    if (next != null) next.resolve(slot)
    else slot.busy = false
  }
}

export class ModelFileError extends Error {
  override name = 'ModelFileError'
}

/**
 * Checks a GGUF's fixed header before llama.cpp sees it: node-llama-cpp's reader and llama.cpp's
 * loader both hang, rather than fail, on a file whose counts are garbage.
 */
export async function checkGgufHeader(path: string): Promise<void> {
  const handle = await open(path, 'r').catch((err: Error) => {
    throw new ModelFileError(`cannot open model ${path}: ${err.message}`)
  })
  try {
    const { bytesRead, buffer } = await handle.read(Buffer.alloc(24), 0, 24, 0)
    if (bytesRead < 24 || buffer.toString('latin1', 0, 4) !== 'GGUF')
      throw new ModelFileError(`${path} is not a GGUF file`)
    const version = buffer.readUInt32LE(4)
    if (version !== 2 && version !== 3)
      throw new ModelFileError(`${path} is GGUF version ${version}; llama.cpp reads versions 2 and 3`)
    const tensors = buffer.readBigUInt64LE(8)
    const keys = buffer.readBigUInt64LE(16)
    if (tensors > 1_000_000n || keys > 1_000_000n)
      throw new ModelFileError(`${path} has a corrupt GGUF header (${tensors} tensors, ${keys} keys)`)
  } finally {
    await handle.close()
  }
}

/**
 * The embedded engine: an OpenAI-compatible HTTP server over node-llama-cpp, bound to 127.0.0.1 on a
 * random port, requiring a bearer key, with vLLM's metric names so the daemon treats it like vLLM.
 */
export async function startEmbeddedServer(options: EmbeddedServerOptions): Promise<EmbeddedServer> {
  const parallel = options.parallel ?? 2
  const maxQueue = options.maxQueue ?? 16
  const threads = options.threads ?? defaultThreads()
  const maxBodyBytes = options.maxBodyBytes ?? defaultMaxBodyBytes
  const apiKey = options.apiKey ?? randomBytes(24).toString('base64url')
  const intervalMs = options.maxTokensPerSecond != null ? tokenIntervalMs(options.maxTokensPerSecond) : null
  await checkGgufHeader(options.modelPath)
  // llama.cpp's own warnings go to stderr unasked; keep errors only (the daemon logs through pino).
  const llama: Llama = await getLlama({
    gpu: options.gpu ?? false,
    build: 'never',
    logLevel: LlamaLogLevel.error,
  })
  let model: LlamaModel | undefined
  let context: LlamaContext | undefined
  try {
    model = await llama.loadModel({ modelPath: options.modelPath })
    const perSequence = options.contextSize ?? Math.min(model.trainContextSize, 4096)
    context = await model.createContext({ sequences: parallel, contextSize: perSequence * parallel, threads })
  } catch (err) {
    await context?.dispose()
    await model?.dispose()
    await llama.dispose()
    throw err
  }
  const loadedModel = model
  const loadedContext = context
  const sequenceContext = Math.floor(loadedContext.contextSize / parallel)
  const sequences = Array.from({ length: parallel }, () => loadedContext.getSequence())
  const pool = new SequencePool(sequences, maxQueue)
  const chatWrapper: ChatWrapper = resolveChatWrapper(loadedModel)
  const created = Math.floor(Date.now() / 1000)

  const registry = new Registry()
  const labels = { model_name: options.servedModelName }
  const labelNames = ['model_name'] as const
  new Gauge({
    name: 'vllm:num_requests_running',
    help: 'Number of requests being generated',
    labelNames,
    registers: [registry],
    collect() {
      this.set(labels, pool.running)
    },
  })
  new Gauge({
    name: 'vllm:num_requests_waiting',
    help: 'Number of requests waiting for a sequence',
    labelNames,
    registers: [registry],
    collect() {
      this.set(labels, pool.queued)
    },
  })
  new Gauge({
    name: 'vllm:kv_cache_usage_perc',
    help: 'KV cache usage (1 = full)',
    labelNames,
    registers: [registry],
    collect() {
      this.set(labels, pool.usedTokens / loadedContext.contextSize)
    },
  })
  const generationTokens = new Counter({
    name: 'vllm:generation_tokens_total',
    help: 'Tokens generated',
    labelNames,
    registers: [registry],
  })
  const promptTokens = new Counter({
    name: 'vllm:prompt_tokens_total',
    help: 'Prompt tokens processed',
    labelNames,
    registers: [registry],
  })
  // Bound once: label lookups per token add up. Present from the start (0), as vLLM's are.
  const generated = generationTokens.labels(labels)
  const prompted = promptTokens.labels(labels)
  generated.inc(0)
  prompted.inc(0)
  const ttft = new Histogram({
    name: 'vllm:time_to_first_token_seconds',
    help: 'Time to first token',
    labelNames,
    buckets: [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10],
    registers: [registry],
  })
  const itl = new Histogram({
    name: 'vllm:inter_token_latency_seconds',
    help: 'Time between tokens',
    labelNames,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1],
    registers: [registry],
  })

  const ttftObserved = ttft.labels(labels)
  const itlObserved = itl.labels(labels)

  let draining = false
  const idle: Array<() => void> = []
  const checkIdle = (): void => {
    if (pool.running === 0 && pool.queued === 0) for (const f of idle.splice(0)) f()
  }

  /** The prompt as tokens, and what ends the answer: the chat template's turn end, the user's stop strings. */
  function render(req: GenerationRequest): {
    tokens: Token[]
    stops: Array<string | ReturnType<ChatWrapper['generateContextState']>['stopGenerationTriggers'][number]>
  } {
    if (req.kind === 'completion') {
      const text = loadedModel.tokenize(req.prompt, false)
      const bos = loadedModel.tokens.bos
      const tokens = loadedModel.tokens.shouldPrependBosToken && bos != null ? [bos, ...text] : text
      return { tokens, stops: [...req.stop] }
    }
    const history: ChatHistoryItem[] = req.messages.map((m) =>
      m.role === 'assistant' ? { type: 'model', response: [m.content] } : { type: m.role, text: m.content },
    )
    history.push({ type: 'model', response: [] })
    const state = chatWrapper.generateContextState({ chatHistory: history })
    return {
      tokens: state.contextText.tokenize(loadedModel.tokenizer),
      stops: [...state.stopGenerationTriggers, ...req.stop],
    }
  }

  async function generate(
    req: GenerationRequest,
    res: ServerResponse,
    clientGone: AbortSignal,
  ): Promise<void> {
    const { tokens, stops } = render(req)
    if (tokens.length >= sequenceContext) {
      throw apiError(
        'context_length_exceeded',
        `the prompt is ${tokens.length} tokens; this engine's context is ${sequenceContext}`,
        { param: req.kind === 'chat' ? 'messages' : 'prompt' },
      )
    }
    const maxTokens = Math.min(
      req.maxTokens ?? sequenceContext - tokens.length,
      sequenceContext - tokens.length,
    )
    const slot = await pool.acquire(clientGone)
    const id = `${req.kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID()}`
    const started = performance.now()
    let first: number | null = null
    let last = 0
    let produced = 0
    // The first event goes out at once (time to first token); later ones are gathered for at most
    // streamFlushMs and sent in one write: a wake-up of the client per burst, not per token.
    let pendingEvents: string[] = []
    let flushTimer: NodeJS.Timeout | undefined
    let sentFirst = false
    const flush = (): void => {
      clearTimeout(flushTimer)
      flushTimer = undefined
      if (pendingEvents.length === 0) return
      res.write(pendingEvents.join(''))
      pendingEvents = []
    }
    const chunk = (body: Record<string, unknown>): void => {
      pendingEvents.push(`data: ${JSON.stringify(body)}\n\n`)
      if (!sentFirst || pendingEvents.length === 1) {
        if (!sentFirst) {
          sentFirst = true
          flush()
        } else flushTimer = setTimeout(flush, streamFlushMs)
      }
    }
    const object =
      req.kind === 'chat' ? (req.stream ? 'chat.completion.chunk' : 'chat.completion') : 'text_completion'
    const base = { id, object, created: Math.floor(Date.now() / 1000), model: options.servedModelName }
    let completion: LlamaCompletion | undefined
    try {
      await slot.sequence.clearHistory()
      if (req.stream) {
        res.writeHead(200, {
          'content-type': 'text/event-stream',
          'cache-control': 'no-cache',
          connection: 'keep-alive',
        })
        if (req.kind === 'chat')
          chunk({
            ...base,
            choices: [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }],
          })
      }
      const sequence =
        intervalMs != null ? pacedSequence(slot.sequence, intervalMs, clientGone) : slot.sequence
      completion = new LlamaCompletion({ contextSequence: sequence, autoDisposeSequence: false })
      const result = await completion.generateCompletionWithMeta(tokens, {
        maxTokens,
        temperature: req.temperature,
        // Only what the request sets: each stage node-llama-cpp adds costs per token.
        ...(req.topP < 1 ? { topP: req.topP } : {}),
        ...(req.seed != null ? { seed: req.seed } : {}),
        ...(stops.length > 0 ? { customStopTriggers: stops } : {}),
        signal: clientGone,
        stopOnAbortSignal: true,
        onToken: (t) => {
          const now = performance.now()
          if (first == null) {
            first = now
            ttftObserved.observe((now - started) / 1000)
          } else {
            itlObserved.observe((now - last) / 1000 / Math.max(1, t.length))
          }
          last = now
          produced += t.length
          generated.inc(t.length)
        },
        onTextChunk: (text) => {
          if (!req.stream || text === '') return
          chunk({
            ...base,
            choices: [
              req.kind === 'chat'
                ? { index: 0, delta: { content: text }, finish_reason: null }
                : { index: 0, text, finish_reason: null },
            ],
          })
        },
      })
      prompted.inc(tokens.length)
      const finish = result.metadata.stopReason === 'maxTokens' ? 'length' : 'stop'
      const usage = {
        prompt_tokens: tokens.length,
        completion_tokens: produced,
        total_tokens: tokens.length + produced,
      }
      if (clientGone.aborted) return
      if (req.stream) {
        chunk({
          ...base,
          choices: [
            req.kind === 'chat'
              ? { index: 0, delta: {}, finish_reason: finish }
              : { index: 0, text: '', finish_reason: finish },
          ],
        })
        if (req.includeUsage) chunk({ ...base, choices: [], usage })
        flush()
        res.end('data: [DONE]\n\n')
      } else {
        const choice =
          req.kind === 'chat'
            ? {
                index: 0,
                message: { role: 'assistant', content: result.response },
                finish_reason: finish,
                logprobs: null,
              }
            : { index: 0, text: result.response, finish_reason: finish, logprobs: null }
        res
          .writeHead(200, { 'content-type': 'application/json' })
          .end(JSON.stringify({ ...base, choices: [choice], usage }))
      }
    } catch (err) {
      if (req.stream && res.headersSent) {
        // After the first byte an error can only end the stream, as an OpenAI-style error event.
        chunk({
          error: {
            message: (err as Error).message,
            type: 'server_error',
            param: null,
            code: 'generation_failed',
          },
        })
        flush()
        res.end('data: [DONE]\n\n')
        return
      }
      throw err
    } finally {
      completion?.dispose({ disposeSequence: false })
      pool.release(slot)
      checkIdle()
    }
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = requestPath(req)
    if (req.method === 'GET' && path === '/health') {
      res
        .writeHead(draining ? 503 : 200, { 'content-type': 'application/json' })
        .end(JSON.stringify({ status: draining ? 'draining' : 'ok' }))
      return
    }
    if (req.method === 'GET' && path === '/metrics') {
      res.writeHead(200, { 'content-type': registry.contentType }).end(await registry.metrics())
      return
    }
    if (!bearerMatches(req.headers.authorization, apiKey)) {
      throw apiError('invalid_api_key', 'a valid bearer key is required (Authorization: Bearer <key>)')
    }
    if (req.method === 'GET' && path === modelsPath) {
      res.writeHead(200, { 'content-type': 'application/json' }).end(
        JSON.stringify({
          object: 'list',
          data: [
            {
              id: options.servedModelName,
              object: 'model',
              created,
              owned_by: 'garage',
              max_model_len: sequenceContext,
            },
          ],
        }),
      )
      return
    }
    const kind = generationKind(path)
    if (kind == null) throw apiError('not_found', `no such endpoint: ${req.method} ${path}`)
    if (req.method !== 'POST') throw apiError('method_not_allowed', `${path} takes POST`)
    if (draining) throw apiError('engine_draining', 'the engine is draining and takes no new requests')
    const body = await readJsonBody(req, maxBodyBytes)
    const parsed = parseGenerationRequest(kind, body, sequenceContext)
    if (parsed.model !== options.servedModelName) {
      throw apiError(
        'model_not_found',
        `the model ${JSON.stringify(parsed.model)} does not exist here; this engine serves ${JSON.stringify(options.servedModelName)}`,
        { param: 'model' },
      )
    }
    const gone = new AbortController()
    res.on('close', () => {
      if (!res.writableFinished) gone.abort()
    })
    await generate(parsed, res, gone.signal)
  }

  const server: Server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      sendError(res, err instanceof ApiError ? err : internalError(err))
    })
  })
  const url = await listen(server, 0, '127.0.0.1', { what: 'the embedded engine' })
  let closed = false
  return {
    url,
    apiKey,
    servedModelName: options.servedModelName,
    chatTemplate: chatWrapper.wrapperName,
    registry,
    drain(graceMs = 30_000) {
      draining = true
      if (pool.running === 0 && pool.queued === 0) return Promise.resolve()
      return new Promise<void>((resolve) => {
        const t = setTimeout(resolve, graceMs)
        idle.push(() => {
          clearTimeout(t)
          resolve()
        })
      })
    },
    async close() {
      if (closed) return
      closed = true
      draining = true
      await closeServer(server)
      // Closed connections abort their generations; let them unwind before the context goes.
      if (pool.running > 0) await new Promise<void>((resolve) => idle.push(resolve))
      await loadedContext.dispose()
      await loadedModel.dispose()
      await llama.dispose()
    },
  }
}
