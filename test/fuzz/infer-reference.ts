import { decodeCanonical } from '../../core/cbor.ts'
import { isPlainObject } from '../../core/guards.ts'
import { InferFrameType as T } from '../../mesh/infer-protocol.ts'
import { inferFrameMaxBytes, inferHeadMaxBytes, inferRequestBodyMaxBytes } from '../../mesh/protocols.ts'

/**
 * /garage/infer/1.0.0 read straight from docs/mesh.md, written apart from mesh/infer-protocol.ts:
 * the oracle the fuzz suite compares the real decoders with. It reads one exchange in one direction
 * from bytes that are all there is (the sender closed after them).
 */

export type Headers = Array<[string, string]>

/** How one exchange ends as a receiver that follows the docs sees it. */
export type ReferenceOutcome =
  /** Broke the grammar (what InferProtocolError names), before any head. */
  | { kind: 'protocol'; reason: string }
  /** The bytes ran out before the head (or, for a request, before END). */
  | { kind: 'truncated' }
  /** An ERROR frame instead of a response head. */
  | { kind: 'remote'; code: string; message: string }
  /** A request that arrived whole; `rest` says whether more bytes followed its END. */
  | { kind: 'request'; method: string; path: string; headers: Headers; body: Uint8Array; rest: number }
  /** A response head, the body that followed, and how the body ended. */
  | {
      kind: 'response'
      status: number
      headers: Headers
      body: Uint8Array
      end: 'end' | 'truncated' | 'protocol_error' | { code: string }
    }

const methodPattern = /^[A-Z]{1,16}$/
const pathPattern = /^\/[\x21-\x7e]*$/
const headerNamePattern = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/
const headerValuePattern = /^[\t\x20-\x7e\x80-\xff]*$/
const errorCodePattern = /^[a-z][a-z0-9_]{0,63}$/
/** The length prefix counts the type byte; 3 LEB128 bytes hold every legal frame. */
const frameMaxLength = 1 + Math.max(inferHeadMaxBytes, inferFrameMaxBytes)
const prefixMaxBytes = 3

class ProtocolViolation extends Error {}

type Frame = { type: number; payload: Uint8Array } | 'more'

/** One frame at `at`, checked by `allowed` as soon as its header is known. */
function readFrame(
  bytes: Uint8Array,
  at: number,
  allowed: (type: number, length: number) => void,
): { frame: Frame; next: number } {
  let length = 0
  let i = 0
  for (;;) {
    if (at + i >= bytes.byteLength) return { frame: 'more', next: at }
    if (i >= prefixMaxBytes) throw new ProtocolViolation('length prefix over 3 bytes')
    const b = bytes[at + i]!
    length += (b & 0x7f) * 2 ** (7 * i)
    i++
    if ((b & 0x80) === 0) {
      if (b === 0 && i > 1) throw new ProtocolViolation('length prefix not minimal')
      break
    }
  }
  if (length === 0) throw new ProtocolViolation('zero length')
  if (length > frameMaxLength) throw new ProtocolViolation('frame over the largest limit')
  if (at + i >= bytes.byteLength) return { frame: 'more', next: at }
  const type = bytes[at + i]!
  allowed(type, length - 1)
  const start = at + i + 1
  if (start + length - 1 > bytes.byteLength) return { frame: 'more', next: at }
  return { frame: { type, payload: bytes.subarray(start, start + length - 1) }, next: start + length - 1 }
}

function exactMap(payload: Uint8Array, keys: string[]): Record<string, unknown> {
  let value: unknown
  try {
    value = decodeCanonical(payload)
  } catch {
    throw new ProtocolViolation('not canonical CBOR')
  }
  if (!isPlainObject(value)) throw new ProtocolViolation('not a map')
  const actual = Object.keys(value).sort()
  if (actual.join(',') !== [...keys].sort().join(',')) throw new ProtocolViolation('wrong keys')
  return value
}

function headersOf(v: unknown): Headers {
  if (!Array.isArray(v)) throw new ProtocolViolation('headers not a list')
  for (const pair of v) {
    if (
      !Array.isArray(pair) ||
      pair.length !== 2 ||
      typeof pair[0] !== 'string' ||
      typeof pair[1] !== 'string' ||
      !headerNamePattern.test(pair[0]) ||
      !headerValuePattern.test(pair[1])
    )
      throw new ProtocolViolation('bad header')
  }
  return v as Headers
}

function errorOf(payload: Uint8Array): { code: string; message: string } {
  const m = exactMap(payload, ['code', 'message'])
  if (typeof m.code !== 'string' || !errorCodePattern.test(m.code)) throw new ProtocolViolation('bad code')
  if (typeof m.message !== 'string') throw new ProtocolViolation('bad message')
  return { code: m.code, message: m.message }
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0))
  let o = 0
  for (const p of parts) {
    out.set(p, o)
    o += p.byteLength
  }
  return out
}

/** The node's side: what the first request in `bytes` is, or why it is refused. */
export function referenceRequest(bytes: Uint8Array): ReferenceOutcome {
  let at = 0
  let state: 'head' | 'body' = 'head'
  let head: { method: string; path: string; headers: Headers } | null = null
  const body: Uint8Array[] = []
  let bodyBytes = 0
  const allowed = (type: number, length: number): void => {
    if (state === 'head' && type === T.RequestHead) {
      if (length > inferHeadMaxBytes) throw new ProtocolViolation('request head over its limit')
      return
    }
    if (state === 'body' && type === T.Data) {
      if (length === 0 || length > inferFrameMaxBytes) throw new ProtocolViolation('bad DATA size')
      if (bodyBytes + length > inferRequestBodyMaxBytes) throw new ProtocolViolation('body over its limit')
      return
    }
    if (state === 'body' && type === T.End) {
      if (length !== 0) throw new ProtocolViolation('END with a payload')
      return
    }
    throw new ProtocolViolation('frame out of order')
  }
  try {
    for (;;) {
      const { frame, next } = readFrame(bytes, at, allowed)
      if (frame === 'more') return { kind: 'truncated' }
      at = next
      if (frame.type === T.RequestHead) {
        const m = exactMap(frame.payload, ['method', 'path', 'headers'])
        if (typeof m.method !== 'string' || !methodPattern.test(m.method))
          throw new ProtocolViolation('method')
        if (typeof m.path !== 'string' || !pathPattern.test(m.path)) throw new ProtocolViolation('path')
        head = { method: m.method, path: m.path, headers: headersOf(m.headers) }
        state = 'body'
      } else if (frame.type === T.Data) {
        body.push(frame.payload)
        bodyBytes += frame.payload.byteLength
      } else {
        return { kind: 'request', ...head!, body: concat(body), rest: bytes.byteLength - at }
      }
    }
  } catch (err) {
    if (err instanceof ProtocolViolation) return { kind: 'protocol', reason: err.message }
    throw err
  }
}

/** The head's side: what the response in `bytes` is, or why it is refused. */
export function referenceResponse(bytes: Uint8Array): ReferenceOutcome {
  let at = 0
  let state: 'head' | 'body' = 'head'
  const allowedBeforeHead = (type: number, length: number): void => {
    if ((type === T.ResponseHead || type === T.Error) && length <= inferHeadMaxBytes) return
    throw new ProtocolViolation('frame out of order or too large before the head')
  }
  let head: { status: number; headers: Headers }
  try {
    const { frame, next } = readFrame(bytes, at, allowedBeforeHead)
    if (frame === 'more') return { kind: 'truncated' }
    at = next
    if (frame.type === T.Error) return { kind: 'remote', ...errorOf(frame.payload) }
    const m = exactMap(frame.payload, ['status', 'headers'])
    const status = m.status
    if (typeof status !== 'number' || !Number.isInteger(status) || status < 200 || status > 599)
      throw new ProtocolViolation('status')
    head = { status, headers: headersOf(m.headers) }
    state = 'body'
  } catch (err) {
    if (err instanceof ProtocolViolation) return { kind: 'protocol', reason: err.message }
    throw err
  }
  const body: Uint8Array[] = []
  const allowedInBody = (type: number, length: number): void => {
    if (type === T.Data && length > 0 && length <= inferFrameMaxBytes) return
    if (type === T.End && length === 0) return
    if (type === T.Error && length <= inferHeadMaxBytes) return
    throw new ProtocolViolation(`frame ${type} of ${length} bytes in the body (state ${state})`)
  }
  const response = (end: 'end' | 'truncated' | 'protocol_error' | { code: string }): ReferenceOutcome => ({
    kind: 'response',
    ...head,
    body: concat(body),
    end,
  })
  try {
    for (;;) {
      const { frame, next } = readFrame(bytes, at, allowedInBody)
      if (frame === 'more') return response('truncated')
      at = next
      if (frame.type === T.Data) body.push(frame.payload)
      else if (frame.type === T.End) return response('end')
      else return response({ code: errorOf(frame.payload).code })
    }
  } catch (err) {
    if (err instanceof ProtocolViolation) return response('protocol_error')
    throw err
  }
}
