/**
 * Garage's one error type and its code registry.
 *
 * - `GarageError`: an expected failure a user can act on. The CLI prints `message` on one line and
 *   exits non-zero; anything that is not a GarageError is treated as a bug. Subclasses are named
 *   after themselves (tests and logs match on `err.name`).
 * - `ApiError`: a GarageError a client sees over HTTP, with a status and a stable `code` from the
 *   registry below. The OpenAI surface renders it as OpenAI does (`openaiErrorBody`), the node's
 *   control API as `{ error: { message, code, field } }` (`controlErrorBody`).
 * - `httpErrorCodes`: every code an HTTP client can get, with its status and the surfaces that send
 *   it; docs/errors.md (surface `openai`) and docs/control-api.md (surface `control`) list the same
 *   tables, and a test keeps them in sync. `wireErrorCodes`: the codes nodes and heads exchange on
 *   /garage/infer/1.0.0 (ERROR frames and stream failures). Codes are stable: never reuse or rename one.
 */

export class GarageError extends Error {
  readonly code: string

  constructor(message: string, code = 'GARAGE_ERROR', options?: ErrorOptions) {
    super(message, options)
    this.name = new.target.name
    this.code = code
  }
}

export type ErrorSurface = 'openai' | 'control'

interface HttpErrorCode {
  status: number
  meaning: string
  surfaces: readonly ErrorSurface[]
}

const openai: readonly ErrorSurface[] = ['openai']
const control: readonly ErrorSurface[] = ['control']
const both: readonly ErrorSurface[] = ['openai', 'control']

export const httpErrorCodes = {
  invalid_json: { status: 400, meaning: 'the request body is not valid JSON', surfaces: both },
  invalid_type: {
    status: 400,
    meaning: 'a field has the wrong type (the message names it)',
    surfaces: openai,
  },
  missing_required_parameter: {
    status: 400,
    meaning: 'a required field (model, messages, prompt) is missing',
    surfaces: openai,
  },
  invalid_value: {
    status: 400,
    meaning: 'a field has a value out of range (the message names it)',
    surfaces: openai,
  },
  unsupported_parameter: {
    status: 400,
    meaning: 'the engine does not support this parameter',
    surfaces: openai,
  },
  unsupported_value: {
    status: 400,
    meaning: 'the engine does not support this value of a parameter',
    surfaces: openai,
  },
  unsupported_content: {
    status: 400,
    meaning: 'a message part the engine cannot read (only text parts are supported)',
    surfaces: openai,
  },
  context_length_exceeded: {
    status: 400,
    meaning: 'the prompt and max_tokens do not fit the model context',
    surfaces: openai,
  },
  invalid_field: {
    status: 400,
    meaning: 'a field or query parameter is wrong; `field` names it',
    surfaces: control,
  },
  unknown_field: {
    status: 400,
    meaning: 'a field the endpoint does not take; `field` names it',
    surfaces: control,
  },
  invalid_api_key: { status: 401, meaning: 'no API key, an unknown one, or a revoked one', surfaces: openai },
  unauthorized: {
    status: 401,
    meaning: 'an endpoint that needs a token (admin, control) without the right one',
    surfaces: both,
  },
  host_not_allowed: {
    status: 403,
    meaning: 'the Host header is not a loopback name (a DNS rebinding guard)',
    surfaces: control,
  },
  not_found: { status: 404, meaning: 'no such endpoint', surfaces: both },
  model_not_found: { status: 404, meaning: 'no region serves this model', surfaces: openai },
  method_not_allowed: { status: 405, meaning: 'the endpoint takes another method', surfaces: both },
  conflict: {
    status: 409,
    meaning: 'the daemon cannot do that now (the message says why)',
    surfaces: control,
  },
  request_too_large: {
    status: 413,
    meaning: "the request body is over the endpoint's limit",
    surfaces: both,
  },
  rate_limit_exceeded: {
    status: 429,
    meaning: "the key's requests or tokens per minute, or concurrent requests, are used up; see Retry-After",
    surfaces: openai,
  },
  region_overloaded: {
    status: 429,
    meaning: 'every node of the regions tried has a full queue; see Retry-After',
    surfaces: openai,
  },
  engine_overloaded: {
    status: 429,
    meaning: "the engine's queue is full (passed through from a node)",
    surfaces: openai,
  },
  too_many_event_streams: {
    status: 429,
    meaning: 'too many /events streams are open at once',
    surfaces: control,
  },
  internal_error: { status: 500, meaning: 'a bug in Garage; the message says where', surfaces: both },
  generation_failed: {
    status: 500,
    meaning: 'the engine failed while generating (passed through from a node)',
    surfaces: openai,
  },
  node_failed: { status: 502, meaning: 'the nodes tried failed before answering', surfaces: openai },
  node_unreachable: { status: 502, meaning: 'the nodes tried could not be reached', surfaces: openai },
  region_unreachable: { status: 502, meaning: 'the regions tried could not be reached', surfaces: openai },
  stream_interrupted: {
    status: 502,
    meaning: 'sent as an SSE error event when a stream breaks after its first byte',
    surfaces: openai,
  },
  no_capacity: {
    status: 503,
    meaning: 'the model is known but nothing can serve it right now; see Retry-After',
    surfaces: openai,
  },
  store_unavailable: {
    status: 503,
    meaning:
      "the federation's database (PostgreSQL) cannot be reached; see Retry-After (usage of answers under way is kept and written when it is back)",
    surfaces: openai,
  },
  engine_draining: {
    status: 503,
    meaning: 'the engine is draining (passed through from a node)',
    surfaces: openai,
  },
  gateway_timeout: { status: 504, meaning: 'no answer began within the timeout', surfaces: openai },
  daemon_timeout: {
    status: 504,
    meaning: 'the daemon did not finish the operation in time',
    surfaces: control,
  },
} as const satisfies Record<string, HttpErrorCode>

export type HttpErrorCodeName = keyof typeof httpErrorCodes

/** The registered codes one surface sends, with their statuses (docs tables are checked against it). */
export function errorCodesOf(surface: ErrorSurface): Map<string, { status: number; meaning: string }> {
  const out = new Map<string, { status: number; meaning: string }>()
  for (const [code, info] of Object.entries(httpErrorCodes) as Array<[string, HttpErrorCode]>) {
    if (info.surfaces.includes(surface)) out.set(code, { status: info.status, meaning: info.meaning })
  }
  return out
}

/**
 * Codes on /garage/infer/1.0.0: a node's ERROR frame (`engine_unavailable`, `engine_error`,
 * `internal_error`) and the ways a stream fails that InferStreamError carries. Not sent to HTTP
 * clients: the head turns them into `node_failed` or `stream_interrupted`.
 */
export const wireErrorCodes = {
  engine_unavailable: 'no engine is serving on the node, or it did not answer',
  engine_error: 'the engine failed mid-response',
  internal_error: 'the handler failed (a bug)',
  reset: 'the other side reset the stream',
  truncated: 'the stream closed before END',
  idle_timeout: 'nothing arrived within the idle timeout',
  protocol_error: 'a frame broke the grammar',
  cancelled: 'the asker cancelled',
  stopped: 'the server stopped',
  ticket_invalid: "a direct-path request's ticket is missing, forged, expired, or for another node or holder",
  lease_full: "a direct-path lease's slots are all in use at the node",
} as const

export type WireErrorCode = keyof typeof wireErrorCodes

export interface ApiErrorInit {
  type?: string
  /** The field at fault (`param` in OpenAI's shape, `field` in the control API's). */
  param?: string
  /** Per-field messages (the control API's settings validation). */
  fields?: Record<string, string>
  code?: string
  headers?: Record<string, string>
}

/** OpenAI's error shape: clients (and the official SDK) read `error.message` and `error.code`. */
export interface OpenAiErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null }
}

function typeForStatus(status: number): string {
  if (status === 401) return 'authentication_error'
  if (status === 429) return 'rate_limit_error'
  if (status >= 500) return 'server_error'
  return 'invalid_request_error'
}

/** An error an HTTP client sees. Build registered ones with `apiError(code, ...)`. */
export class ApiError extends GarageError {
  readonly status: number
  readonly type: string
  readonly param: string | null
  readonly fields: Record<string, string> | null
  readonly headers: Record<string, string>

  /** `code` is optional only for errors passed on from upstream that came without one. */
  constructor(status: number, message: string, init: ApiErrorInit = {}) {
    super(message, init.code ?? '')
    this.status = status
    this.type = init.type ?? typeForStatus(status)
    this.param = init.param ?? null
    this.fields = init.fields ?? null
    this.headers = init.headers ?? {}
  }

  /** OpenAI's shape. */
  body(): OpenAiErrorBody {
    return {
      error: { message: this.message, type: this.type, param: this.param, code: this.code || null },
    }
  }
}

/** A registered error: the status comes from the registry, so a code and its status never drift. */
export function apiError(
  code: HttpErrorCodeName,
  message: string,
  init: Omit<ApiErrorInit, 'code'> = {},
): ApiError {
  return new ApiError(httpErrorCodes[code].status, message, { ...init, code })
}

/** The control API's shape: `{ error: { message, code, field?, fields? } }`. */
export function controlErrorBody(err: ApiError): {
  error: { message: string; code: string; field?: string; fields?: Record<string, string> }
} {
  return {
    error: {
      message: err.message,
      code: err.code,
      ...(err.param != null ? { field: err.param } : {}),
      ...(err.fields != null ? { fields: err.fields } : {}),
    },
  }
}

/** An unexpected failure as the 500 a client gets (the caller logs the original). */
export function internalError(err: unknown): ApiError {
  return apiError('internal_error', `internal error: ${(err as Error)?.message ?? String(err)}`)
}
