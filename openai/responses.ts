import { randomBytes } from 'node:crypto'
import { type ApiError, apiError } from '../core/errors.ts'
import { isPlainObject } from '../core/guards.ts'
import { SseSplitter } from '../core/sse.ts'
import { contentText } from './content.ts'
import type { AnswerSink } from './relay.ts'

/**
 * The Responses API (`POST /v1/responses`), stateless, served at the edge on top of chat
 * completions: the request becomes a chat request (instructions → a system message, input items →
 * messages, tools, text.format → response_format), the chat answer flowing back becomes a Response
 * (or its event stream: response.created … response.output_text.delta … response.completed). So
 * every engine serves it, and the hops behind count tokens as they always do.
 *
 * Nothing is stored: `previous_response_id`, `conversation` and `prompt` get a 400. One exception
 * keeps clients working: a client that refers back to an earlier answer's output item by id
 * (`item_reference`, what the AI SDK sends by default) gets it resolved from a bounded,
 * short-lived cache of the output items this process produced for the same API key.
 */

const idBytes = 12
const newId = (prefix: string): string => `${prefix}_${randomBytes(idBytes).toString('hex')}`

/** Output items (messages, function calls) by id, per API key: bounded, and forgotten after an hour. */
export class OutputItemStore {
  readonly #items = new Map<string, { item: Record<string, unknown>; at: number }>()
  readonly #max: number
  readonly #ttlMs: number
  readonly #now: () => number

  constructor(init: { maxItems?: number; ttlMs?: number; now?: () => number } = {}) {
    this.#max = init.maxItems ?? 10_000
    this.#ttlMs = init.ttlMs ?? 60 * 60_000
    this.#now = init.now ?? Date.now
  }

  put(scope: string, item: Record<string, unknown>): void {
    if (typeof item.id !== 'string') return
    const key = `${scope}\u0000${item.id}`
    this.#items.delete(key)
    this.#items.set(key, { item, at: this.#now() })
    while (this.#items.size > this.#max) this.#items.delete(this.#items.keys().next().value!)
  }

  get(scope: string, id: string): Record<string, unknown> | null {
    const entry = this.#items.get(`${scope}\u0000${id}`)
    if (entry == null || this.#now() - entry.at > this.#ttlMs) return null
    return entry.item
  }
}

/** What a Response echoes of its request. */
export interface ResponseRequest {
  id: string
  model: string
  stream: boolean
  instructions: string | null
  tools: unknown[]
  toolChoice: unknown
  parallelToolCalls: boolean
  temperature: number | null
  topP: number | null
  maxOutputTokens: number | null
  metadata: Record<string, string> | null
  text: Record<string, unknown>
  topLogprobs: number
  /** Where output items go for later item_reference lookups (null: not kept). */
  scope: string | null
}

/** Accepted and ignored: nothing this server does changes with them. */
const ignoredKeys = new Set([
  'store',
  'user',
  'metadata',
  'include',
  'reasoning',
  'truncation',
  'service_tier',
  'prompt_cache_key',
  'safety_identifier',
  'background',
  'stream_options',
])
const refusedKeys: Record<string, string> = {
  previous_response_id: 'Garage stores no responses: send the whole conversation in input',
  conversation: 'Garage stores no conversations: send the whole conversation in input',
  prompt: 'stored prompts are not supported: send instructions and input',
}

function bad(
  message: string,
  param: string,
  code:
    | 'invalid_value'
    | 'invalid_type'
    | 'unsupported_parameter'
    | 'unsupported_value'
    | 'missing_required_parameter' = 'invalid_value',
): ApiError {
  return apiError(code, message, { param })
}

/**
 * The chat completion request a Responses request becomes, and what its Response echoes.
 * `items` resolves item_reference within `scope` (an API key).
 */
export function responsesToChat(
  body: unknown,
  init: { items: OutputItemStore; scope: string },
): { chat: Record<string, unknown>; request: ResponseRequest } {
  if (!isPlainObject(body)) throw bad('the request body must be a JSON object', 'body', 'invalid_type')
  const b = body
  for (const [key, why] of Object.entries(refusedKeys)) {
    if (b[key] != null) throw bad(`${key}: ${why}`, key, 'unsupported_parameter')
  }
  if (typeof b.model !== 'string' || b.model === '')
    throw bad('model is required', 'model', 'missing_required_parameter')
  if (b.instructions != null && typeof b.instructions !== 'string')
    throw bad('instructions must be a string', 'instructions', 'invalid_type')
  const messages: Array<Record<string, unknown>> = []
  if (typeof b.instructions === 'string' && b.instructions !== '')
    messages.push({ role: 'system', content: b.instructions })
  messages.push(...inputMessages(b.input, init))

  const chat: Record<string, unknown> = { model: b.model, messages }
  const tools = b.tools ?? []
  if (!Array.isArray(tools)) throw bad('tools must be a list', 'tools', 'invalid_type')
  if (tools.length > 0) {
    chat.tools = tools.map((t, i) => {
      if (!isPlainObject(t) || t.type !== 'function')
        throw bad(
          `tools[${i}]: only function tools are supported, not ${JSON.stringify(isPlainObject(t) ? t.type : t)}`,
          `tools[${i}].type`,
          'unsupported_value',
        )
      return {
        type: 'function',
        function: {
          name: t.name,
          ...(t.description != null ? { description: t.description } : {}),
          ...(t.parameters != null ? { parameters: t.parameters } : {}),
          ...(typeof t.strict === 'boolean' ? { strict: t.strict } : {}),
        },
      }
    })
  }
  const choice = b.tool_choice
  if (choice != null) {
    if (choice === 'auto' || choice === 'none' || choice === 'required') chat.tool_choice = choice
    else if (isPlainObject(choice) && choice.type === 'function' && typeof choice.name === 'string')
      chat.tool_choice = { type: 'function', function: { name: choice.name } }
    else
      throw bad(
        'tool_choice must be auto, none, required or { "type": "function", "name": ... }',
        'tool_choice',
        'unsupported_value',
      )
  }
  if (b.parallel_tool_calls != null) chat.parallel_tool_calls = b.parallel_tool_calls
  for (const key of ['temperature', 'top_p'] as const) if (b[key] != null) chat[key] = b[key]
  if (b.max_output_tokens != null) chat.max_completion_tokens = b.max_output_tokens
  const text = b.text ?? {}
  if (!isPlainObject(text)) throw bad('text must be an object', 'text', 'invalid_type')
  const format = text.format
  if (format != null) {
    if (!isPlainObject(format)) throw bad('text.format must be an object', 'text.format', 'invalid_type')
    if (format.type === 'json_object') chat.response_format = { type: 'json_object' }
    else if (format.type === 'json_schema') {
      chat.response_format = {
        type: 'json_schema',
        json_schema: {
          name: format.name,
          schema: format.schema,
          ...(typeof format.strict === 'boolean' ? { strict: format.strict } : {}),
        },
      }
    } else if (format.type !== 'text')
      throw bad(
        `text.format.type must be text, json_object or json_schema`,
        'text.format.type',
        'unsupported_value',
      )
  }
  let topLogprobs = 0
  if (b.top_logprobs != null) {
    if (
      typeof b.top_logprobs !== 'number' ||
      !Number.isInteger(b.top_logprobs) ||
      b.top_logprobs < 0 ||
      b.top_logprobs > 20
    )
      throw bad('top_logprobs must be a whole number from 0 to 20', 'top_logprobs')
    topLogprobs = b.top_logprobs
    chat.logprobs = true
    if (topLogprobs > 0) chat.top_logprobs = topLogprobs
  }
  const stream = b.stream === true
  if (b.stream != null && typeof b.stream !== 'boolean')
    throw bad('stream must be a boolean', 'stream', 'invalid_type')
  if (stream) {
    chat.stream = true
    chat.stream_options = { include_usage: true }
  }
  for (const key of Object.keys(b)) {
    if (
      ignoredKeys.has(key) ||
      [
        'model',
        'input',
        'instructions',
        'tools',
        'tool_choice',
        'parallel_tool_calls',
        'temperature',
        'top_p',
      ].includes(key) ||
      ['max_output_tokens', 'text', 'top_logprobs', 'stream'].includes(key)
    )
      continue
    throw bad(`${key} is not supported`, key, 'unsupported_parameter')
  }
  const metadata = isPlainObject(b.metadata) ? (b.metadata as Record<string, string>) : null
  return {
    chat,
    request: {
      id: newId('resp'),
      model: b.model,
      stream,
      instructions: typeof b.instructions === 'string' ? b.instructions : null,
      tools,
      toolChoice: choice ?? 'auto',
      parallelToolCalls: b.parallel_tool_calls !== false,
      temperature: typeof b.temperature === 'number' ? b.temperature : null,
      topP: typeof b.top_p === 'number' ? b.top_p : null,
      maxOutputTokens: typeof b.max_output_tokens === 'number' ? b.max_output_tokens : null,
      metadata,
      text: { format: isPlainObject(format) ? format : { type: 'text' } },
      topLogprobs,
      scope: init.scope,
    },
  }
}

/** Input items as chat messages: consecutive function calls make one assistant turn. */
function inputMessages(
  input: unknown,
  init: { items: OutputItemStore; scope: string },
): Array<Record<string, unknown>> {
  if (typeof input === 'string') return [{ role: 'user', content: input }]
  if (!Array.isArray(input) || input.length === 0)
    throw bad(
      'input must be a string or a non-empty list of items',
      'input',
      input == null ? 'missing_required_parameter' : 'invalid_type',
    )
  const out: Array<Record<string, unknown>> = []
  const pendingCalls = (): Array<Record<string, unknown>> => {
    const last = out.at(-1)
    if (last?.role === 'assistant' && Array.isArray(last.tool_calls))
      return last.tool_calls as Array<Record<string, unknown>>
    const calls: Array<Record<string, unknown>> = []
    out.push({ role: 'assistant', content: null, tool_calls: calls })
    return calls
  }
  for (const [i, raw] of input.entries()) {
    const at = `input[${i}]`
    let item = raw
    if (isPlainObject(item) && item.type === 'item_reference') {
      const found = typeof item.id === 'string' ? init.items.get(init.scope, item.id) : null
      if (found == null)
        throw bad(
          `${at}: item ${JSON.stringify(item.id)} is not known here; Garage keeps no conversations: send the item itself (the AI SDK does with providerOptions.openai.store = false)`,
          at,
        )
      item = found
    }
    if (!isPlainObject(item)) throw bad(`${at} must be an object`, at, 'invalid_type')
    const type = item.type ?? 'message'
    if (type === 'message') {
      const role = item.role === 'developer' ? 'system' : item.role
      if (role !== 'system' && role !== 'user' && role !== 'assistant')
        throw bad(`${at}.role must be system, developer, user or assistant`, `${at}.role`)
      out.push({ role, content: contentText(item.content, `${at}.content`) })
    } else if (type === 'function_call') {
      if (typeof item.call_id !== 'string' || typeof item.name !== 'string')
        throw bad(`${at} must have call_id and name`, at, 'invalid_type')
      pendingCalls().push({
        id: item.call_id,
        type: 'function',
        function: { name: item.name, arguments: typeof item.arguments === 'string' ? item.arguments : '{}' },
      })
    } else if (type === 'function_call_output') {
      if (typeof item.call_id !== 'string')
        throw bad(`${at}.call_id is required`, `${at}.call_id`, 'missing_required_parameter')
      out.push({
        role: 'tool',
        tool_call_id: item.call_id,
        content: typeof item.output === 'string' ? item.output : JSON.stringify(item.output ?? ''),
      })
    } else if (type === 'reasoning') {
      // A reasoning model's own notes: nothing a non-reasoning model reads.
    } else throw bad(`${at}.type ${JSON.stringify(type)} is not supported`, `${at}.type`, 'unsupported_value')
  }
  return out
}

interface ChatToolCall {
  id: string
  name: string
  arguments: string
}

interface OpenText {
  id: string
  index: number
  text: string
  logprobs: Array<Record<string, unknown>>
}

interface OpenCall extends ChatToolCall {
  itemId: string
  index: number
}

/**
 * A Response built as chat chunks (or one chat completion) arrive. Knows the Responses event
 * sequence: created, in_progress, output items with their parts and deltas, completed.
 */
export class ResponseBuilder {
  readonly #req: ResponseRequest
  readonly #createdAt = Math.floor(Date.now() / 1000)
  readonly #output: Array<Record<string, unknown>> = []
  #seq = 0
  #text: OpenText | null = null
  #calls = new Map<number, OpenCall>()
  #finish: string | null = null
  #usage: { input: number; output: number } | null = null

  constructor(req: ResponseRequest) {
    this.#req = req
  }

  /** The Response as it stands. */
  response(
    status: 'in_progress' | 'completed' | 'incomplete' | 'failed',
    error?: ApiError,
  ): Record<string, unknown> {
    const r = this.#req
    return {
      id: r.id,
      object: 'response',
      created_at: this.#createdAt,
      status,
      ...(status === 'completed' || status === 'incomplete'
        ? { completed_at: Math.floor(Date.now() / 1000) }
        : {}),
      error: error != null ? { code: 'server_error', message: error.message } : null,
      incomplete_details: status === 'incomplete' ? { reason: 'max_output_tokens' } : null,
      instructions: r.instructions,
      max_output_tokens: r.maxOutputTokens,
      model: r.model,
      output: status === 'in_progress' ? [] : this.#output,
      parallel_tool_calls: r.parallelToolCalls,
      previous_response_id: null,
      reasoning: null,
      store: false,
      temperature: r.temperature,
      text: r.text,
      tool_choice: r.toolChoice,
      tools: r.tools,
      top_p: r.topP,
      truncation: 'disabled',
      metadata: r.metadata ?? {},
      ...(this.#usage != null && status !== 'in_progress'
        ? {
            usage: {
              input_tokens: this.#usage.input,
              input_tokens_details: { cached_tokens: 0, cache_write_tokens: 0 },
              output_tokens: this.#usage.output,
              output_tokens_details: { reasoning_tokens: 0 },
              total_tokens: this.#usage.input + this.#usage.output,
            },
          }
        : {}),
    }
  }

  /** The first events of a stream. */
  start(): Array<Record<string, unknown>> {
    return [
      this.#event('response.created', { response: this.response('in_progress') }),
      this.#event('response.in_progress', { response: this.response('in_progress') }),
    ]
  }

  /** One chat completion chunk's worth of events. */
  chunk(chunk: Record<string, unknown>): Array<Record<string, unknown>> {
    const events: Array<Record<string, unknown>> = []
    const usage = chunk.usage
    if (isPlainObject(usage))
      this.#usage = { input: Number(usage.prompt_tokens) || 0, output: Number(usage.completion_tokens) || 0 }
    const choices = Array.isArray(chunk.choices) ? chunk.choices : []
    for (const c of choices) {
      if (!isPlainObject(c) || (c.index ?? 0) !== 0) continue
      const delta = isPlainObject(c.delta) ? c.delta : {}
      const logprobs =
        isPlainObject(c.logprobs) && Array.isArray(c.logprobs.content) ? c.logprobs.content : []
      if (typeof delta.content === 'string' && delta.content !== '')
        events.push(...this.#textDelta(delta.content, logprobs))
      if (Array.isArray(delta.tool_calls)) {
        for (const tc of delta.tool_calls) {
          if (!isPlainObject(tc)) continue
          const fn = isPlainObject(tc.function) ? tc.function : {}
          events.push(...this.#callDelta(Number(tc.index) || 0, typeof tc.id === 'string' ? tc.id : null, fn))
        }
      }
      if (typeof c.finish_reason === 'string') this.#finish = c.finish_reason
    }
    return events
  }

  /** A whole chat completion, as the items it makes. */
  completion(body: Record<string, unknown>): void {
    const choice = Array.isArray(body.choices) ? body.choices[0] : null
    const message = isPlainObject(choice) && isPlainObject(choice.message) ? choice.message : {}
    const logprobs =
      isPlainObject(choice) && isPlainObject(choice.logprobs) && Array.isArray(choice.logprobs.content)
        ? choice.logprobs.content
        : []
    if (typeof message.content === 'string' && message.content !== '')
      this.#textDelta(message.content, logprobs)
    if (Array.isArray(message.tool_calls)) {
      for (const [i, tc] of message.tool_calls.entries()) {
        if (!isPlainObject(tc)) continue
        this.#callDelta(
          i,
          typeof tc.id === 'string' ? tc.id : null,
          isPlainObject(tc.function) ? tc.function : {},
        )
      }
    }
    if (isPlainObject(choice) && typeof choice.finish_reason === 'string') this.#finish = choice.finish_reason
    const usage = body.usage
    if (isPlainObject(usage))
      this.#usage = { input: Number(usage.prompt_tokens) || 0, output: Number(usage.completion_tokens) || 0 }
    this.#closeAll()
  }

  /** The last events of a stream: open items closed, then completed (or incomplete). */
  finish(): Array<Record<string, unknown>> {
    const events = this.#closeAll()
    events.push(this.#event(`response.${this.status}`, { response: this.response(this.status) }))
    return events
  }

  /** A failure after the stream began: an error event (every client library throws on it). */
  fail(err: ApiError): Array<Record<string, unknown>> {
    return [
      this.#event('error', { code: err.code || 'server_error', message: err.message, param: err.param }),
    ]
  }

  get status(): 'completed' | 'incomplete' {
    return this.#finish === 'length' ? 'incomplete' : 'completed'
  }

  /** The output items made, for item_reference later. */
  get output(): ReadonlyArray<Record<string, unknown>> {
    return this.#output
  }

  #event(type: string, body: Record<string, unknown>): Record<string, unknown> {
    return { type, sequence_number: this.#seq++, ...body }
  }

  #textDelta(text: string, chatLogprobs: unknown[]): Array<Record<string, unknown>> {
    const events: Array<Record<string, unknown>> = []
    if (this.#text == null) {
      events.push(...this.#closeCalls())
      const id = newId('msg')
      this.#text = { id, index: this.#output.length, text: '', logprobs: [] }
      this.#output.push({ id, type: 'message', role: 'assistant', status: 'in_progress', content: [] })
      events.push(
        this.#event('response.output_item.added', {
          output_index: this.#text.index,
          item: { ...this.#output.at(-1)! },
        }),
        this.#event('response.content_part.added', {
          item_id: id,
          output_index: this.#text.index,
          content_index: 0,
          part: { type: 'output_text', text: '', annotations: [], logprobs: [] },
        }),
      )
    }
    const open = this.#text
    open.text += text
    const entries = chatLogprobs.filter(isPlainObject).map((l) => ({
      token: String(l.token),
      logprob: Number(l.logprob),
      bytes: Array.isArray(l.bytes) ? l.bytes : [],
      top_logprobs: Array.isArray(l.top_logprobs)
        ? l.top_logprobs.filter(isPlainObject).map((t) => ({
            token: String(t.token),
            logprob: Number(t.logprob),
            bytes: Array.isArray(t.bytes) ? t.bytes : [],
          }))
        : [],
    }))
    open.logprobs.push(...entries)
    events.push(
      this.#event('response.output_text.delta', {
        item_id: open.id,
        output_index: open.index,
        content_index: 0,
        delta: text,
        logprobs: entries.map((e) => ({
          token: e.token,
          logprob: e.logprob,
          top_logprobs: e.top_logprobs.map((t) => ({ token: t.token, logprob: t.logprob })),
        })),
      }),
    )
    return events
  }

  #callDelta(index: number, id: string | null, fn: Record<string, unknown>): Array<Record<string, unknown>> {
    const events: Array<Record<string, unknown>> = []
    let call = this.#calls.get(index)
    if (call == null) {
      events.push(...this.#closeText())
      const itemId = newId('fc')
      call = {
        id: id ?? newId('call'),
        name: typeof fn.name === 'string' ? fn.name : '',
        arguments: '',
        itemId,
        index: this.#output.length,
      }
      this.#calls.set(index, call)
      this.#output.push({
        id: itemId,
        type: 'function_call',
        status: 'in_progress',
        call_id: call.id,
        name: call.name,
        arguments: '',
      })
      events.push(
        this.#event('response.output_item.added', {
          output_index: call.index,
          item: { ...this.#output.at(-1)! },
        }),
      )
    }
    if (typeof fn.arguments === 'string' && fn.arguments !== '') {
      call.arguments += fn.arguments
      events.push(
        this.#event('response.function_call_arguments.delta', {
          item_id: call.itemId,
          output_index: call.index,
          delta: fn.arguments,
        }),
      )
    }
    return events
  }

  #closeText(): Array<Record<string, unknown>> {
    const open = this.#text
    if (open == null) return []
    this.#text = null
    const part = { type: 'output_text', text: open.text, annotations: [], logprobs: open.logprobs }
    const item = { id: open.id, type: 'message', role: 'assistant', status: 'completed', content: [part] }
    this.#output[open.index] = item
    return [
      this.#event('response.output_text.done', {
        item_id: open.id,
        output_index: open.index,
        content_index: 0,
        text: open.text,
        logprobs: open.logprobs.map((e) => ({ token: e.token, logprob: e.logprob })),
      }),
      this.#event('response.content_part.done', {
        item_id: open.id,
        output_index: open.index,
        content_index: 0,
        part,
      }),
      this.#event('response.output_item.done', { output_index: open.index, item }),
    ]
  }

  #closeCalls(): Array<Record<string, unknown>> {
    const events: Array<Record<string, unknown>> = []
    for (const call of this.#calls.values()) {
      const item = {
        id: call.itemId,
        type: 'function_call',
        status: 'completed',
        call_id: call.id,
        name: call.name,
        arguments: call.arguments || '{}',
      }
      this.#output[call.index] = item
      events.push(
        this.#event('response.function_call_arguments.done', {
          item_id: call.itemId,
          output_index: call.index,
          name: call.name,
          arguments: item.arguments,
        }),
        this.#event('response.output_item.done', { output_index: call.index, item }),
      )
    }
    this.#calls = new Map()
    return events
  }

  #closeAll(): Array<Record<string, unknown>> {
    return [...this.#closeText(), ...this.#closeCalls()]
  }
}

const encoder = new TextEncoder()

function sse(event: Record<string, unknown>): string {
  return `event: ${event.type as string}\ndata: ${JSON.stringify(event)}\n\n`
}

/**
 * An AnswerSink that takes a chat completion answer (what the hops behind send) and passes the
 * Response on to `inner`: the event stream as chunks arrive, or one JSON body. Errors before the
 * answer began pass through as they are (OpenAI's error shape is the same).
 */
export function responsesSink(inner: AnswerSink, req: ResponseRequest, items: OutputItemStore): AnswerSink {
  const builder = new ResponseBuilder(req)
  let mode: 'error' | 'stream' | 'json' | null = null
  const splitter = new SseSplitter()
  const held: Uint8Array[] = []
  let heldHeaders: Record<string, string> = {}
  let failed = false
  const keep = (): void => {
    if (req.scope != null) for (const item of builder.output) items.put(req.scope, item)
  }
  const consume = (chunk: Uint8Array): string => {
    let out = ''
    for (const event of splitter.push(chunk)) {
      if (event.data == null || event.data === '[DONE]') continue
      let data: unknown
      try {
        data = JSON.parse(event.data)
      } catch {
        continue
      }
      if (!isPlainObject(data)) continue
      if (data.error != null) {
        const e = isPlainObject(data.error) ? data.error : {}
        const err = apiError(
          'stream_interrupted',
          typeof e.message === 'string' ? e.message : 'the answer broke off',
        )
        failed = true
        for (const ev of builder.fail(err)) out += sse(ev)
        continue
      }
      for (const ev of builder.chunk(data)) out += sse(ev)
    }
    return out
  }
  return {
    get gone() {
      return inner.gone
    },
    get started() {
      return inner.started
    },
    async head(status, headers) {
      if (status !== 200) {
        mode = 'error'
        return inner.head(status, headers)
      }
      if (headers['content-type']?.startsWith('text/event-stream')) {
        mode = 'stream'
        await inner.head(200, { ...headers, 'content-type': 'text/event-stream; charset=utf-8' })
        await inner.write(builder.start().map(sse).join(''))
        return
      }
      mode = 'json'
      heldHeaders = headers
    },
    async write(chunk) {
      const bytes = typeof chunk === 'string' ? encoder.encode(chunk) : chunk
      if (mode === 'error') return inner.write(bytes)
      if (mode === 'json') {
        held.push(bytes)
        return
      }
      const out = consume(bytes)
      if (out !== '') await inner.write(out)
    },
    async end(last) {
      const bytes = last == null ? null : typeof last === 'string' ? encoder.encode(last) : last
      if (mode === 'error') return inner.end(bytes ?? undefined)
      if (mode === 'json') {
        if (bytes != null) held.push(bytes)
        const body = JSON.parse(Buffer.concat(held).toString('utf8')) as Record<string, unknown>
        builder.completion(body)
        keep()
        await inner.head(200, { ...heldHeaders, 'content-type': 'application/json' })
        return inner.end(JSON.stringify(builder.response(builder.status)))
      }
      let out = bytes != null ? consume(bytes) : ''
      if (!failed) {
        for (const ev of builder.finish()) out += sse(ev)
        keep()
      }
      return inner.end(out)
    },
  }
}
