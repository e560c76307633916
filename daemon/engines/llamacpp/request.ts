import type { GbnfJsonSchema } from 'node-llama-cpp'
import { type ApiError, apiError, type HttpErrorCodeName } from '../../../core/errors.ts'
import { isPlainObject } from '../../../core/guards.ts'
import { contentText } from '../../../openai/content.ts'
import { toGrammarSchema } from './json-schema.ts'

/**
 * The OpenAI chat, completion and embedding requests the embedded engine serves, validated into
 * what it generates from. Every field OpenAI documents is either honoured, accepted and ignored
 * where ignoring it cannot change the answer (`user`, `metadata`, `store`...), or refused with a
 * 400 that names it and says why. docs/api.md has the table.
 */

export interface ToolCall {
  id: string
  name: string
  /** JSON text, as the model wrote it. */
  arguments: string
}

export type ChatMessage =
  | { role: 'system' | 'user'; content: string }
  | { role: 'assistant'; content: string; toolCalls: ToolCall[] }
  | { role: 'tool'; toolCallId: string; content: string }

export interface FunctionTool {
  name: string
  description?: string
  /** In the grammar's subset (json-schema.ts); absent: a function without parameters. */
  parameters?: GbnfJsonSchema
}

export type ToolChoice = 'none' | 'auto' | 'required' | { name: string }

export type OutputFormat =
  | { type: 'text' }
  | { type: 'json_object' }
  | { type: 'json_schema'; name: string; schema: GbnfJsonSchema }

/** A chat or completion request, validated: what the engine generates from. */
export interface GenerationRequest {
  kind: 'chat' | 'completion'
  model: string
  messages: ChatMessage[]
  /** Completions: text, or token ids. */
  prompt: string | number[]
  /** Per choice; null: as many as the context leaves. 0 (completions with echo): score only. */
  maxTokens: number | null
  temperature: number
  topP: number
  seed: number | null
  stop: string[]
  stream: boolean
  includeUsage: boolean
  /** Choices to generate. */
  n: number
  presencePenalty: number
  frequencyPenalty: number
  /** Token id → added to its logit (-100: never). */
  logitBias: Array<[number, number]>
  logprobs: boolean
  /** Alternatives per token (chat: top_logprobs; completions: the `logprobs` number). */
  topLogprobs: number
  echo: boolean
  /**
   * vLLM's `prompt_logprobs`: score the prompt in one prefill pass, this many alternatives per
   * token, and generate nothing (the integrity check's verifier call). null: not asked.
   */
  promptLogprobs: number | null
  /** Chat: vLLM's `continue_final_message`: the last (assistant) message is the text to score. */
  continueFinalMessage: boolean
  suffix: string | null
  tools: FunctionTool[]
  toolChoice: ToolChoice
  parallelToolCalls: boolean
  format: OutputFormat
}

/** An embeddings request, validated. */
export interface EmbeddingRequest {
  model: string
  /** Each input: text, or token ids. */
  inputs: Array<string | number[]>
  encoding: 'float' | 'base64'
  dimensions: number | null
}

/** What the engine's model allows; requests past it are refused by name. */
export interface EngineLimits {
  /** Tokens one sequence holds (prompt and answer). */
  contextTokens: number
  /** Token ids run from 0 to vocabularySize - 1. */
  vocabularySize: number
  maxChoices: number
}

export const maxChoices = 8
export const maxTools = 128
export const maxEmbeddingInputs = 2048
const toolNamePattern = /^[a-zA-Z0-9_-]{1,64}$/

/** Accepted and ignored: none of them changes what this engine generates. */
const ignored = new Set([
  'user',
  'metadata',
  'store',
  'service_tier',
  'prompt_cache_key',
  'safety_identifier',
  'reasoning_effort',
])
const common = new Set([
  'model',
  'max_tokens',
  'temperature',
  'top_p',
  'seed',
  'stop',
  'stream',
  'stream_options',
  'n',
  'presence_penalty',
  'frequency_penalty',
  'logit_bias',
  'logprobs',
  // vLLM's extensions for scoring a prompt without generating (docs/integrity.md).
  'prompt_logprobs',
  'return_token_ids',
])
const chatOnly = new Set([
  'messages',
  'max_completion_tokens',
  'top_logprobs',
  'tools',
  'tool_choice',
  'parallel_tool_calls',
  'response_format',
  'modalities',
  'continue_final_message',
  'add_generation_prompt',
])
const completionOnly = new Set(['prompt', 'echo', 'suffix', 'best_of'])
/** Refused with the reason: what they ask for, this engine does not do. */
const refusedWhy: Record<string, string> = {
  functions: 'the legacy functions API is not supported; send tools',
  function_call: 'the legacy functions API is not supported; send tool_choice',
  audio: 'audio output is not supported',
  prediction: 'predicted outputs are not supported',
  web_search_options: 'web search is not supported',
  verbosity: 'this engine has no verbosity control',
}

function bad(message: string, param: string, code: HttpErrorCodeName = 'invalid_value'): ApiError {
  return apiError(code, message, { param })
}

function number(
  body: Record<string, unknown>,
  key: string,
  min: number,
  max: number,
  integer: boolean,
): number | null {
  const v = body[key]
  if (v == null) return null
  if (typeof v !== 'number' || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    throw bad(`${key} must be ${integer ? 'an integer' : 'a number'}`, key, 'invalid_type')
  }
  if (v < min || v > max) throw bad(`${key} must be between ${min} and ${max}, got ${v}`, key)
  return v
}

function checkKeys(b: Record<string, unknown>, allowed: Set<string>): void {
  for (const key of Object.keys(b)) {
    if (common.has(key) || allowed.has(key) || ignored.has(key)) continue
    const why = refusedWhy[key]
    if (why != null) throw bad(`${key}: ${why}`, key, 'unsupported_parameter')
    throw bad(`${key} is not supported by this engine`, key, 'unsupported_parameter')
  }
}

function parseStop(b: Record<string, unknown>): string[] {
  let stop: string[] = []
  if (typeof b.stop === 'string') stop = [b.stop]
  else if (Array.isArray(b.stop)) stop = b.stop as string[]
  else if (b.stop != null) throw bad('stop must be a string or a list of strings', 'stop', 'invalid_type')
  if (stop.length > 4 || stop.some((s) => typeof s !== 'string' || s === ''))
    throw bad('stop takes up to 4 non-empty strings', 'stop')
  return stop
}

function parseLogitBias(v: unknown, limits: EngineLimits): Array<[number, number]> {
  if (v == null) return []
  if (!isPlainObject(v))
    throw bad('logit_bias must be an object of token id → bias', 'logit_bias', 'invalid_type')
  const out: Array<[number, number]> = []
  for (const [key, bias] of Object.entries(v)) {
    const id = Number(key)
    if (!/^\d+$/.test(key) || !Number.isSafeInteger(id) || id >= limits.vocabularySize)
      throw bad(
        `logit_bias: ${JSON.stringify(key)} is not a token id of this model (0 to ${limits.vocabularySize - 1})`,
        'logit_bias',
      )
    if (typeof bias !== 'number' || !Number.isFinite(bias) || bias < -100 || bias > 100)
      throw bad(`logit_bias: the bias of token ${key} must be a number from -100 to 100`, 'logit_bias')
    out.push([id, bias])
  }
  return out
}

function parseTools(b: Record<string, unknown>): FunctionTool[] {
  if (b.tools == null) return []
  if (!Array.isArray(b.tools)) throw bad('tools must be a list', 'tools', 'invalid_type')
  if (b.tools.length > maxTools) throw bad(`tools takes at most ${maxTools} tools`, 'tools')
  const names = new Set<string>()
  return b.tools.map((t, i) => {
    const at = `tools[${i}]`
    if (!isPlainObject(t)) throw bad(`${at} must be an object`, at, 'invalid_type')
    if (t.type !== 'function')
      throw bad(
        `${at}.type ${JSON.stringify(t.type)}: only function tools are supported`,
        `${at}.type`,
        'unsupported_value',
      )
    const fn = t.function
    if (!isPlainObject(fn)) throw bad(`${at}.function must be an object`, `${at}.function`, 'invalid_type')
    if (typeof fn.name !== 'string' || !toolNamePattern.test(fn.name))
      throw bad(`${at}.function.name must be 1-64 letters, digits, _ or -`, `${at}.function.name`)
    if (names.has(fn.name)) throw bad(`${at}.function.name ${fn.name} is listed twice`, `${at}.function.name`)
    names.add(fn.name)
    if (fn.description != null && typeof fn.description !== 'string')
      throw bad(`${at}.function.description must be a string`, `${at}.function.description`, 'invalid_type')
    const tool: FunctionTool = { name: fn.name }
    if (typeof fn.description === 'string') tool.description = fn.description
    // `{}` allows any arguments: a call with none is one of them.
    if (fn.parameters != null && !(isPlainObject(fn.parameters) && Object.keys(fn.parameters).length === 0)) {
      const params = toGrammarSchema(fn.parameters, `${at}.function.parameters`) as Record<string, unknown>
      // An object without properties is a call with no arguments.
      const empty =
        params.type === 'object' &&
        params.additionalProperties == null &&
        Object.keys((params.properties as object | undefined) ?? {}).length === 0
      if (!empty) tool.parameters = params as GbnfJsonSchema
    }
    return tool
  })
}

function parseToolChoice(b: Record<string, unknown>, tools: FunctionTool[]): ToolChoice {
  const c = b.tool_choice
  if (c == null) return tools.length > 0 ? 'auto' : 'none'
  if (c === 'none' || c === 'auto' || c === 'required') {
    if (c === 'required' && tools.length === 0) throw bad('tool_choice required needs tools', 'tool_choice')
    return c
  }
  if (
    isPlainObject(c) &&
    c.type === 'function' &&
    isPlainObject(c.function) &&
    typeof c.function.name === 'string'
  ) {
    const name = c.function.name
    if (!tools.some((t) => t.name === name))
      throw bad(
        `tool_choice names the function ${JSON.stringify(name)}, which is not in tools`,
        'tool_choice',
      )
    return { name }
  }
  throw bad(
    'tool_choice must be none, auto, required or { "type": "function", "function": { "name": ... } }',
    'tool_choice',
    isPlainObject(c) ? 'unsupported_value' : 'invalid_type',
  )
}

function parseFormat(v: unknown): OutputFormat {
  if (v == null) return { type: 'text' }
  if (!isPlainObject(v)) throw bad('response_format must be an object', 'response_format', 'invalid_type')
  if (v.type === 'text') return { type: 'text' }
  if (v.type === 'json_object') return { type: 'json_object' }
  if (v.type !== 'json_schema')
    throw bad(
      `response_format.type must be text, json_object or json_schema, got ${JSON.stringify(v.type)}`,
      'response_format.type',
    )
  const js = v.json_schema
  if (!isPlainObject(js))
    throw bad('response_format.json_schema must be an object', 'response_format.json_schema', 'invalid_type')
  if (typeof js.name !== 'string' || !toolNamePattern.test(js.name))
    throw bad(
      'response_format.json_schema.name must be 1-64 letters, digits, _ or -',
      'response_format.json_schema.name',
    )
  if (js.schema == null) return { type: 'json_object' }
  return {
    type: 'json_schema',
    name: js.name,
    schema: toGrammarSchema(js.schema, 'response_format.json_schema.schema'),
  }
}

function parseMessages(v: unknown): ChatMessage[] {
  if (!Array.isArray(v) || v.length === 0)
    throw bad('messages must be a non-empty list', 'messages', 'invalid_type')
  const messages = v.map(parseMessage(new Set<string>()))
  // As OpenAI requires: every tool call is answered by a tool message before the conversation goes on.
  let open: { at: number; ids: Set<string> } | null = null
  for (const [i, m] of messages.entries()) {
    if (m.role === 'tool') {
      open?.ids.delete(m.toolCallId)
      continue
    }
    if (open != null && open.ids.size > 0)
      throw bad(
        `messages[${open.at}].tool_calls ${[...open.ids].join(', ')} have no tool message answering them`,
        `messages[${open.at}].tool_calls`,
      )
    open =
      m.role === 'assistant' && m.toolCalls.length > 0
        ? { at: i, ids: new Set(m.toolCalls.map((c) => c.id)) }
        : null
  }
  if (open != null && open.ids.size > 0)
    throw bad(
      `messages[${open.at}].tool_calls ${[...open.ids].join(', ')} have no tool message answering them`,
      `messages[${open.at}].tool_calls`,
    )
  return messages
}

function parseMessage(callIds: Set<string>): (m: unknown, i: number) => ChatMessage {
  return (m, i) => {
    const at = `messages[${i}]`
    if (!isPlainObject(m)) throw bad(`${at} must be an object`, at, 'invalid_type')
    const role = m.role === 'developer' ? 'system' : m.role
    if (role === 'system' || role === 'user')
      return { role, content: contentText(m.content, `${at}.content`) }
    if (role === 'assistant') {
      const toolCalls: ToolCall[] = []
      if (m.tool_calls != null) {
        if (!Array.isArray(m.tool_calls))
          throw bad(`${at}.tool_calls must be a list`, `${at}.tool_calls`, 'invalid_type')
        for (const [j, call] of m.tool_calls.entries()) {
          const cat = `${at}.tool_calls[${j}]`
          const fn = isPlainObject(call) ? call.function : null
          if (
            !isPlainObject(call) ||
            typeof call.id !== 'string' ||
            !isPlainObject(fn) ||
            typeof fn.name !== 'string'
          )
            throw bad(
              `${cat} must be { id, type: "function", function: { name, arguments } }`,
              cat,
              'invalid_type',
            )
          const args = typeof fn.arguments === 'string' ? fn.arguments : '{}'
          try {
            JSON.parse(args === '' ? '{}' : args)
          } catch {
            throw bad(`${cat}.function.arguments must be JSON text`, `${cat}.function.arguments`)
          }
          callIds.add(call.id)
          toolCalls.push({ id: call.id, name: fn.name, arguments: args === '' ? '{}' : args })
        }
      }
      const content = m.content == null ? '' : contentText(m.content, `${at}.content`)
      return { role: 'assistant', content, toolCalls }
    }
    if (role === 'tool') {
      if (typeof m.tool_call_id !== 'string')
        throw bad(`${at}.tool_call_id is required`, `${at}.tool_call_id`, 'missing_required_parameter')
      if (!callIds.has(m.tool_call_id))
        throw bad(
          `${at}.tool_call_id ${JSON.stringify(m.tool_call_id)} answers no tool call before it`,
          `${at}.tool_call_id`,
        )
      return { role: 'tool', toolCallId: m.tool_call_id, content: contentText(m.content, `${at}.content`) }
    }
    throw bad(`${at}.role must be system, developer, user, assistant or tool`, `${at}.role`)
  }
}

function parsePrompt(p: unknown, limits: EngineLimits): string | number[] {
  if (typeof p === 'string') return p
  if (Array.isArray(p) && p.length === 1 && typeof p[0] === 'string') return p[0]
  const tokens = Array.isArray(p) && p.length === 1 && Array.isArray(p[0]) ? p[0] : p
  if (Array.isArray(tokens) && tokens.length > 0 && tokens.every((t) => typeof t === 'number')) {
    if (tokens.some((t) => !Number.isInteger(t) || t < 0 || t >= limits.vocabularySize))
      throw bad(`prompt: token ids must be whole numbers from 0 to ${limits.vocabularySize - 1}`, 'prompt')
    return tokens as number[]
  }
  throw bad(
    'prompt must be a string or a list of token ids (one prompt per request)',
    'prompt',
    'invalid_type',
  )
}

/** Validates an OpenAI chat or completion body; throws an ApiError (400) naming the offending field. */
export function parseGenerationRequest(
  kind: 'chat' | 'completion',
  body: unknown,
  limits: EngineLimits,
): GenerationRequest {
  if (!isPlainObject(body)) throw bad('the request body must be a JSON object', 'body', 'invalid_type')
  const b = body
  checkKeys(b, kind === 'chat' ? chatOnly : completionOnly)
  if (typeof b.model !== 'string' || b.model === '')
    throw bad('model is required', 'model', 'missing_required_parameter')
  const maxTokensKey =
    kind === 'chat' && b.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens'
  const maxTokens = number(b, maxTokensKey, kind === 'completion' ? 0 : 1, limits.contextTokens, true)
  const temperature = number(b, 'temperature', 0, 2, false) ?? 1
  const topP = number(b, 'top_p', 0, 1, false) ?? 1
  if (b.top_p === 0) throw bad('top_p must be more than 0', 'top_p')
  const seed = number(b, 'seed', Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER, true)
  if (b.stream != null && typeof b.stream !== 'boolean')
    throw bad('stream must be a boolean', 'stream', 'invalid_type')
  const so = b.stream_options
  if (so != null && !isPlainObject(so))
    throw bad('stream_options must be an object', 'stream_options', 'invalid_type')
  const n = number(b, 'n', 1, Number.MAX_SAFE_INTEGER, true) ?? 1
  if (n > limits.maxChoices)
    throw bad(
      `n must be at most ${limits.maxChoices} on this engine (choices are generated one after another)`,
      'n',
    )
  if (kind === 'completion' && b.best_of != null && b.best_of !== n)
    throw bad('best_of is not supported (it must equal n)', 'best_of', 'unsupported_value')
  if (
    kind === 'chat' &&
    b.modalities != null &&
    !(Array.isArray(b.modalities) && b.modalities.every((m) => m === 'text'))
  )
    throw bad('modalities: only text is supported', 'modalities', 'unsupported_value')

  let logprobs = false
  let topLogprobs = 0
  if (kind === 'chat') {
    if (b.logprobs != null && typeof b.logprobs !== 'boolean')
      throw bad('logprobs must be a boolean', 'logprobs', 'invalid_type')
    logprobs = b.logprobs === true
    topLogprobs = number(b, 'top_logprobs', 0, 20, true) ?? 0
    if (topLogprobs > 0 && !logprobs) throw bad('top_logprobs needs logprobs: true', 'top_logprobs')
  } else {
    const k = number(b, 'logprobs', 0, 5, true)
    logprobs = k != null
    topLogprobs = k ?? 0
  }
  if (kind === 'completion' && b.echo != null && typeof b.echo !== 'boolean')
    throw bad('echo must be a boolean', 'echo', 'invalid_type')
  const echo = kind === 'completion' && b.echo === true
  if (maxTokens === 0 && !echo && b.prompt_logprobs == null)
    throw bad('max_tokens 0 needs echo: true or prompt_logprobs (it scores the prompt only)', 'max_tokens')
  if (b.suffix != null && typeof b.suffix !== 'string')
    throw bad('suffix must be a string', 'suffix', 'invalid_type')
  const promptLogprobs = parseScoring(kind, b, maxTokens)

  const tools = kind === 'chat' ? parseTools(b) : []
  const toolChoice = kind === 'chat' ? parseToolChoice(b, tools) : 'none'
  if (b.parallel_tool_calls != null && typeof b.parallel_tool_calls !== 'boolean')
    throw bad('parallel_tool_calls must be a boolean', 'parallel_tool_calls', 'invalid_type')
  const format = kind === 'chat' ? parseFormat(b.response_format) : ({ type: 'text' } as const)
  const usesTools = toolChoice !== 'none' && tools.length > 0
  if (usesTools && logprobs)
    throw bad('logprobs with tools is not supported by this engine', 'logprobs', 'unsupported_value')

  const req: GenerationRequest = {
    kind,
    model: b.model,
    messages: [],
    prompt: '',
    maxTokens,
    temperature,
    topP,
    seed,
    stop: parseStop(b),
    stream: b.stream === true,
    includeUsage: so?.include_usage === true,
    n,
    presencePenalty: number(b, 'presence_penalty', -2, 2, false) ?? 0,
    frequencyPenalty: number(b, 'frequency_penalty', -2, 2, false) ?? 0,
    logitBias: parseLogitBias(b.logit_bias, limits),
    logprobs,
    topLogprobs,
    echo,
    promptLogprobs,
    continueFinalMessage: b.continue_final_message === true,
    suffix: typeof b.suffix === 'string' && b.suffix !== '' ? b.suffix : null,
    tools,
    toolChoice,
    parallelToolCalls: b.parallel_tool_calls !== false,
    format,
  }
  if (kind === 'chat') req.messages = parseMessages(b.messages)
  else req.prompt = parsePrompt(b.prompt, limits)
  if (req.continueFinalMessage) {
    const last = req.messages.at(-1)
    if (last?.role !== 'assistant' || last.toolCalls.length > 0 || last.content === '')
      throw bad(
        'continue_final_message needs the last message to be an assistant message with text content',
        'messages',
      )
  }
  return req
}

/**
 * vLLM's scoring form: `prompt_logprobs` (0-20 alternatives per prompt token), with chat's
 * `continue_final_message` (and `add_generation_prompt: false`) to score an answer as the model's
 * own turn, and `return_token_ids`. This engine then only scores: `max_tokens` 0 or 1 (vLLM needs
 * at least 1), one choice, not streamed, no tools or format.
 */
function parseScoring(
  kind: 'chat' | 'completion',
  b: Record<string, unknown>,
  maxTokens: number | null,
): number | null {
  const k = number(b, 'prompt_logprobs', 0, 20, true)
  if (b.return_token_ids != null && typeof b.return_token_ids !== 'boolean')
    throw bad('return_token_ids must be a boolean', 'return_token_ids', 'invalid_type')
  for (const key of ['continue_final_message', 'add_generation_prompt'])
    if (b[key] != null && typeof b[key] !== 'boolean')
      throw bad(`${key} must be a boolean`, key, 'invalid_type')
  const continues = kind === 'chat' && b.continue_final_message === true
  if (continues && b.add_generation_prompt !== false)
    throw bad(
      'continue_final_message needs add_generation_prompt: false (the answer continues the last message)',
      'add_generation_prompt',
    )
  if (!continues && b.add_generation_prompt === false)
    throw bad(
      'add_generation_prompt: false is only supported with continue_final_message',
      'add_generation_prompt',
      'unsupported_value',
    )
  if (continues && k == null)
    throw bad(
      'continue_final_message is only supported with prompt_logprobs on this engine (it scores, it does not generate)',
      'continue_final_message',
      'unsupported_value',
    )
  if (k == null) return null
  if (maxTokens == null || maxTokens > 1)
    throw bad('prompt_logprobs scores only on this engine: max_tokens must be 0 or 1', 'max_tokens')
  if (b.stream === true) throw bad('prompt_logprobs cannot stream', 'stream', 'unsupported_value')
  if (b.n != null && b.n !== 1) throw bad('prompt_logprobs takes one choice (n 1)', 'n', 'unsupported_value')
  if (b.echo === true || b.suffix != null || b.tools != null || b.response_format != null)
    throw bad(
      'prompt_logprobs does not combine with echo, suffix, tools or response_format',
      'prompt_logprobs',
      'unsupported_value',
    )
  return k
}

/** Validates an OpenAI embeddings body. */
export function parseEmbeddingRequest(body: unknown, limits: EngineLimits): EmbeddingRequest {
  if (!isPlainObject(body)) throw bad('the request body must be a JSON object', 'body', 'invalid_type')
  for (const key of Object.keys(body)) {
    if (!['model', 'input', 'encoding_format', 'dimensions', 'user'].includes(key))
      throw bad(`${key} is not supported by this engine`, key, 'unsupported_parameter')
  }
  if (typeof body.model !== 'string' || body.model === '')
    throw bad('model is required', 'model', 'missing_required_parameter')
  const input = body.input
  if (input == null) throw bad('input is required', 'input', 'missing_required_parameter')
  let inputs: Array<string | number[]>
  if (typeof input === 'string') inputs = [input]
  else if (Array.isArray(input) && input.length > 0 && input.every((x) => typeof x === 'number'))
    inputs = [input as number[]]
  else if (
    Array.isArray(input) &&
    input.length > 0 &&
    input.every((x) => typeof x === 'string' || Array.isArray(x))
  )
    inputs = input as Array<string | number[]>
  else
    throw bad(
      'input must be a string, a list of strings, or token ids (a list, or a list of lists)',
      'input',
      'invalid_type',
    )
  if (inputs.length > maxEmbeddingInputs)
    throw bad(`input takes at most ${maxEmbeddingInputs} entries`, 'input')
  for (const [i, x] of inputs.entries()) {
    if (typeof x === 'string') {
      if (x === '') throw bad(`input[${i}] is empty`, 'input')
      continue
    }
    if (
      x.length === 0 ||
      x.some((t) => typeof t !== 'number' || !Number.isInteger(t) || t < 0 || t >= limits.vocabularySize)
    )
      throw bad(
        `input[${i}]: token ids must be whole numbers from 0 to ${limits.vocabularySize - 1}`,
        'input',
      )
  }
  const encoding = body.encoding_format ?? 'float'
  if (encoding !== 'float' && encoding !== 'base64')
    throw bad('encoding_format must be float or base64', 'encoding_format', 'invalid_value')
  const dimensions = number(body, 'dimensions', 1, 1_000_000, true)
  return { model: body.model, inputs, encoding, dimensions }
}
