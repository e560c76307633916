import type { ServerResponse } from 'node:http'
import type { Token } from 'node-llama-cpp'
import type { ApiError } from '../../../core/errors.ts'
import type { TokenLogprob } from './logprobs.ts'
import type { GenerationRequest } from './request.ts'

/**
 * An answer in OpenAI's shapes, as the choices are generated: one JSON body, or server-sent events
 * (chat.completion.chunk / text_completion chunks). Every field OpenAI's schema requires is there
 * (`message.refusal`, `choices[].logprobs`...). Streamed events are gathered for at most
 * `flushMs` and sent in one write: a wake-up of the client per burst, not per token; the first goes
 * out at once (time to first token).
 */

export type FinishReason = 'stop' | 'length' | 'tool_calls'

export interface Usage {
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
}

interface ChoiceState {
  text: string
  toolCalls: Array<{ id: string; name: string; arguments: string }>
  logprobs: TokenLogprob[]
  /** Completions with echo: the prompt's tokens scored (the first has no logprob). */
  promptLogprobs: Array<TokenLogprob | null>
  promptTokens: Token[]
  finish: FinishReason
}

export class AnswerWriter {
  readonly #res: ServerResponse
  readonly #req: GenerationRequest
  readonly #base: { id: string; object: string; created: number; model: string }
  readonly #bytes: (token: Token) => Uint8Array
  readonly #flushMs: number
  readonly #choices: ChoiceState[] = []
  #pending: string[] = []
  #timer: NodeJS.Timeout | undefined
  #sentFirst = false

  constructor(
    res: ServerResponse,
    req: GenerationRequest,
    init: { id: string; model: string; bytes: (token: Token) => Uint8Array; flushMs: number },
  ) {
    this.#res = res
    this.#req = req
    const object =
      req.kind === 'chat' ? (req.stream ? 'chat.completion.chunk' : 'chat.completion') : 'text_completion'
    this.#base = { id: init.id, object, created: Math.floor(Date.now() / 1000), model: init.model }
    this.#bytes = init.bytes
    this.#flushMs = init.flushMs
  }

  get streaming(): boolean {
    return this.#req.stream
  }

  /** True once anything went out: an error can then only end the stream. */
  get started(): boolean {
    return this.#res.headersSent
  }

  /** Starts choice `index`; `echo` is the prompt text a completion with echo repeats. */
  beginChoice(
    index: number,
    init: { echo?: string; promptTokens?: Token[]; promptLogprobs?: Array<TokenLogprob | null> } = {},
  ): void {
    this.#choices[index] = {
      text: '',
      toolCalls: [],
      logprobs: [],
      promptLogprobs: init.promptLogprobs ?? [],
      promptTokens: init.promptTokens ?? [],
      finish: 'stop',
    }
    if (!this.#req.stream) {
      if (init.echo != null) this.#choices[index]!.text = init.echo
      return
    }
    if (this.#res.headersSent === false) {
      this.#res.writeHead(200, {
        'content-type': 'text/event-stream',
        'cache-control': 'no-cache',
        connection: 'keep-alive',
      })
    }
    if (this.#req.kind === 'chat') {
      this.#event({
        choices: [{ index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }],
      })
    } else if (init.echo != null && init.echo !== '') {
      this.#event({
        choices: [
          {
            index,
            text: init.echo,
            logprobs: this.#completionLogprobs(index, [], true, 0),
            finish_reason: null,
          },
        ],
      })
      this.#choices[index]!.text = init.echo
    }
  }

  /** Generated text of choice `index`, with the logprobs of the tokens that made it. */
  text(index: number, text: string, logprobs: TokenLogprob[] = []): void {
    const c = this.#choices[index]!
    const offset = c.text.length
    c.text += text
    c.logprobs.push(...logprobs)
    if (!this.#req.stream || (text === '' && logprobs.length === 0)) return
    if (this.#req.kind === 'chat') {
      this.#event({
        choices: [
          {
            index,
            delta: { content: text },
            logprobs: this.#req.logprobs
              ? { content: logprobs.map((l) => this.#chatEntry(l)), refusal: null }
              : null,
            finish_reason: null,
          },
        ],
      })
    } else {
      this.#event({
        choices: [
          {
            index,
            text,
            logprobs: this.#completionLogprobs(index, logprobs, false, offset),
            finish_reason: null,
          },
        ],
      })
    }
  }

  /** A tool call of choice `index` begins: its id and name go out at once. */
  toolCallStart(index: number, id: string, name: string): number {
    const c = this.#choices[index]!
    const callIndex = c.toolCalls.length
    c.toolCalls.push({ id, name, arguments: '' })
    if (this.#req.stream) {
      this.#event({
        choices: [
          {
            index,
            delta: {
              tool_calls: [{ index: callIndex, id, type: 'function', function: { name, arguments: '' } }],
            },
            logprobs: null,
            finish_reason: null,
          },
        ],
      })
    }
    return callIndex
  }

  toolCallArguments(index: number, callIndex: number, chunk: string): void {
    if (chunk === '') return
    this.#choices[index]!.toolCalls[callIndex]!.arguments += chunk
    if (!this.#req.stream) return
    this.#event({
      choices: [
        {
          index,
          delta: { tool_calls: [{ index: callIndex, function: { arguments: chunk } }] },
          logprobs: null,
          finish_reason: null,
        },
      ],
    })
  }

  /** What the choice's tool calls say now (the arguments as streamed). */
  toolCalls(index: number): ReadonlyArray<{ id: string; name: string; arguments: string }> {
    return this.#choices[index]!.toolCalls
  }

  /** Keeps the first `count` tool calls of choice `index` (the rest were cut short). */
  keepToolCalls(index: number, count: number): void {
    const c = this.#choices[index]!
    c.toolCalls.length = Math.min(c.toolCalls.length, count)
  }

  finishChoice(index: number, finish: FinishReason): void {
    this.#choices[index]!.finish = finish
    if (!this.#req.stream) return
    this.#event({
      choices: [
        this.#req.kind === 'chat'
          ? { index, delta: {}, logprobs: null, finish_reason: finish }
          : { index, text: '', logprobs: null, finish_reason: finish },
      ],
    })
  }

  /** The last write: the usage chunk (when asked for) and [DONE], or the whole JSON body. */
  end(usage: Usage): void {
    if (this.#req.stream) {
      if (this.#req.includeUsage) this.#event({ choices: [], usage })
      this.#flush()
      this.#res.end('data: [DONE]\n\n')
      return
    }
    const choices = this.#choices.map((c, index) =>
      this.#req.kind === 'chat'
        ? {
            index,
            message: {
              role: 'assistant',
              content: c.toolCalls.length > 0 && c.text === '' ? null : c.text,
              refusal: null,
              ...(c.toolCalls.length > 0
                ? {
                    tool_calls: c.toolCalls.map((t) => ({
                      id: t.id,
                      type: 'function',
                      function: { name: t.name, arguments: t.arguments },
                    })),
                  }
                : {}),
            },
            logprobs: this.#req.logprobs
              ? { content: c.logprobs.map((l) => this.#chatEntry(l)), refusal: null }
              : null,
            finish_reason: c.finish,
          }
        : {
            index,
            text: c.text,
            logprobs: this.#completionLogprobs(index, c.logprobs, true, 0),
            finish_reason: c.finish,
          },
    )
    this.#res
      .writeHead(200, { 'content-type': 'application/json' })
      .end(JSON.stringify({ ...this.#base, choices, usage }))
  }

  /** After the first byte an error can only end the stream, as an OpenAI-style error event. */
  fail(err: ApiError | Error): void {
    const code = (err as ApiError).code || 'generation_failed'
    this.#event({ error: { message: err.message, type: 'server_error', param: null, code } })
    this.#flush()
    this.#res.end('data: [DONE]\n\n')
  }

  #chatEntry(l: TokenLogprob): Record<string, unknown> {
    const entry = (token: Token, logprob: number): { token: string; logprob: number; bytes: number[] } => {
      const bytes = this.#bytes(token)
      return { token: Buffer.from(bytes).toString('utf8'), logprob, bytes: [...bytes] }
    }
    return { ...entry(l.token, l.logprob), top_logprobs: l.top.map(([t, p]) => entry(t, p)) }
  }

  /**
   * Completions' logprobs: tokens, token_logprobs, top_logprobs, text_offset. `withPrompt`: the
   * echoed prompt's entries first (on the whole body, and on the first streamed event).
   */
  #completionLogprobs(
    index: number,
    generated: TokenLogprob[],
    withPrompt: boolean,
    startOffset: number,
  ): Record<string, unknown> | null {
    if (!this.#req.logprobs) return null
    const c = this.#choices[index]!
    const entries: Array<{ token: Token; logprob: number | null; top: Array<[Token, number]> | null }> = []
    if (withPrompt && this.#req.echo) {
      for (const [i, token] of c.promptTokens.entries()) {
        const l = c.promptLogprobs[i]
        entries.push({ token, logprob: l?.logprob ?? null, top: l?.top ?? null })
      }
    }
    for (const l of generated) entries.push({ token: l.token, logprob: l.logprob, top: l.top })
    const tokens: string[] = []
    const offsets: number[] = []
    let offset = startOffset
    for (const e of entries) {
      const text = Buffer.from(this.#bytes(e.token)).toString('utf8')
      tokens.push(text)
      offsets.push(offset)
      offset += text.length
    }
    return {
      tokens,
      token_logprobs: entries.map((e) => e.logprob),
      top_logprobs: entries.map((e) =>
        e.top == null
          ? null
          : Object.fromEntries(e.top.map(([t, p]) => [Buffer.from(this.#bytes(t)).toString('utf8'), p])),
      ),
      text_offset: offsets,
    }
  }

  #event(body: Record<string, unknown>): void {
    this.#pending.push(`data: ${JSON.stringify({ ...this.#base, ...body })}\n\n`)
    if (!this.#sentFirst) {
      this.#sentFirst = true
      this.#flush()
    } else if (this.#pending.length === 1) this.#timer = setTimeout(() => this.#flush(), this.#flushMs)
  }

  #flush(): void {
    clearTimeout(this.#timer)
    this.#timer = undefined
    if (this.#pending.length === 0 || this.#res.destroyed) return
    this.#res.write(this.#pending.join(''))
    this.#pending = []
  }
}
