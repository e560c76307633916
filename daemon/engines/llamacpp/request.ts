import { type ApiError, apiError, type HttpErrorCodeName } from '../../../core/errors.ts'

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant'
  content: string
}

/** A chat or completion request, validated: what the engine generates from. */
export interface GenerationRequest {
  kind: 'chat' | 'completion'
  model: string
  messages: ChatMessage[]
  prompt: string
  maxTokens: number | null
  temperature: number
  topP: number
  seed: number | null
  stop: string[]
  stream: boolean
  includeUsage: boolean
}

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
  'user',
])
const chatOnly = new Set(['messages', 'max_completion_tokens'])
const completionOnly = new Set(['prompt'])
/** Accepted only at their neutral value; anything else is refused by name rather than ignored. */
const neutral: Record<string, unknown> = {
  presence_penalty: 0,
  frequency_penalty: 0,
  logprobs: false,
  echo: false,
  best_of: 1,
  parallel_tool_calls: true,
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

function textOf(content: unknown, i: number): string {
  if (typeof content === 'string') return content
  if (Array.isArray(content)) {
    return content
      .map((part, j) => {
        if (typeof part === 'object' && part != null && (part as { type?: unknown }).type === 'text') {
          const t = (part as { text?: unknown }).text
          if (typeof t === 'string') return t
        }
        throw bad(
          `messages[${i}].content[${j}]: only text parts are supported`,
          `messages[${i}].content`,
          'unsupported_content',
        )
      })
      .join('')
  }
  throw bad(
    `messages[${i}].content must be a string or a list of text parts`,
    `messages[${i}].content`,
    'invalid_type',
  )
}

/** Validates an OpenAI chat or completion body; throws an ApiError (400) naming the offending field. */
export function parseGenerationRequest(
  kind: 'chat' | 'completion',
  body: unknown,
  maxContextTokens: number,
): GenerationRequest {
  if (typeof body !== 'object' || body == null || Array.isArray(body))
    throw bad('the request body must be a JSON object', 'body', 'invalid_type')
  const b = body as Record<string, unknown>
  const allowed = kind === 'chat' ? chatOnly : completionOnly
  for (const key of Object.keys(b)) {
    if (common.has(key) || allowed.has(key)) continue
    if (key in neutral && (b[key] == null || b[key] === neutral[key])) continue
    throw bad(`${key} is not supported by this engine`, key, 'unsupported_parameter')
  }
  if (typeof b.model !== 'string' || b.model === '')
    throw bad('model is required', 'model', 'missing_required_parameter')
  if (b.n != null && b.n !== 1) throw bad('only n = 1 is supported', 'n', 'unsupported_value')
  const maxTokens = number(
    b,
    kind === 'chat' && b.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens',
    1,
    maxContextTokens,
    true,
  )
  const temperature = number(b, 'temperature', 0, 2, false) ?? 1
  const topP = number(b, 'top_p', 0, 1, false) ?? 1
  if (b.top_p === 0) throw bad('top_p must be more than 0', 'top_p')
  const seed = number(b, 'seed', Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER, true)
  let stop: string[] = []
  if (typeof b.stop === 'string') stop = [b.stop]
  else if (Array.isArray(b.stop)) stop = b.stop as string[]
  else if (b.stop != null) throw bad('stop must be a string or a list of strings', 'stop', 'invalid_type')
  if (stop.length > 4 || stop.some((s) => typeof s !== 'string' || s === ''))
    throw bad('stop takes up to 4 non-empty strings', 'stop')
  if (b.stream != null && typeof b.stream !== 'boolean')
    throw bad('stream must be a boolean', 'stream', 'invalid_type')
  const so = b.stream_options
  if (so != null && (typeof so !== 'object' || Array.isArray(so)))
    throw bad('stream_options must be an object', 'stream_options', 'invalid_type')
  const includeUsage = (so as { include_usage?: unknown } | null)?.include_usage === true
  const req: GenerationRequest = {
    kind,
    model: b.model,
    messages: [],
    prompt: '',
    maxTokens,
    temperature,
    topP,
    seed,
    stop,
    stream: b.stream === true,
    includeUsage,
  }
  if (kind === 'chat') {
    if (!Array.isArray(b.messages) || b.messages.length === 0)
      throw bad('messages must be a non-empty list', 'messages', 'invalid_type')
    req.messages = b.messages.map((m, i): ChatMessage => {
      if (typeof m !== 'object' || m == null)
        throw bad(`messages[${i}] must be an object`, `messages[${i}]`, 'invalid_type')
      const role = (m as { role?: unknown }).role
      const r = role === 'developer' ? 'system' : role
      if (r !== 'system' && r !== 'user' && r !== 'assistant') {
        throw bad(`messages[${i}].role must be system, user or assistant`, `messages[${i}].role`)
      }
      return { role: r, content: textOf((m as { content?: unknown }).content, i) }
    })
  } else {
    const p = b.prompt
    if (typeof p === 'string') req.prompt = p
    else if (Array.isArray(p) && p.length === 1 && typeof p[0] === 'string') req.prompt = p[0]
    else throw bad('prompt must be a string (one prompt per request)', 'prompt', 'invalid_type')
  }
  return req
}
