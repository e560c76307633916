import { randomBytes, randomInt, randomUUID } from 'node:crypto'
import type { ServerResponse } from 'node:http'
import {
  type ChatWrapper,
  LlamaChat,
  LlamaCompletion,
  type LlamaContextSequence,
  type LlamaGrammar,
  type LlamaModel,
  type Token,
  TokenBias,
} from 'node-llama-cpp'
import { apiError } from '../../../core/errors.ts'
import { AnswerWriter, type FinishReason } from './answer.ts'
import { chatFunctions, chatHistory, forcingCall } from './chat-history.ts'
import type { GrammarCache } from './grammar.ts'
import {
  recordingSequence,
  type SampledToken,
  sampledLogprob,
  scoreTokens,
  type TokenLogprob,
} from './logprobs.ts'
import type { EmbeddedEngineMetrics } from './metrics.ts'
import type { GenerationRequest } from './request.ts'
import { pacedSequence, type SequencePool, type Slot } from './sequences.ts'

/** Longest a streamed token waits to share a write with the next ones; far below what a reader sees. */
export const streamFlushMs = 10

export interface GeneratorInit {
  model: LlamaModel
  chatWrapper: ChatWrapper
  grammars: GrammarCache
  /** The exact bytes of a token (logprobs). */
  bytes: (token: Token) => Uint8Array
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

/** What one request generates from: its prompt and how its answer may end. */
interface Prepared {
  /** Without the BOS token node-llama-cpp adds itself. */
  tokens: Token[]
  /** Completions with `suffix`: the text after the gap (fill-in-the-middle). */
  suffix: Token[] | null
  /** Tokens the engine evaluates for the prompt (BOS included): the usage's prompt_tokens. */
  promptTokens: number
  stops: NonNullable<Parameters<LlamaCompletion['generateCompletionWithMeta']>[1]>['customStopTriggers']
  grammar: LlamaGrammar | undefined
  /** Chat with tools: the history and functions LlamaChat takes. */
  chat: { history: ReturnType<typeof chatHistory>; forced: boolean; only?: string } | null
}

/** One choice as it ended. */
interface ChoiceOutcome {
  finish: FinishReason
  tokens: number
}

const uint32 = 2 ** 32

/**
 * The embedded engine's generation: a chat or completion request rendered to tokens, generated on a
 * sequence from the pool (its `n` choices one after another, reusing the prompt), and written in
 * OpenAI's shapes. Requests without tools go through LlamaCompletion, with a grammar for structured
 * output; requests with tools through LlamaChat, in the model's own function-call format, with
 * node-llama-cpp's grammars for the name and the arguments.
 */
export class Generator {
  private readonly init: GeneratorInit

  constructor(init: GeneratorInit) {
    this.init = init
  }

  async generate(req: GenerationRequest, res: ServerResponse, clientGone: AbortSignal): Promise<void> {
    if (req.promptLogprobs != null) return this.score(req, res, clientGone)
    const prepared = await this.prepare(req)
    const { sequenceContext } = this.init
    // Room for BOS and one answer token: node-llama-cpp would otherwise cut the prompt's head.
    if (prepared.promptTokens >= sequenceContext) {
      throw apiError(
        'context_length_exceeded',
        `the prompt is ${prepared.promptTokens} tokens; this engine's context is ${sequenceContext}`,
        { param: req.kind === 'chat' ? 'messages' : 'prompt' },
      )
    }
    const room = sequenceContext - prepared.promptTokens
    const maxTokens = Math.min(req.maxTokens ?? room, room)
    const slot = await this.init.pool.acquire(clientGone)
    const writer = new AnswerWriter(res, req, {
      id: `${req.kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID()}`,
      model: this.init.servedModelName,
      bytes: this.init.bytes,
      flushMs: streamFlushMs,
    })
    const baseSeed = req.seed != null ? ((req.seed % uint32) + uint32) % uint32 : randomInt(0, 2 ** 31)
    let completionTokens = 0
    try {
      await slot.value.clearHistory()
      let echo: { text: string; tokens: Token[]; logprobs: Array<TokenLogprob | null> } | null = null
      if (req.echo) echo = await this.echo(req, prepared, slot)
      for (let i = 0; i < req.n && !clientGone.aborted; i++) {
        writer.beginChoice(
          i,
          echo != null ? { echo: echo.text, promptTokens: echo.tokens, promptLogprobs: echo.logprobs } : {},
        )
        const outcome =
          maxTokens === 0
            ? { finish: 'length' as const, tokens: 0 }
            : prepared.chat != null
              ? await this.withTools(req, prepared, slot, writer, i, {
                  maxTokens,
                  seed: (baseSeed + i) % uint32,
                  clientGone,
                })
              : await this.complete(req, prepared, slot, writer, i, {
                  maxTokens,
                  seed: (baseSeed + i) % uint32,
                  clientGone,
                })
        completionTokens += outcome.tokens
        writer.finishChoice(i, outcome.finish)
      }
      this.init.metrics.prompted.inc(prepared.promptTokens)
      if (clientGone.aborted) return
      writer.end({
        prompt_tokens: prepared.promptTokens,
        completion_tokens: completionTokens,
        total_tokens: prepared.promptTokens + completionTokens,
      })
    } catch (err) {
      if (writer.started) {
        if (!clientGone.aborted) writer.fail(err as Error)
        return
      }
      throw err
    } finally {
      this.init.pool.release(slot)
      this.init.onRequestDone()
    }
  }

  /**
   * vLLM's scoring form (`prompt_logprobs`): every prompt token after the BOS gets its logprob, its
   * rank and the top alternatives, from one prefill pass; nothing is generated. With chat's
   * `continue_final_message` the last assistant message is read as the model's own answer: the
   * prompt rendered as for generating it, then its text's tokens, exactly the sequence a node that
   * generated it had in its context. A token outside the top k gets rank k + 1 (a lower bound: the
   * pass computes only the top k and the token itself).
   */
  private async score(req: GenerationRequest, res: ServerResponse, clientGone: AbortSignal): Promise<void> {
    const { model } = this.init
    const answer = req.continueFinalMessage ? req.messages.at(-1)! : null
    const prepared = await this.prepare(
      answer == null ? req : { ...req, messages: req.messages.slice(0, -1) },
    )
    const tokens =
      answer == null ? prepared.tokens : [...prepared.tokens, ...model.tokenize(answer.content, false)]
    const bos = model.tokens.bos
    const withBos = model.tokens.shouldPrependBosToken && bos != null
    const all = withBos ? [bos, ...tokens] : tokens
    if (all.length > this.init.sequenceContext)
      throw apiError(
        'context_length_exceeded',
        `the text to score is ${all.length} tokens; this engine's context is ${this.init.sequenceContext}`,
        { param: req.kind === 'chat' ? 'messages' : 'prompt' },
      )
    const slot = await this.init.pool.acquire(clientGone)
    let scored: Array<TokenLogprob | null>
    try {
      await slot.value.clearHistory()
      scored = await scoreTokens(slot.value, all, req.promptLogprobs!)
    } finally {
      this.init.pool.release(slot)
      this.init.onRequestDone()
    }
    this.init.metrics.prompted.inc(all.length)
    const k = req.promptLogprobs!
    const decoded = (t: Token): string => Buffer.from(this.init.bytes(t)).toString('utf8')
    const promptLogprobs = scored.map((s) => {
      if (s == null) return null
      const entry: Record<string, { logprob: number; rank: number; decoded_token: string }> = {}
      for (const [i, [t, lp]] of s.top.entries())
        entry[String(t)] = { logprob: lp, rank: i + 1, decoded_token: decoded(t) }
      const rank = s.top.findIndex(([t]) => t === s.token)
      entry[String(s.token)] = {
        logprob: s.logprob,
        rank: rank >= 0 ? rank + 1 : k + 1,
        decoded_token: decoded(s.token),
      }
      return entry
    })
    const chat = req.kind === 'chat'
    const body = {
      id: `${chat ? 'chatcmpl' : 'cmpl'}-${randomUUID()}`,
      object: chat ? 'chat.completion' : 'text_completion',
      created: Math.floor(Date.now() / 1000),
      model: this.init.servedModelName,
      choices: [
        chat
          ? {
              index: 0,
              message: { role: 'assistant', content: '', refusal: null },
              logprobs: null,
              finish_reason: 'length',
            }
          : { index: 0, text: '', logprobs: null, finish_reason: 'length' },
      ],
      usage: { prompt_tokens: all.length, completion_tokens: 0, total_tokens: all.length },
      prompt_logprobs: promptLogprobs,
      prompt_token_ids: all,
    }
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(body))
  }

  /** The prompt as tokens, what ends the answer, and the grammar or tools that shape it. */
  private async prepare(req: GenerationRequest): Promise<Prepared> {
    const { model, chatWrapper } = this.init
    const bos = model.tokens.bos
    const addsBos = model.tokens.shouldPrependBosToken && bos != null
    const withoutBos = (tokens: Token[]): Token[] => (addsBos && tokens[0] === bos ? tokens.slice(1) : tokens)
    const grammar =
      req.format.type === 'json_object'
        ? await this.init.grammars.jsonObject()
        : req.format.type === 'json_schema'
          ? await this.init.grammars.jsonSchema(req.format.schema)
          : undefined
    if (req.kind === 'completion') {
      if (req.suffix != null && !model.tokens.infill.prefix)
        throw apiError(
          'unsupported_parameter',
          'suffix needs a fill-in-the-middle model; this model has no infill tokens',
          {
            param: 'suffix',
          },
        )
      const tokens = withoutBos(
        typeof req.prompt === 'string' ? model.tokenize(req.prompt, false) : (req.prompt as Token[]),
      )
      const suffix = req.suffix != null ? model.tokenize(req.suffix, false) : null
      // Fill-in-the-middle reads <prefix> PROMPT <suffix> SUFFIX <middle>: those tokens count too.
      const infill = suffix == null ? 0 : suffix.length + (model.tokens.infill.middle != null ? 3 : 2)
      return {
        tokens,
        suffix,
        promptTokens: tokens.length + infill + (addsBos ? 1 : 0),
        stops: [...req.stop],
        grammar,
        chat: null,
      }
    }
    const history = chatHistory(req.messages)
    const usesTools = req.toolChoice !== 'none' && req.tools.length > 0
    const only = typeof req.toolChoice === 'object' ? req.toolChoice.name : undefined
    const state = chatWrapper.generateContextState({
      chatHistory: history,
      ...(usesTools
        ? { availableFunctions: chatFunctions(req.tools, only), documentFunctionParams: true }
        : {}),
    })
    const tokens = withoutBos(state.contextText.tokenize(model.tokenizer))
    return {
      tokens,
      suffix: null,
      promptTokens: tokens.length + (addsBos ? 1 : 0),
      stops: [...state.stopGenerationTriggers, ...req.stop],
      grammar,
      chat: usesTools
        ? { history, forced: req.toolChoice !== 'auto', ...(only != null ? { only } : {}) }
        : null,
    }
  }

  /**
   * Completions with echo: the prompt's text, and its tokens scored when logprobs are asked for.
   * The BOS token the model reads first is neither echoed nor listed; every prompt token after it
   * then has a logprob. A model without BOS has nothing before its first token: that one gets null,
   * as OpenAI answers.
   */
  private async echo(
    req: GenerationRequest,
    prepared: Prepared,
    slot: Slot,
  ): Promise<{ text: string; tokens: Token[]; logprobs: Array<TokenLogprob | null> }> {
    const { model } = this.init
    const bos = model.tokens.bos
    const withBos = model.tokens.shouldPrependBosToken && bos != null
    const text = typeof req.prompt === 'string' ? req.prompt : model.detokenize(req.prompt as Token[])
    const tokens = prepared.tokens
    if (!req.logprobs) return { text, tokens, logprobs: [] }
    const scored = await scoreTokens(slot.value, withBos ? [bos, ...tokens] : tokens, req.topLogprobs)
    return { text, tokens, logprobs: withBos ? scored.slice(1) : scored }
  }

  /** The sampling options every path shares. */
  private sampling(req: GenerationRequest, maxTokens: number, seed: number): Record<string, unknown> {
    const options: Record<string, unknown> = {
      maxTokens,
      temperature: req.temperature,
      // node-llama-cpp would otherwise cut to the top 40 and top_p 0.95 behind the request's back.
      topK: 0,
      topP: req.topP,
      seed,
    }
    if (req.presencePenalty !== 0 || req.frequencyPenalty !== 0) {
      options.repeatPenalty = {
        presencePenalty: req.presencePenalty,
        frequencyPenalty: req.frequencyPenalty,
        lastTokens: maxTokens,
        penalizeNewLine: true,
      }
    }
    if (req.logitBias.length > 0) {
      const bias = new TokenBias(this.init.model.tokenizer)
      for (const [token, value] of req.logitBias)
        bias.set(token as Token, value <= -100 ? 'never' : { logit: value })
      options.tokenBias = bias
    }
    return options
  }

  /**
   * The sequence a choice generates on: paced to the volunteer's cap, and reporting every token it
   * samples (counted for usage and metrics; with their probabilities when logprobs are asked for).
   */
  private sequenceFor(
    req: GenerationRequest,
    slot: Slot,
    clientGone: AbortSignal,
    onSample: (s: SampledToken) => void,
  ): LlamaContextSequence {
    const { intervalMs } = this.init
    const paced = intervalMs != null ? pacedSequence(slot.value, intervalMs, clientGone) : slot.value
    const metadata = req.logprobs
      ? {
          confidence: true,
          probabilities: req.topLogprobs > 0 || (req.temperature !== 0 && req.temperature !== 1),
        }
      : {}
    return recordingSequence(paced, metadata, onSample)
  }

  /**
   * Counts sampled tokens for usage and metrics, and times the first and the gaps. A `deferred`
   * meter counts into the metrics only when commit() says its tokens were served.
   */
  private tokenMeter(deferred = false): { onSample: () => void; count: () => number; commit: () => void } {
    const { metrics } = this.init
    const started = performance.now()
    let last = started
    let produced = 0
    return {
      onSample: () => {
        const now = performance.now()
        if (!deferred) {
          if (produced === 0) metrics.ttft.observe((now - started) / 1000)
          else metrics.itl.observe((now - last) / 1000)
          metrics.generated.inc()
        }
        last = now
        produced++
      },
      count: () => produced,
      commit: () => {
        if (deferred) metrics.generated.inc(produced)
      },
    }
  }

  /** A choice without tools: LlamaCompletion, with the grammar when the answer must be JSON. */
  private async complete(
    req: GenerationRequest,
    prepared: Prepared,
    slot: Slot,
    writer: AnswerWriter,
    index: number,
    run: { maxTokens: number; seed: number; clientGone: AbortSignal },
  ): Promise<ChoiceOutcome> {
    const meter = this.tokenMeter()
    // Sampled tokens wait here until the text they make is handed on (stop triggers are held back).
    const samples: SampledToken[] = []
    let heldBytes = 0
    const exact = req.topP === 1 && prepared.grammar == null
    const sequence = this.sequenceFor(req, slot, run.clientGone, (s) => {
      meter.onSample()
      if (req.logprobs) samples.push(s)
    })
    const completion = new LlamaCompletion({ contextSequence: sequence, autoDisposeSequence: false })
    const logprobsFor = (text: string): TokenLogprob[] => {
      if (!req.logprobs) return []
      const out: TokenLogprob[] = []
      let need = Buffer.byteLength(text) - heldBytes
      while (need > 0 && samples.length > 0) {
        const s = samples.shift()!
        need -= this.init.bytes(s.token).length
        out.push(sampledLogprob(s, req.topLogprobs, { temperature: req.temperature, exact }))
      }
      heldBytes = need < 0 ? -need : 0
      return out
    }
    const options = {
      ...this.sampling(req, run.maxTokens, run.seed),
      ...(prepared.stops != null && prepared.stops.length > 0 ? { customStopTriggers: prepared.stops } : {}),
      ...(prepared.grammar != null ? { grammar: prepared.grammar } : {}),
      signal: run.clientGone,
      stopOnAbortSignal: true,
      disableContextShift: true,
      onTextChunk: (text: string) => {
        if (text !== '') writer.text(index, text, logprobsFor(text))
      },
    } as Parameters<LlamaCompletion['generateCompletionWithMeta']>[1]
    try {
      const result =
        prepared.suffix != null
          ? await completion.generateInfillCompletionWithMeta(
              prepared.tokens,
              prepared.suffix,
              options as Parameters<LlamaCompletion['generateInfillCompletionWithMeta']>[2],
            )
          : await completion.generateCompletionWithMeta(prepared.tokens, options)
      return { finish: result.metadata.stopReason === 'maxTokens' ? 'length' : 'stop', tokens: meter.count() }
    } finally {
      completion.dispose({ disposeSequence: false })
    }
  }

  /**
   * A choice with tools: LlamaChat in the model's own call format; `forced` makes a call certain.
   * With `auto` and a response_format, the model first decides: a call goes on as a call; its first
   * text ends that attempt (nothing of it is sent or counted) and the answer is written again from
   * the same prompt under the format's grammar.
   */
  private async withTools(
    req: GenerationRequest,
    prepared: Prepared,
    slot: Slot,
    writer: AnswerWriter,
    index: number,
    run: { maxTokens: number; seed: number; clientGone: AbortSignal },
  ): Promise<ChoiceOutcome> {
    const { chat: tools } = prepared
    const formatted = prepared.grammar != null && !tools!.forced
    const meter = this.tokenMeter(formatted)
    const answersInText = new AbortController()
    const wrapper = tools!.forced ? forcingCall(this.init.chatWrapper) : this.init.chatWrapper
    const chat = new LlamaChat({
      contextSequence: this.sequenceFor(req, slot, run.clientGone, meter.onSample),
      chatWrapper: wrapper,
      autoDisposeSequence: false,
    })
    // node-llama-cpp ends each call's parameters with "\n\n\n\n": held back, and dropped at the end.
    const started = new Map<number, { call: number; held: string }>()
    let result: Awaited<ReturnType<LlamaChat['generateResponse']>>
    try {
      result = await chat.generateResponse(tools!.history, {
        ...this.sampling(req, run.maxTokens, run.seed),
        functions: chatFunctions(req.tools, tools!.only),
        documentFunctionParams: true,
        ...(req.parallelToolCalls ? {} : { maxParallelFunctionCalls: 1 }),
        ...(req.stop.length > 0 ? { customStopTriggers: req.stop } : {}),
        signal: formatted ? AbortSignal.any([run.clientGone, answersInText.signal]) : run.clientGone,
        stopOnAbortSignal: true,
        onTextChunk: (text: string) => {
          if (!formatted) {
            if (text !== '') writer.text(index, text)
          } else if (text.trim() !== '') answersInText.abort()
        },
        onFunctionCallParamsChunk: (chunk) => {
          let s = started.get(chunk.callIndex)
          if (s == null) {
            s = { call: writer.toolCallStart(index, callId(), chunk.functionName), held: '' }
            started.set(chunk.callIndex, s)
          }
          if (chunk.done) return
          const text = s.held + chunk.paramsChunk
          const body = text.replace(/\n+$/, '')
          s.held = text.slice(body.length)
          writer.toolCallArguments(index, s.call, body)
        },
      } as Parameters<LlamaChat['generateResponse']>[1])
    } finally {
      chat.dispose({ disposeSequence: false })
    }
    if (answersInText.signal.aborted && !run.clientGone.aborted && started.size === 0)
      return this.complete(req, prepared, slot, writer, index, run)
    meter.commit()
    const calls = result.functionCalls ?? []
    for (const [k, call] of calls.entries()) {
      // A call without parameters streams none: it starts (and ends) here.
      const s = started.get(k)
      if (s == null) {
        const c = writer.toolCallStart(index, callId(), call.functionName)
        writer.toolCallArguments(index, c, JSON.stringify(call.params ?? {}))
      } else if (writer.toolCalls(index)[s.call]?.arguments === '')
        writer.toolCallArguments(index, s.call, '{}')
    }
    // A call the token limit cut short stays, its arguments as far as they got, with finish_reason
    // 'length' (as OpenAI answers it, and as the stream has shown it): dropping it hid tokens the
    // model generated from the answer, and the head, which credits only what it sees, flagged the
    // honest node for them. Otherwise only the calls LlamaChat completed count.
    const cut = result.metadata.stopReason === 'maxTokens'
    if (!cut) writer.keepToolCalls(index, calls.length)
    const finish: FinishReason = cut ? 'length' : calls.length > 0 ? 'tool_calls' : 'stop'
    return { finish, tokens: meter.count() }
  }
}

function callId(): string {
  return `call_${randomBytes(12).toString('base64url')}`
}
