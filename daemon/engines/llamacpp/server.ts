import { randomBytes } from 'node:crypto'
import { open } from 'node:fs/promises'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { availableParallelism } from 'node:os'
import {
  type ChatWrapper,
  getLlama,
  type Llama,
  LlamaContext,
  type LlamaEmbeddingContext,
  LlamaLogLevel,
  type LlamaModel,
  resolveChatWrapper,
} from 'node-llama-cpp'
import type { Registry } from 'prom-client'
import { ApiError, apiError, internalError } from '../../../core/errors.ts'
import {
  bearerMatches,
  closeServer,
  listen,
  readJsonBody,
  requestPath,
  sendError,
} from '../../../core/http.ts'
import type { ModelTask } from '../../../mesh/region-messages.ts'
import { embeddingsPath, generationKind, modelIdOf, modelsPath } from '../../../openai/endpoints.ts'
import { Embedder } from './embeddings.ts'
import { Generator } from './generate.ts'
import { GrammarCache, patchGrammars } from './grammar.ts'
import { tokenBytes } from './logprobs.ts'
import { embeddedEngineMetrics } from './metrics.ts'
import { type EngineLimits, maxChoices, parseEmbeddingRequest, parseGenerationRequest } from './request.ts'
import { SequencePool, SlotPool, tokenIntervalMs } from './sequences.ts'

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
  /** What the model serves: chat and completions (default), or embeddings. */
  task?: ModelTask
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

export function defaultThreads(): number {
  return Math.max(1, availableParallelism() - 1)
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
  // Before any grammar is made: JSON numbers the model writes stay numbers JSON.parse can hold.
  await patchGrammars()
  // llama.cpp's own warnings go to stderr unasked; keep errors only (the daemon logs through pino).
  const llama: Llama = await getLlama({
    gpu: options.gpu ?? false,
    build: 'never',
    logLevel: LlamaLogLevel.error,
  })
  const task = options.task ?? 'generate'
  let model: LlamaModel | undefined
  let context: LlamaContext | LlamaEmbeddingContext | undefined
  // Context per sequence (node-llama-cpp 3 sizes each sequence to contextSize).
  let sequenceContext = 0
  try {
    model = await llama.loadModel({ modelPath: options.modelPath })
    sequenceContext = options.contextSize ?? Math.min(model.trainContextSize, 4096)
    context =
      task === 'embed'
        ? await model.createEmbeddingContext({ contextSize: sequenceContext, threads })
        : await model.createContext({ sequences: parallel, contextSize: sequenceContext, threads })
  } catch (err) {
    await context?.dispose()
    await model?.dispose()
    await llama.dispose()
    throw err
  }
  const loadedModel = model
  const loadedContext = context
  const chatWrapper: ChatWrapper = resolveChatWrapper(loadedModel)
  const created = Math.floor(Date.now() / 1000)
  const limits: EngineLimits = {
    contextTokens: sequenceContext,
    vocabularySize: loadedModel.fileInfo.metadata.tokenizer.ggml.tokens.length,
    maxChoices,
  }

  const pool: SequencePool | SlotPool<LlamaEmbeddingContext> =
    loadedContext instanceof LlamaContext
      ? new SequencePool(
          Array.from({ length: parallel }, () => loadedContext.getSequence()),
          maxQueue,
        )
      : new SlotPool([loadedContext as LlamaEmbeddingContext], maxQueue)
  const metrics = embeddedEngineMetrics(options.servedModelName, pool, sequenceContext * parallel)
  const { registry } = metrics

  let draining = false
  const idle: Array<() => void> = []
  const checkIdle = (): void => {
    if (pool.running === 0 && pool.queued === 0) for (const f of idle.splice(0)) f()
  }
  const generator =
    pool instanceof SequencePool
      ? new Generator({
          model: loadedModel,
          chatWrapper,
          grammars: new GrammarCache(llama),
          bytes: tokenBytes(loadedModel),
          sequenceContext,
          pool,
          metrics,
          servedModelName: options.servedModelName,
          intervalMs,
          onRequestDone: checkIdle,
        })
      : null
  const embedder =
    generator == null
      ? new Embedder({
          model: loadedModel,
          pool: pool as SlotPool<LlamaEmbeddingContext>,
          metrics,
          servedModelName: options.servedModelName,
          contextTokens: sequenceContext,
        })
      : null
  const modelCard = {
    id: options.servedModelName,
    object: 'model',
    created,
    owned_by: 'garage',
    max_model_len: sequenceContext,
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
      res
        .writeHead(200, { 'content-type': 'application/json' })
        .end(JSON.stringify({ object: 'list', data: [modelCard] }))
      return
    }
    const modelId = modelIdOf(path)
    if (modelId != null) {
      if (req.method !== 'GET') throw apiError('method_not_allowed', `${path} takes GET`)
      if (modelId !== options.servedModelName)
        throw apiError('model_not_found', `the model ${JSON.stringify(modelId)} does not exist here`, {
          param: 'model',
        })
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(modelCard))
      return
    }
    const kind = generationKind(path)
    if (kind == null && path !== embeddingsPath)
      throw apiError('not_found', `no such endpoint: ${req.method} ${path}`)
    if (req.method !== 'POST') throw apiError('method_not_allowed', `${path} takes POST`)
    if (draining) throw apiError('engine_draining', 'the engine is draining and takes no new requests')
    const body = await readJsonBody(req, maxBodyBytes)
    const model = (body as { model?: unknown } | null)?.model
    if (typeof model === 'string' && model !== options.servedModelName) {
      throw apiError(
        'model_not_found',
        `the model ${JSON.stringify(model)} does not exist here; this engine serves ${JSON.stringify(options.servedModelName)}`,
        { param: 'model' },
      )
    }
    const gone = new AbortController()
    res.on('close', () => {
      if (!res.writableFinished) gone.abort()
    })
    if (kind == null) {
      if (embedder == null)
        throw apiError(
          'unsupported_value',
          `${options.servedModelName} generates text; it serves no embeddings`,
          { param: 'model' },
        )
      const answer = await embedder.embed(parseEmbeddingRequest(body, limits), gone.signal)
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer))
      return
    }
    if (generator == null)
      throw apiError(
        'unsupported_value',
        `${options.servedModelName} is an embedding model: use /v1/embeddings`,
        { param: 'model' },
      )
    await generator.generate(parseGenerationRequest(kind, body, limits), res, gone.signal)
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
