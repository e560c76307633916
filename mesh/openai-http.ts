import { timingSafeEqual } from 'node:crypto'
import type { IncomingMessage } from 'node:http'
import { ApiError } from '../daemon/engines/openai-errors.ts'

/**
 * HTTP pieces every OpenAI-compatible server in Garage shares (the embedded engine, the regional
 * head, the federation): bounded JSON bodies and constant-time bearer checks.
 */

/** Reads a request body of at most maxBytes: 413 past it (declared or actual), 400 when not JSON. */
export async function readJsonBody(req: IncomingMessage, maxBytes: number): Promise<unknown> {
  const declared = Number(req.headers['content-length'] ?? 0)
  if (declared > maxBytes)
    throw new ApiError(413, `the request body is ${declared} bytes; the limit is ${maxBytes}`, {
      code: 'request_too_large',
    })
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of req) {
    size += (chunk as Buffer).byteLength
    if (size > maxBytes)
      throw new ApiError(413, `the request body is over the ${maxBytes}-byte limit`, {
        code: 'request_too_large',
      })
    chunks.push(chunk as Buffer)
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'))
  } catch (err) {
    throw new ApiError(400, `the request body is not valid JSON: ${(err as Error).message}`, {
      code: 'invalid_json',
    })
  }
}

/** True when the Authorization header is `Bearer <key>`; compares in constant time. */
export function bearerMatches(header: string | undefined, key: string): boolean {
  const m = /^Bearer (.+)$/.exec(header ?? '')
  if (m?.[1] == null) return false
  const a = Buffer.from(m[1])
  const b = Buffer.from(key)
  return a.length === b.length && timingSafeEqual(a, b)
}
