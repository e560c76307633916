import { isUtf8 } from 'node:buffer'
import { timingSafeEqual } from 'node:crypto'
import type { IncomingMessage } from 'node:http'
import { ApiError } from '../daemon/engines/openai-errors.ts'

/**
 * HTTP pieces every OpenAI-compatible server in Garage shares (the embedded engine, the regional
 * head, the federation): bounded JSON bodies and constant-time bearer checks.
 */

/** Reads a request body of at most maxBytes: 413 past it (declared or actual), 400 when not JSON. */
export async function readJsonBody(req: IncomingMessage, maxBytes: number): Promise<unknown> {
  return (await readJsonBodyBytes(req, maxBytes)).json
}

/** readJsonBody, with the bytes it parsed (a proxy can pass them on instead of serialising again). */
export async function readJsonBodyBytes(
  req: IncomingMessage,
  maxBytes: number,
): Promise<{ json: unknown; bytes: Buffer }> {
  const declared = Number(req.headers['content-length'] ?? 0)
  if (declared > maxBytes)
    throw new ApiError(413, `the request body is ${declared} bytes; the limit is ${maxBytes}`, {
      code: 'request_too_large',
    })
  const bytes = await readBody(req, maxBytes)
  return { json: parseJson(bytes), bytes }
}

/**
 * The body as it arrives, on the stream's events: an async iterator costs more than the rest of a
 * small request's parsing.
 */
function readBody(req: IncomingMessage, maxBytes: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let size = 0
    let settled = false
    const settle = (err: Error | null): void => {
      if (settled) return
      settled = true
      req.off('data', onData)
      req.off('end', onEnd)
      req.off('error', onError)
      req.off('close', onClose)
      if (err != null) reject(err)
      else resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size))
    }
    const onData = (chunk: Buffer): void => {
      size += chunk.byteLength
      if (size > maxBytes) {
        // Left paused and unread, as leaving a `for await` early left it: the 413 still goes out.
        req.pause()
        settle(
          new ApiError(413, `the request body is over the ${maxBytes}-byte limit`, {
            code: 'request_too_large',
          }),
        )
        return
      }
      chunks.push(chunk)
    }
    const onEnd = (): void => settle(null)
    // A client that leaves or breaks the HTTP framing mid-body made a bad request: a 400, not a 500.
    const onError = (err: Error): void => settle(bodyCutOff(err.message))
    const onClose = (): void => settle(bodyCutOff('the client closed the connection'))
    if (req.readableEnded) return settle(null)
    if (req.destroyed) return onClose()
    req.on('data', onData)
    req.on('end', onEnd)
    req.on('error', onError)
    req.on('close', onClose)
  })
}

function bodyCutOff(why: string): ApiError {
  return new ApiError(400, `the request body ended before it was complete: ${why}`, { code: 'invalid_json' })
}

/** JSON.parse of UTF-8 bytes; 400 `invalid_json` when they are not JSON. */
export function parseJson(bytes: Uint8Array): unknown {
  try {
    return JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8'))
  } catch (err) {
    throw new ApiError(400, `the request body is not valid JSON: ${(err as Error).message}`, {
      code: 'invalid_json',
    })
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
    throw new ApiError(400, 'the request body nests too deeply to pass on (thousands of levels of JSON)', {
      code: 'invalid_value',
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
