import { ApiError } from '../daemon/engines/openai-errors.ts'

/**
 * Every error code an API consumer can get from the federation, with its HTTP status. docs/errors.md
 * lists the same table and a test keeps the two in sync. Codes are stable: never reuse or rename one.
 * Codes a region's head sends (the node, the engine) pass through unchanged and are listed here too.
 */
export const federationErrorCodes = {
  invalid_json: { status: 400, meaning: 'the request body is not valid JSON' },
  invalid_type: { status: 400, meaning: 'a field has the wrong type (the message names it)' },
  missing_required_parameter: {
    status: 400,
    meaning: 'a required field (model, messages, prompt) is missing',
  },
  invalid_value: { status: 400, meaning: 'a field has a value out of range (the message names it)' },
  unsupported_parameter: { status: 400, meaning: 'the engine does not support this parameter' },
  unsupported_value: { status: 400, meaning: 'the engine does not support this value of a parameter' },
  context_length_exceeded: { status: 400, meaning: 'the prompt and max_tokens do not fit the model context' },
  invalid_api_key: { status: 401, meaning: 'no API key, an unknown one, or a revoked one' },
  unauthorized: { status: 401, meaning: 'an admin endpoint without the admin token' },
  not_found: { status: 404, meaning: 'no such endpoint' },
  model_not_found: { status: 404, meaning: 'no region serves this model' },
  method_not_allowed: { status: 405, meaning: 'the endpoint takes another method' },
  request_too_large: { status: 413, meaning: 'the request body is over the limit (4 MiB)' },
  rate_limit_exceeded: {
    status: 429,
    meaning: "the key's requests or tokens per minute, or concurrent requests, are used up; see Retry-After",
  },
  region_overloaded: {
    status: 429,
    meaning: 'every node of the regions tried has a full queue; see Retry-After',
  },
  internal_error: { status: 500, meaning: 'a bug in Garage; the message says where' },
  generation_failed: {
    status: 500,
    meaning: 'the engine failed while generating (passed through from a node)',
  },
  node_failed: { status: 502, meaning: 'the nodes tried failed before answering' },
  node_unreachable: { status: 502, meaning: 'the nodes tried could not be reached' },
  region_unreachable: { status: 502, meaning: 'the regions tried could not be reached' },
  stream_interrupted: {
    status: 502,
    meaning: 'sent as an SSE error event when a stream breaks after its first byte',
  },
  no_capacity: {
    status: 503,
    meaning: 'the model is known but nothing can serve it right now; see Retry-After',
  },
  engine_draining: { status: 503, meaning: 'the engine is draining (passed through from a node)' },
  engine_overloaded: { status: 429, meaning: "the engine's queue is full (passed through from a node)" },
  gateway_timeout: { status: 504, meaning: 'no answer began within the timeout' },
} as const

export type FederationErrorCode = keyof typeof federationErrorCodes

/** An OpenAI-shaped error with a registered code: the status comes from the registry. */
export function federationError(
  code: FederationErrorCode,
  message: string,
  init: { param?: string; headers?: Record<string, string> } = {},
): ApiError {
  return new ApiError(federationErrorCodes[code].status, message, { code, ...init })
}
