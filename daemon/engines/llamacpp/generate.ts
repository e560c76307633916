import { randomUUID } from 'node:crypto'
import type { ServerResponse } from 'node:http'
import {
  type ChatHistoryItem,
  type ChatWrapper,
  LlamaCompletion,
  type LlamaModel,
  type Token,
} from 'node-llama-cpp'
import { apiError } from '../../../core/errors.ts'
import type { EmbeddedEngineMetrics } from './metrics.ts'
import type { GenerationRequest } from './request.ts'
import { pacedSequence, type SequencePool } from './sequences.ts'

/** Longest a streamed token waits to share a write with the next ones; far below what a reader sees. */
export const streamFlushMs = 10

export interface GeneratorInit {
  model: LlamaModel
  chatWrapper: ChatWrapper
  /** Tokens one sequence holds: prompt and answer together. */
  sequenceContext: number
  pool: SequencePool
  metrics: EmbeddedEngineMetrics
  servedModelName: string
  /** Milliseconds between a sequence's tokens under the volunteer's cap; null: no cap. */
  intervalMs: number | null
  /** A request let go of its sequence (the server's drain waits for the last). */
  onRequestDone: () => void
}

/**
 * The embedded engine's generation: a chat or completion request rendered to tokens, generated on
 * a sequence from the pool, and written as OpenAI's JSON or its SSE chunks.
 */
export class Generator {
  private readonly model: LlamaModel
  private readonly chatWrapper: ChatWrapper
  private readonly sequenceContext: number
  private readonly pool: SequencePool
  private readonly metrics: EmbeddedEngineMetrics
  private readonly servedModelName: string
  private readonly intervalMs: number | null
  private readonly onRequestDone: () => void

  constructor(init: GeneratorInit) {
    this.model = init.model
    this.chatWrapper = init.chatWrapper
    this.sequenceContext = init.sequenceContext
    this.pool = init.pool
    this.metrics = init.metrics
    this.servedModelName = init.servedModelName
    this.intervalMs = init.intervalMs
    this.onRequestDone = init.onRequestDone
  }

  /** The prompt as tokens, and what ends the answer: the chat template's turn end, the user's stop strings. */
  render(req: GenerationRequest): {
    tokens: Token[]
    stops: Array<string | ReturnType<ChatWrapper['generateContextState']>['stopGenerationTriggers'][number]>
  } {
    if (req.kind === 'completion') {
      const text = this.model.tokenize(req.prompt, false)
      const bos = this.model.tokens.bos
      const tokens = this.model.tokens.shouldPrependBosToken && bos != null ? [bos, ...text] : text
      return { tokens, stops: [...req.stop] }
    }
    const history: ChatHistoryItem[] = req.messages.map((m) =>
      m.role === 'assistant' ? { type: 'model', response: [m.content] } : { type: m.role, text: m.content },
    )
    history.push({ type: 'model', response: [] })
    const state = this.chatWrapper.generateContextState({ chatHistory: history })
    return {
      tokens: state.contextText.tokenize(this.model.tokenizer),
      stops: [...state.stopGenerationTriggers, ...req.stop],
    }
  }

  async generate(req: GenerationRequest, res: ServerResponse, clientGone: AbortSignal): Promise<void> {
    const { tokens, stops } = this.render(req)
    if (tokens.length >= this.sequenceContext) {
      throw apiError(
        'context_length_exceeded',
        `the prompt is ${tokens.length} tokens; this engine's context is ${this.sequenceContext}`,
        { param: req.kind === 'chat' ? 'messages' : 'prompt' },
      )
    }
    const maxTokens = Math.min(
      req.maxTokens ?? this.sequenceContext - tokens.length,
      this.sequenceContext - tokens.length,
    )
    const slot = await this.pool.acquire(clientGone)
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
    const base = { id, object, created: Math.floor(Date.now() / 1000), model: this.servedModelName }
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
        this.intervalMs != null ? pacedSequence(slot.sequence, this.intervalMs, clientGone) : slot.sequence
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
            this.metrics.ttft.observe((now - started) / 1000)
          } else {
            this.metrics.itl.observe((now - last) / 1000 / Math.max(1, t.length))
          }
          last = now
          produced += t.length
          this.metrics.generated.inc(t.length)
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
      this.metrics.prompted.inc(tokens.length)
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
      this.pool.release(slot)
      this.onRequestDone()
    }
  }
}
