import OpenAI from 'openai'
import type { Random } from './fault-random.ts'

/**
 * Steady load through the official `openai` client: workers that each send one request after the
 * other (streamed or not, chat or completion), every request with its own deadline, and a record of
 * what the client saw. Times are `performance.now()` milliseconds, the clock the fault timeline uses.
 */

/** How a request that did not succeed ended, as the client saw it. */
export type FailureKind =
  /** No answer: connection refused or reset before any response head. */
  | 'connection'
  /** An error answer (status ≥ 400) before anything was streamed. */
  | 'http'
  /** The request's deadline passed (the client gave up). */
  | 'timeout'
  /** A stream that had started ended with an SSE error event. */
  | 'stream-error'
  /** A stream that had started broke off (the connection closed mid-body). */
  | 'stream-broken'
  /** A stream that ended without a finish_reason. */
  | 'stream-incomplete'

export interface RequestRecord {
  id: number
  worker: number
  keyName: string
  api: 'chat' | 'completion'
  stream: boolean
  maxTokens: number
  start: number
  /** The response head arrived (for a stream: streaming had started). */
  headersAt: number | null
  firstChunkAt: number | null
  end: number
  status: number | null
  region: string | null
  node: string | null
  requestId: string | null
  /** Completion tokens the client received: usage when it came, else content-bearing chunks. */
  tokens: number
  promptTokens: number | null
  contentChunks: number
  usageSeen: boolean
  finishReason: string | null
  ok: boolean
  failure: {
    kind: FailureKind
    name: string
    message: string
    code: string | null
    status: number | null
  } | null
}

export interface LoadOptions {
  baseUrl: string
  keys: Array<{ name: string; key: string }>
  workers: number
  requestTimeoutMs: number
  /** Pause after a failed request, so a worker does not spin on a refused connection. */
  failurePauseMs: number
  maxTokens: { min: number; max: number }
  random: Random
}

interface Chunk {
  choices?: Array<{
    text?: string | null
    delta?: { content?: string | null }
    finish_reason?: string | null
  }>
  usage?: { completion_tokens?: number; prompt_tokens?: number } | null
}

/** UTF-8 bytes of one chunk's generated text: a chunk with any counts as one token received. */
function chunkText(chunk: Chunk): { bytes: number; finish: string | null } {
  let bytes = 0
  let finish: string | null = null
  for (const c of chunk.choices ?? []) {
    bytes += Buffer.byteLength(c.text ?? '', 'utf8') + Buffer.byteLength(c.delta?.content ?? '', 'utf8')
    if (c.finish_reason != null) finish = c.finish_reason
  }
  return { bytes, finish }
}

function describeFailure(
  err: unknown,
  afterHeaders: boolean,
  timedOut: boolean,
): NonNullable<RequestRecord['failure']> {
  const e = err as Error & { status?: number; code?: string | null }
  const base = { name: e?.name ?? 'Error', message: String(e?.message ?? err).slice(0, 300) }
  const code = typeof e?.code === 'string' ? e.code : null
  if (timedOut || err instanceof OpenAI.APIUserAbortError || err instanceof OpenAI.APIConnectionTimeoutError)
    return { kind: 'timeout', ...base, code, status: null }
  if (err instanceof OpenAI.APIConnectionError)
    return { kind: afterHeaders ? 'stream-broken' : 'connection', ...base, code, status: null }
  if (err instanceof OpenAI.APIError) {
    if (err.status != null) return { kind: 'http', ...base, code, status: err.status }
    return { kind: 'stream-error', ...base, code, status: null }
  }
  return { kind: afterHeaders ? 'stream-broken' : 'connection', ...base, code, status: null }
}

export class LoadGenerator {
  readonly records: RequestRecord[] = []
  private readonly options: LoadOptions
  private readonly clients: Map<string, OpenAI>
  private readonly controller = new AbortController()
  private readonly inFlight = new Map<number, { start: number; stream: boolean }>()
  private readonly listeners = new Set<(r: RequestRecord) => void>()
  private workers: Array<Promise<void>> = []
  private nextId = 0

  constructor(options: LoadOptions) {
    this.options = options
    this.clients = new Map(
      options.keys.map((k) => [
        k.name,
        // No SDK retries: every failure must be seen. Its own timeout stays out of the way of ours.
        new OpenAI({
          baseURL: `${options.baseUrl}/v1`,
          apiKey: k.key,
          maxRetries: 0,
          timeout: options.requestTimeoutMs * 2,
        }),
      ]),
    )
  }

  start(): void {
    this.workers = Array.from({ length: this.options.workers }, (_, w) => this.work(w))
  }

  /** Stops sending; resolves when every request in flight has ended (each has its own deadline). */
  async stop(): Promise<void> {
    this.controller.abort()
    await Promise.all(this.workers)
  }

  /** Requests still open: after stop() resolves there must be none. */
  pending(): Array<{ id: number; start: number; stream: boolean }> {
    return [...this.inFlight].map(([id, r]) => ({ id, ...r }))
  }

  /** Resolves with the first record (already in or to come) that passes `test`; null after `timeoutMs`. */
  waitFor(test: (r: RequestRecord) => boolean, timeoutMs: number): Promise<RequestRecord | null> {
    const found = this.records.find(test)
    if (found != null) return Promise.resolve(found)
    return new Promise((resolve) => {
      const onRecord = (r: RequestRecord): void => {
        if (!test(r)) return
        clearTimeout(timer)
        this.listeners.delete(onRecord)
        resolve(r)
      }
      const timer = setTimeout(() => {
        this.listeners.delete(onRecord)
        resolve(null)
      }, timeoutMs)
      this.listeners.add(onRecord)
    })
  }

  private async work(worker: number): Promise<void> {
    const { keys, random } = this.options
    const key = keys[worker % keys.length]!
    while (!this.controller.signal.aborted) {
      const record = await this.one(worker, key.name, {
        api: random.next() < 0.5 ? 'chat' : 'completion',
        stream: random.next() < 0.6,
        maxTokens: random.int(this.options.maxTokens.min, this.options.maxTokens.max),
      })
      this.records.push(record)
      for (const l of this.listeners) l(record)
      if (!record.ok && !this.controller.signal.aborted) {
        await new Promise((resolve) => setTimeout(resolve, this.options.failurePauseMs))
      }
    }
  }

  private async one(
    worker: number,
    keyName: string,
    shape: { api: 'chat' | 'completion'; stream: boolean; maxTokens: number },
  ): Promise<RequestRecord> {
    const client = this.clients.get(keyName)!
    const id = this.nextId++
    const deadline = AbortSignal.timeout(this.options.requestTimeoutMs)
    const start = performance.now()
    this.inFlight.set(id, { start, stream: shape.stream })
    const r: RequestRecord = {
      id,
      worker,
      keyName,
      ...shape,
      start,
      headersAt: null,
      firstChunkAt: null,
      end: 0,
      status: null,
      region: null,
      node: null,
      requestId: null,
      tokens: 0,
      promptTokens: null,
      contentChunks: 0,
      usageSeen: false,
      finishReason: null,
      ok: false,
      failure: null,
    }
    const prompt = `fault load ${id} from worker ${worker}`
    const common = { model: 'garage-tiny', max_tokens: shape.maxTokens }
    const opts = { signal: deadline }
    const onResponse = (response: Response): void => {
      r.headersAt = performance.now()
      r.status = response.status
      r.region = response.headers.get('x-garage-region')
      r.node = response.headers.get('x-garage-node')
      r.requestId = response.headers.get('x-request-id')
    }
    try {
      if (shape.stream) {
        const streamOptions = { stream: true as const, stream_options: { include_usage: true } }
        const { data: stream, response } =
          shape.api === 'chat'
            ? await client.chat.completions
                .create({ ...common, ...streamOptions, messages: [{ role: 'user', content: prompt }] }, opts)
                .withResponse()
            : await client.completions.create({ ...common, ...streamOptions, prompt }, opts).withResponse()
        onResponse(response)
        for await (const chunk of stream as AsyncIterable<Chunk>) {
          const { bytes, finish } = chunkText(chunk)
          if (bytes > 0) {
            r.contentChunks++
            r.firstChunkAt ??= performance.now()
          }
          if (finish != null) r.finishReason = finish
          if (chunk.usage?.completion_tokens != null) {
            r.usageSeen = true
            r.tokens = chunk.usage.completion_tokens
            r.promptTokens = chunk.usage.prompt_tokens ?? null
          }
        }
        if (!r.usageSeen) r.tokens = r.contentChunks
        // The SDK ends an aborted stream quietly: the deadline, not the server, ended this one.
        if (deadline.aborted) throw new OpenAI.APIUserAbortError()
        if (r.finishReason == null) {
          r.failure = {
            kind: 'stream-incomplete',
            name: 'StreamIncomplete',
            message: 'the stream ended without a finish_reason',
            code: null,
            status: r.status,
          }
        } else r.ok = true
      } else {
        const { data, response } =
          shape.api === 'chat'
            ? await client.chat.completions
                .create({ ...common, messages: [{ role: 'user', content: prompt }] }, opts)
                .withResponse()
            : await client.completions.create({ ...common, prompt }, opts).withResponse()
        onResponse(response)
        const body = data as { usage?: Chunk['usage']; choices: Array<{ finish_reason?: string | null }> }
        r.usageSeen = body.usage?.completion_tokens != null
        r.tokens = body.usage?.completion_tokens ?? 0
        r.promptTokens = body.usage?.prompt_tokens ?? null
        r.finishReason = body.choices[0]?.finish_reason ?? null
        r.ok = true
      }
    } catch (err) {
      if (shape.stream && !r.usageSeen) r.tokens = r.contentChunks
      r.failure = describeFailure(err, r.headersAt != null, deadline.aborted)
      if (r.failure.status != null) r.status = r.failure.status
    } finally {
      r.end = performance.now()
      this.inFlight.delete(id)
    }
    return r
  }
}
