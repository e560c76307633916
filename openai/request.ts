import { isUtf8 } from 'node:buffer'
import { apiError } from '../core/errors.ts'
import { isPlainObject } from '../core/guards.ts'
import type { ProxiedKind } from './endpoints.ts'
import { toolCallHiddenTokens } from './usage.ts'

/**
 * What a proxy hop (the federation, a head) reads of an OpenAI generation request before passing it
 * on: the few fields routing and accounting rely on (the engine validates the rest), with usage
 * reporting forced on for streams so the hop sees the node's claim.
 */
export interface PreparedRequest {
  /** The body to send on: the client's, with usage forced on for streams. */
  body: Record<string, unknown>
  /** The client asked for the usage chunk (always true for a non-streamed body, which carries usage). */
  clientWantsUsage: boolean
  stream: boolean
  /** max_completion_tokens (chat) or max_tokens: what the engine obeys per choice; null = unbounded. */
  maxTokens: number | null
  /** Choices requested (`n`); bounds scale with it. */
  n: number
  model: string
  /** Tokens a choice may generate that never reach the client (a grammar's terminator, end of turn). */
  hiddenTokensPerChoice: number
  /** Embeddings: the most prompt tokens the inputs can be (a token is at least a byte); null: unbounded. */
  promptBound: number | null
}

/** Each choice ends with a token the client never sees (end of sequence). */
export const endTokensPerChoice = 1
/** A JSON grammar ends the answer with whitespace it trims (node-llama-cpp: "\n\n\n\n"). */
export const structuredOutputHiddenTokens = 8

function positiveInteger(body: Record<string, unknown>, key: string): number | null {
  const v = body[key]
  if (v == null) return null
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) {
    throw apiError('invalid_value', `${key} must be a positive integer`, { param: key })
  }
  return v
}

/**
 * Checks the few fields a hop relies on and forces usage reporting on streamed requests; a body it
 * cannot route is refused with a 400 before any node sees it.
 */
export function prepareUpstreamRequest(body: unknown, kind: ProxiedKind): PreparedRequest {
  if (!isPlainObject(body)) throw apiError('invalid_type', 'the request body must be a JSON object')
  const model = body.model
  if (typeof model !== 'string' || model === '') {
    throw apiError('missing_required_parameter', 'model is required (a non-empty string)', { param: 'model' })
  }
  if (kind === 'embedding') return prepareEmbedding(body, model)
  if (body.stream != null && typeof body.stream !== 'boolean') {
    throw apiError('invalid_type', 'stream must be a boolean', { param: 'stream' })
  }
  const stream = body.stream === true
  const maxTokensField = positiveInteger(body, 'max_tokens')
  // The chat API's newer name wins, as in the engines; the completions API does not have it.
  const maxCompletion = kind === 'chat' ? positiveInteger(body, 'max_completion_tokens') : null
  const n = positiveInteger(body, 'n') ?? 1
  const options = body.stream_options
  if (options != null && !isPlainObject(options)) {
    throw apiError('invalid_type', 'stream_options must be an object', { param: 'stream_options' })
  }
  const out: Record<string, unknown> = { ...body }
  let clientWantsUsage = true
  if (stream) {
    clientWantsUsage = options?.include_usage === true
    out.stream_options = { ...options, include_usage: true }
  }
  const format = isPlainObject(body.response_format) ? body.response_format.type : null
  return {
    body: out,
    clientWantsUsage,
    stream,
    maxTokens: maxCompletion ?? maxTokensField,
    n,
    model,
    hiddenTokensPerChoice:
      endTokensPerChoice +
      (format === 'json_object' || format === 'json_schema' ? structuredOutputHiddenTokens : 0) +
      // A call begun but cut by max_tokens before its arguments: its syntax and name never show.
      (Array.isArray(body.tools) && body.tools.length > 0 && body.tool_choice !== 'none'
        ? toolCallHiddenTokens
        : 0),
    promptBound: null,
  }
}

/** Embeddings: nothing streams; the inputs bound the prompt tokens a node may bill. */
function prepareEmbedding(body: Record<string, unknown>, model: string): PreparedRequest {
  const input = body.input
  if (input == null) throw apiError('missing_required_parameter', 'input is required', { param: 'input' })
  const inputs =
    typeof input === 'string' || (Array.isArray(input) && input.every((x) => typeof x === 'number'))
      ? [input]
      : input
  if (!Array.isArray(inputs))
    throw apiError('invalid_type', 'input must be a string, a list of strings or token ids', {
      param: 'input',
    })
  let bound = 0
  for (const x of inputs) {
    // A text's tokens are at most its bytes, plus what the model adds around it (BOS, EOS).
    if (typeof x === 'string') bound += Buffer.byteLength(x) + 2
    else if (Array.isArray(x)) bound += x.length + 2
    else
      throw apiError('invalid_type', 'input must be a string, a list of strings or token ids', {
        param: 'input',
      })
  }
  return {
    body: { ...body },
    clientWantsUsage: true,
    stream: false,
    maxTokens: null,
    n: 1,
    model,
    hiddenTokensPerChoice: 0,
    promptBound: bound,
  }
}

/**
 * The body to send upstream: the bytes as received when preparing changed nothing (not a stream,
 * or usage already asked for) and they are valid UTF-8, so the next hop reads exactly what this one
 * did; else the prepared body serialised again.
 */
export function upstreamBody(
  bytes: Uint8Array,
  prepared: { stream: boolean; clientWantsUsage: boolean; body: unknown },
): Uint8Array {
  if ((!prepared.stream || prepared.clientWantsUsage) && isUtf8(bytes)) return bytes
  try {
    return Buffer.from(JSON.stringify(prepared.body))
  } catch (err) {
    // JSON.parse takes any depth, JSON.stringify runs out of stack at a few thousand levels.
    if (!(err instanceof RangeError)) throw err
    throw apiError(
      'invalid_value',
      'the request body nests too deeply to pass on (thousands of levels of JSON)',
    )
  }
}
