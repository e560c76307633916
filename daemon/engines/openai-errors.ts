import type { ServerResponse } from 'node:http'

/** An error as the OpenAI API shapes it: clients (and the official SDK) read `error.message` and `error.code`. */
export interface OpenAiErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null }
}

export class ApiError extends Error {
  readonly status: number
  readonly type: string
  readonly param: string | null
  readonly code: string | null
  readonly headers: Record<string, string>

  constructor(
    status: number,
    message: string,
    init: { type?: string; param?: string; code?: string; headers?: Record<string, string> } = {},
  ) {
    super(message)
    this.name = 'ApiError'
    this.status = status
    this.type =
      init.type ??
      (status === 401
        ? 'authentication_error'
        : status === 429
          ? 'rate_limit_error'
          : status >= 500
            ? 'server_error'
            : 'invalid_request_error')
    this.param = init.param ?? null
    this.code = init.code ?? null
    this.headers = init.headers ?? {}
  }

  body(): OpenAiErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } }
  }
}

export function sendError(res: ServerResponse, err: ApiError): void {
  if (res.headersSent) {
    res.end()
    return
  }
  res
    .writeHead(err.status, { 'content-type': 'application/json', ...err.headers })
    .end(JSON.stringify(err.body()))
}
