import type { Connection, PeerId, Stream, StreamCloseEvent, StreamMessageEvent } from '@libp2p/interface'
import { isMultiaddr, type Multiaddr } from '@multiformats/multiaddr'
import { concatBytes } from '../core/bytes.ts'
import { decodeCanonical, encodeCanonical } from '../core/cbor.ts'
import { isPlainObject } from '../core/guards.ts'
import type { MeshNode } from './node.ts'
import {
  INFER_PROTOCOL,
  inferConnectTimeoutMs,
  inferFirstByteTimeoutMs,
  inferFrameMaxBytes,
  inferHeadMaxBytes,
  inferIdleStreamsPerPeer,
  inferIdleTimeoutMs,
  inferKeepAliveMs,
  inferMaxInboundStreams,
  inferMaxOutboundStreams,
  inferRequestBodyMaxBytes,
  inferResponseBufferBytes,
  inferStreamReadBufferMaxBytes,
} from './protocols.ts'

/**
 * `/garage/infer/1.0.0`: HTTP requests and their streamed responses, one exchange at a time per
 * stream. Both directions are frames `varint(1 + payload length) || type || payload`:
 *
 *   head -> node:  REQUEST_HEAD  DATA*  END
 *   node -> head:  RESPONSE_HEAD DATA* (END | ERROR)   or   ERROR
 *
 * After a clean exchange the head may send the next request on the same stream (keep-alive) or close
 * it. Cancelling is a stream reset, from either side. docs/mesh.md has the full grammar.
 */

export const InferFrameType = {
  RequestHead: 0x01,
  Data: 0x02,
  End: 0x03,
  ResponseHead: 0x04,
  Error: 0x05,
} as const

/** A request the head cannot send as given (refused before dialling). */
export class InferRequestInvalidError extends Error {
  override name = 'InferRequestInvalidError'
}

/** Dialling the node or negotiating the protocol failed or timed out. */
export class InferConnectError extends Error {
  override name = 'InferConnectError'
}

/** No response head within the first-byte timeout. */
export class InferFirstByteTimeoutError extends Error {
  override name = 'InferFirstByteTimeoutError'
}

/** The peer broke the frame grammar: unknown type, wrong order, oversized frame or body, bad CBOR. */
export class InferProtocolError extends Error {
  override name = 'InferProtocolError'
}

/** The node answered with an ERROR frame instead of a response head. */
export class InferRemoteError extends Error {
  override name = 'InferRemoteError'
  readonly code: string

  constructor(code: string, message: string) {
    super(message)
    this.code = code
  }
}

/**
 * A stream that failed: `code` is the node's ERROR code, or one of `reset` (the other side reset it),
 * `truncated` (closed before END), `idle_timeout`, `protocol_error`, `cancelled`, `stopped`.
 */
export class InferStreamError extends Error {
  override name = 'InferStreamError'
  readonly code: string

  constructor(code: string, message: string, options?: ErrorOptions) {
    super(message, options)
    this.code = code
  }
}

/** The remote peer is not on the server's allow-list. */
export class InferPeerNotAllowedError extends Error {
  override name = 'InferPeerNotAllowedError'
}

/** A server handler used its reply out of order or with values HTTP cannot carry. */
export class InferReplyError extends Error {
  override name = 'InferReplyError'
}

export interface InferRequest {
  method: string
  path: string
  headers: Array<[string, string]>
  body?: Uint8Array
}

export interface InferResponse {
  status: number
  headers: Array<[string, string]>
  /**
   * Response body chunks as they arrive; iterate it once. Throws InferStreamError (the ERROR frame's
   * code, or `reset`, `truncated`, `idle_timeout`, `protocol_error`) if the stream fails mid-body, or
   * the signal's reason once it aborts. Leaving the loop early resets the stream.
   */
  body: AsyncIterable<Uint8Array>
}

export interface SendInferOptions {
  /** Aborting resets the stream at any time (the node cancels); the call or the body throws its reason. */
  signal?: AbortSignal
  connectTimeoutMs?: number
  firstByteTimeoutMs?: number
  idleTimeoutMs?: number
}

export interface InferServerRequest {
  method: string
  path: string
  headers: Array<[string, string]>
  body: Uint8Array
}

/** How a handler answers one request; await each call before the next. */
export interface InferReply {
  /** Sends the response head, with the first body bytes in the same write when they are already here. */
  head(status: number, headers: Array<[string, string]>, first?: Uint8Array): Promise<void>
  /** Resolves when the stream can take more (backpressure); rejects once the stream is gone. */
  data(chunk: Uint8Array): Promise<void>
  end(): Promise<void>
  /** A whole response in one write: head, body and END. */
  respond(status: number, headers: Array<[string, string]>, body?: Uint8Array): Promise<void>
  /** Before or after the head: the request failed at this node. Ends the exchange. */
  error(code: string, message: string): Promise<void>
  /** True once head(), respond() or error() has been called. */
  readonly started: boolean
}

export interface InferServerInit {
  /** Called with the remote peer when it opens a stream and at each request; false resets the stream. */
  allow(peer: PeerId): boolean
  /**
   * Serves one request and answers through `reply`. `signal` aborts (with an InferStreamError) when
   * the head resets, stalls past the idle timeout, breaks the grammar, or the server stops.
   */
  handle(request: InferServerRequest, reply: InferReply, signal: AbortSignal, peer: PeerId): Promise<void>
  /** A stream refused before its handler ran: not allowed, bad frames, a stalled request. */
  onRejected?(peer: PeerId, reason: Error): void
  /** The handler threw (the head gets an ERROR `internal_error`). */
  onError?(peer: PeerId, err: Error): void
  /** Default inferIdleTimeoutMs: between request frames, between requests, and while the head reads nothing. */
  idleTimeoutMs?: number
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

const errorCodePattern = /^[a-z][a-z0-9_]{0,63}$/
const methodPattern = /^[A-Z]{1,16}$/
const pathPattern = /^\/[\x21-\x7e]*$/
const headerNamePattern = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/
// What node:http accepts in a header value.
const headerValuePattern = /^[\t\x20-\x7e\x80-\xff]*$/
/** Error messages are cut to this many characters before they are sent. */
const errorMessageMaxChars = 1024

const frameMaxLength = 1 + Math.max(inferHeadMaxBytes, inferFrameMaxBytes)
const varintMaxBytes = Math.ceil(Math.log2(frameMaxLength + 1) / 7)

function varintLength(n: number): number {
  return n < 0x80 ? 1 : n < 0x4000 ? 2 : n < 0x200000 ? 3 : 4
}

type Frame = [type: number, payload?: Uint8Array]

/** Appends DATA frames for `chunk`, cut at inferFrameMaxBytes. */
function pushData(frames: Frame[], chunk: Uint8Array): Frame[] {
  if (chunk.byteLength <= inferFrameMaxBytes) {
    if (chunk.byteLength > 0) frames.push([InferFrameType.Data, chunk])
    return frames
  }
  for (let offset = 0; offset < chunk.byteLength; offset += inferFrameMaxBytes) {
    frames.push([InferFrameType.Data, chunk.subarray(offset, offset + inferFrameMaxBytes)])
  }
  return frames
}

/** Frames laid out in one buffer: one write, so yamux and noise each see one message. */
export function encodeInferFrames(frames: Frame[]): Uint8Array {
  let total = 0
  for (const [, payload] of frames) {
    const length = payload?.byteLength ?? 0
    total += varintLength(length + 1) + 1 + length
  }
  const out = new Uint8Array(total)
  let o = 0
  for (const [type, payload] of frames) {
    const length = payload?.byteLength ?? 0
    let n = length + 1
    while (n >= 0x80) {
      out[o++] = (n & 0x7f) | 0x80
      n >>>= 7
    }
    out[o++] = n
    out[o++] = type
    if (payload != null) {
      out.set(payload, o)
      o += length
    }
  }
  return out
}

export function encodeInferFrame(type: number, payload?: Uint8Array): Uint8Array {
  return encodeInferFrames([[type, payload]])
}

function frameName(type: number): string {
  for (const [name, code] of Object.entries(InferFrameType)) if (code === type) return name
  return `0x${type.toString(16).padStart(2, '0')}`
}

/**
 * Splits the incoming byte stream into frames. `check` sees each frame's type and payload length as
 * soon as its header arrives, so an oversized or out-of-order frame is refused before it is buffered.
 * A payload inside one received chunk is handed on as a view, without a copy.
 */
class FrameDecoder {
  private readonly chunks: Uint8Array[] = []
  /** Read position in chunks[0]. */
  private offset = 0
  private bytes = 0
  private headerLength = -1
  private payloadLength = 0
  private type = 0
  private readonly check: (type: number, payloadLength: number) => void
  private readonly onFrame: (type: number, payload: Uint8Array) => boolean

  constructor(
    check: (type: number, payloadLength: number) => void,
    onFrame: (type: number, payload: Uint8Array) => boolean,
  ) {
    this.check = check
    this.onFrame = onFrame
  }

  get buffered(): number {
    return this.bytes
  }

  /** Throws InferProtocolError on a malformed header. Stops when onFrame returns false. */
  feed(data: Uint8Array | Iterable<Uint8Array>): void {
    if (data instanceof Uint8Array) this.append(data)
    else for (const chunk of data) this.append(chunk)
    while (true) {
      if (this.headerLength < 0 && !this.readHeader()) return
      if (this.bytes < this.headerLength + this.payloadLength) return
      this.skip(this.headerLength)
      this.headerLength = -1
      if (!this.onFrame(this.type, this.take(this.payloadLength))) return
    }
  }

  private append(chunk: Uint8Array): void {
    if (chunk.byteLength === 0) return
    this.chunks.push(chunk)
    this.bytes += chunk.byteLength
  }

  private byteAt(index: number): number {
    let i = index + this.offset
    for (const c of this.chunks) {
      if (i < c.byteLength) return c[i]!
      i -= c.byteLength
    }
    throw new RangeError('read past the buffered bytes')
  }

  private advance(chunk: Uint8Array, n: number): void {
    this.offset += n
    this.bytes -= n
    if (this.offset === chunk.byteLength) {
      this.chunks.shift()
      this.offset = 0
    }
  }

  private skip(n: number): void {
    while (n > 0) {
      const c = this.chunks[0]!
      const k = Math.min(c.byteLength - this.offset, n)
      this.advance(c, k)
      n -= k
    }
  }

  private take(n: number): Uint8Array {
    if (n === 0) return new Uint8Array(0)
    const first = this.chunks[0]!
    if (first.byteLength - this.offset >= n) {
      const view = first.subarray(this.offset, this.offset + n)
      this.advance(first, n)
      return view
    }
    const out = new Uint8Array(n)
    let filled = 0
    while (filled < n) {
      const c = this.chunks[0]!
      const k = Math.min(c.byteLength - this.offset, n - filled)
      out.set(c.subarray(this.offset, this.offset + k), filled)
      filled += k
      this.advance(c, k)
    }
    return out
  }

  private readHeader(): boolean {
    const available = this.bytes
    let length = 0
    let i = 0
    while (true) {
      if (i >= available) return false
      if (i >= varintMaxBytes) throw new InferProtocolError('frame length prefix is too long')
      const b = this.byteAt(i)
      length += (b & 0x7f) * 2 ** (7 * i)
      i++
      if ((b & 0x80) === 0) {
        if (b === 0 && i > 1) throw new InferProtocolError('frame length prefix is not minimal')
        break
      }
    }
    if (length === 0) throw new InferProtocolError('empty frame: no type byte')
    if (length > frameMaxLength)
      throw new InferProtocolError(`frame of ${length} bytes is over ${frameMaxLength}`)
    if (i >= available) return false
    const type = this.byteAt(i)
    this.check(type, length - 1)
    this.type = type
    this.payloadLength = length - 1
    this.headerLength = i + 1
    return true
  }
}

function checkHeaders(value: unknown): Array<[string, string]> {
  if (!Array.isArray(value)) throw new InferProtocolError('headers must be an array')
  for (const pair of value) {
    if (
      !Array.isArray(pair) ||
      pair.length !== 2 ||
      typeof pair[0] !== 'string' ||
      typeof pair[1] !== 'string' ||
      !headerNamePattern.test(pair[0]) ||
      !headerValuePattern.test(pair[1])
    ) {
      throw new InferProtocolError('each header must be [token name, value without CR, LF or NUL]')
    }
  }
  return value as Array<[string, string]>
}

// The request and response heads are encoded and read here directly: a generic codec (and the
// re-encoding that proves its input canonical) cost more than the rest of a hop's framing. The bytes
// are exactly what encodeCanonical writes (map keys sorted by length, then bytewise; shortest heads).
// Reading accepts only that form, with ASCII text; anything else goes to the generic decoder, which
// accepts or names the fault as before.

const cborMap = 5
const cborArray = 4
const cborText = 3
const cborUint = 0

function cborKey(name: string): Uint8Array {
  return Uint8Array.from([(cborText << 5) | name.length, ...Buffer.from(name, 'latin1')])
}
const keyPath = cborKey('path')
const keyMethod = cborKey('method')
const keyStatus = cborKey('status')
const keyHeaders = cborKey('headers')

function cborHeadLength(n: number): number {
  return n < 24 ? 1 : n < 0x100 ? 2 : n < 0x10000 ? 3 : 5
}

function writeCborHead(out: Buffer, o: number, major: number, n: number): number {
  const m = major << 5
  if (n < 24) {
    out[o] = m | n
    return o + 1
  }
  if (n < 0x100) {
    out[o] = m | 24
    out[o + 1] = n
    return o + 2
  }
  if (n < 0x10000) {
    out[o] = m | 25
    out.writeUInt16BE(n, o + 1)
    return o + 3
  }
  out[o] = m | 26
  out.writeUInt32BE(n, o + 1)
  return o + 5
}

/** Sizes the texts of a head; `sizes` gets each text's UTF-8 length in order. */
function textSize(text: string, sizes: number[]): number {
  const n = Buffer.byteLength(text, 'utf8')
  sizes.push(n)
  return cborHeadLength(n) + n
}

function headersSize(headers: Array<[string, string]>, sizes: number[]): number {
  let size = cborHeadLength(headers.length)
  for (const [name, value] of headers) size += 1 + textSize(name, sizes) + textSize(value, sizes)
  return size
}

class HeadWriter {
  readonly out: Buffer
  o = 0
  private next = 0
  private readonly sizes: number[]

  constructor(size: number, sizes: number[]) {
    this.out = Buffer.allocUnsafe(size)
    this.sizes = sizes
  }

  raw(bytes: Uint8Array): void {
    this.out.set(bytes, this.o)
    this.o += bytes.byteLength
  }

  head(major: number, n: number): void {
    this.o = writeCborHead(this.out, this.o, major, n)
  }

  text(text: string): void {
    const n = this.sizes[this.next++]!
    this.head(cborText, n)
    this.o += this.out.write(text, this.o, n, 'utf8')
  }

  headers(headers: Array<[string, string]>): void {
    this.head(cborArray, headers.length)
    for (const [name, value] of headers) {
      this.head(cborArray, 2)
      this.text(name)
      this.text(value)
    }
  }
}

/** encodeCanonical({ method, path, headers }), for checked fields. */
function encodeRequestHeadCbor(method: string, path: string, headers: Array<[string, string]>): Uint8Array {
  const sizes: number[] = []
  const size =
    1 +
    keyPath.byteLength +
    textSize(path, sizes) +
    keyMethod.byteLength +
    textSize(method, sizes) +
    keyHeaders.byteLength +
    headersSize(headers, sizes)
  const w = new HeadWriter(size, sizes)
  w.head(cborMap, 3)
  w.raw(keyPath)
  w.text(path)
  w.raw(keyMethod)
  w.text(method)
  w.raw(keyHeaders)
  w.headers(headers)
  return w.out
}

/** encodeCanonical({ status, headers }), for checked fields. */
function encodeResponseHeadCbor(status: number, headers: Array<[string, string]>): Uint8Array {
  const sizes: number[] = []
  const size =
    1 + keyStatus.byteLength + cborHeadLength(status) + keyHeaders.byteLength + headersSize(headers, sizes)
  const w = new HeadWriter(size, sizes)
  w.head(cborMap, 2)
  w.raw(keyStatus)
  w.head(cborUint, status)
  w.raw(keyHeaders)
  w.headers(headers)
  return w.out
}

/** Reads one canonical head map; every method answers null (or -1) for what it does not expect. */
class HeadReader {
  private o = 0
  private readonly bytes: Buffer

  constructor(payload: Uint8Array) {
    this.bytes = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength)
  }

  get done(): boolean {
    return this.o === this.bytes.byteLength
  }

  /** The argument of a head of `major`, only in its shortest form; -1 otherwise. */
  head(major: number): number {
    const b = this.bytes
    const o = this.o
    if (o >= b.byteLength || b[o]! >> 5 !== major) return -1
    const info = b[o]! & 31
    let n: number
    let length: number
    if (info < 24) {
      n = info
      length = 1
    } else if (info === 24 && o + 2 <= b.byteLength) {
      n = b[o + 1]!
      length = n < 24 ? -1 : 2
    } else if (info === 25 && o + 3 <= b.byteLength) {
      n = b.readUInt16BE(o + 1)
      length = n < 0x100 ? -1 : 3
    } else if (info === 26 && o + 5 <= b.byteLength) {
      n = b.readUInt32BE(o + 1)
      length = n < 0x10000 ? -1 : 5
    } else return -1
    if (length < 0) return -1
    this.o = o + length
    return n
  }

  key(key: Uint8Array): boolean {
    const b = this.bytes
    if (this.o + key.byteLength > b.byteLength) return false
    for (let i = 0; i < key.byteLength; i++) if (b[this.o + i] !== key[i]) return false
    this.o += key.byteLength
    return true
  }

  /** ASCII text; other text is left to the generic decoder. */
  ascii(): string | null {
    const n = this.head(cborText)
    const start = this.o
    const end = start + n
    if (n < 0 || end > this.bytes.byteLength) return null
    for (let i = start; i < end; i++) if (this.bytes[i]! >= 0x80) return null
    this.o = end
    return this.bytes.toString('latin1', start, end)
  }

  headers(): Array<[string, string]> | null {
    const count = this.head(cborArray)
    if (count < 0 || count > this.bytes.byteLength) return null
    const headers: Array<[string, string]> = []
    for (let i = 0; i < count; i++) {
      if (this.head(cborArray) !== 2) return null
      const name = this.ascii()
      if (name == null) return null
      const value = this.ascii()
      if (value == null) return null
      headers.push([name, value])
    }
    return headers
  }
}

function readRequestHead(payload: Uint8Array): { method: string; path: string; headers: unknown } | null {
  const r = new HeadReader(payload)
  if (r.head(cborMap) !== 3 || !r.key(keyPath)) return null
  const path = r.ascii()
  if (path == null || !r.key(keyMethod)) return null
  const method = r.ascii()
  if (method == null || !r.key(keyHeaders)) return null
  const headers = r.headers()
  return headers != null && r.done ? { method, path, headers } : null
}

function readResponseHead(payload: Uint8Array): { status: number; headers: unknown } | null {
  const r = new HeadReader(payload)
  if (r.head(cborMap) !== 2 || !r.key(keyStatus)) return null
  const status = r.head(cborUint)
  if (status < 0 || !r.key(keyHeaders)) return null
  const headers = r.headers()
  return headers != null && r.done ? { status, headers } : null
}

function decodeMap(payload: Uint8Array, keys: string[], what: string): Record<string, unknown> {
  let value: unknown
  try {
    value = decodeCanonical(payload)
  } catch (err) {
    throw new InferProtocolError(`${what}: ${(err as Error).message}`, { cause: err })
  }
  if (!isPlainObject(value)) throw new InferProtocolError(`${what} must be a CBOR map`)
  const actual = Object.keys(value)
  if (actual.length !== keys.length || !keys.every((k) => Object.hasOwn(value, k))) {
    throw new InferProtocolError(`${what} must be the map { ${keys.join(', ')} }`)
  }
  return value
}

function checkRequestHead(method: unknown, path: unknown, headers: unknown): InferRequest {
  if (typeof method !== 'string' || !methodPattern.test(method)) {
    throw new InferProtocolError('method must be 1-16 uppercase letters')
  }
  if (typeof path !== 'string' || !pathPattern.test(path)) {
    throw new InferProtocolError('path must start with / and hold only visible ASCII')
  }
  return { method, path, headers: checkHeaders(headers) }
}

function decodeRequestHead(payload: Uint8Array): InferRequest {
  const map = readRequestHead(payload) ?? decodeMap(payload, ['method', 'path', 'headers'], 'request head')
  return checkRequestHead(map.method, map.path, map.headers)
}

function checkStatus(status: unknown): number {
  if (typeof status !== 'number' || !Number.isInteger(status) || status < 200 || status > 599) {
    throw new InferProtocolError('status must be an integer from 200 to 599')
  }
  return status
}

function decodeResponseHead(payload: Uint8Array): { status: number; headers: Array<[string, string]> } {
  const map = readResponseHead(payload) ?? decodeMap(payload, ['status', 'headers'], 'response head')
  return { status: checkStatus(map.status), headers: checkHeaders(map.headers) }
}

function decodeError(payload: Uint8Array): { code: string; message: string } {
  const map = decodeMap(payload, ['code', 'message'], 'error')
  if (typeof map.code !== 'string' || !errorCodePattern.test(map.code)) {
    throw new InferProtocolError('error code must be 1-64 characters of a-z, 0-9 and _')
  }
  if (typeof map.message !== 'string') throw new InferProtocolError('error message must be text')
  return { code: map.code, message: map.message }
}

/** The whole request as one buffer of frames: REQUEST_HEAD, DATA..., END. */
function encodeRequest(request: InferRequest): Uint8Array {
  try {
    checkRequestHead(request.method, request.path, request.headers)
  } catch (err) {
    throw new InferRequestInvalidError((err as Error).message)
  }
  const bodyBytes = request.body?.byteLength ?? 0
  if (bodyBytes > inferRequestBodyMaxBytes) {
    throw new InferRequestInvalidError(
      `request body of ${bodyBytes} bytes is over ${inferRequestBodyMaxBytes}`,
    )
  }
  const head = encodeRequestHeadCbor(request.method, request.path, request.headers)
  if (head.byteLength > inferHeadMaxBytes) {
    throw new InferRequestInvalidError(
      `request head of ${head.byteLength} bytes is over ${inferHeadMaxBytes}`,
    )
  }
  const frames: Frame[] = [[InferFrameType.RequestHead, head]]
  if (request.body != null) pushData(frames, request.body)
  frames.push([InferFrameType.End])
  return encodeInferFrames(frames)
}

// ---------------------------------------------------------------------------------------------
// Stream helpers
// ---------------------------------------------------------------------------------------------

interface Deferred<T> {
  promise: Promise<T>
  resolve: (value: T) => void
  reject: (err: Error) => void
}

function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void
  let reject!: (err: Error) => void
  const promise = new Promise<T>((res, rej) => {
    resolve = res
    reject = rej
  })
  return { promise, resolve, reject }
}

/** Resolves on 'drain'; rejects when the stream closes first. (stream.onDrain() reuses a settled promise.) */
function waitForDrain(stream: Stream): Promise<void> {
  if (!stream.writableNeedsDrain) return Promise.resolve()
  return new Promise((resolve, reject) => {
    const onDrain = (): void => {
      stream.removeEventListener('close', onClose)
      resolve()
    }
    const onClose = (evt: StreamCloseEvent): void => {
      stream.removeEventListener('drain', onDrain)
      reject(new InferStreamError('reset', 'the stream closed while waiting to write', { cause: evt.error }))
    }
    stream.addEventListener('drain', onDrain, { once: true })
    stream.addEventListener('close', onClose, { once: true })
  })
}

/** Open both ways with nothing unread or unsent: fit to carry the next exchange. */
function reusable(stream: Stream): boolean {
  return (
    stream.status === 'open' &&
    stream.writeStatus === 'writable' &&
    stream.remoteWriteStatus === 'writable' &&
    stream.readStatus === 'readable' &&
    stream.readBufferLength === 0 &&
    stream.writeBufferLength === 0
  )
}

function closeQuietly(stream: Stream): void {
  stream.close().catch((err: Error) => stream.abort(err))
}

function abortReason(signal: AbortSignal): Error {
  const reason: unknown = signal.reason
  return reason instanceof Error ? reason : new InferStreamError('cancelled', 'the request was cancelled')
}

// ---------------------------------------------------------------------------------------------
// Head side
// ---------------------------------------------------------------------------------------------

/**
 * The head's end of one stream, across the exchanges it carries: its listeners are added once and
 * hand each event to the exchange in progress, or, while the stream waits in the pool, retire it.
 */
class InferChannel {
  readonly stream: Stream
  /** The exchange in progress. */
  call: InferCall | null = null
  /** Set while the stream waits in the pool. */
  idle: { pool: InferStreamPool; peer: string; since: number } | null = null

  constructor(stream: Stream) {
    this.stream = stream
    stream.addEventListener('message', this.onMessage)
    stream.addEventListener('end', this.onEnd)
    stream.addEventListener('close', this.onClose)
    stream.addEventListener('remoteCloseWrite', this.onRemoteCloseWrite)
  }

  private readonly onMessage = (evt: StreamMessageEvent): void => {
    if (this.call != null) {
      this.call.onMessage(evt)
    } else if (this.idle != null) {
      // Nothing may arrive between exchanges.
      this.idle.pool.remove(this)
      this.stream.abort(new InferProtocolError('data on an idle stream'))
    }
  }

  private readonly onEnd = (): void => {
    this.call?.onEnd()
  }

  private readonly onClose = (evt: StreamCloseEvent): void => {
    if (this.call != null) this.call.onClose(evt)
    else this.idle?.pool.remove(this)
  }

  private readonly onRemoteCloseWrite = (): void => {
    // A node that closes its side takes the stream out of the pool.
    if (this.call != null || this.idle == null) return
    this.idle.pool.remove(this)
    closeQuietly(this.stream)
  }
}

/** Finished streams per node, kept for the next request: saves the stream open and protocol negotiation. */
class InferStreamPool {
  private readonly idle = new Map<string, InferChannel[]>()
  private sweeper: NodeJS.Timeout | null = null

  acquire(peer: string): InferChannel | null {
    const list = this.idle.get(peer)
    while (list != null && list.length > 0) {
      const channel = list.pop()!
      channel.idle = null
      if (reusable(channel.stream)) return channel
      closeQuietly(channel.stream)
    }
    return null
  }

  release(peer: string, channel: InferChannel): void {
    let list = this.idle.get(peer)
    if (list == null) {
      list = []
      this.idle.set(peer, list)
    }
    if (list.length >= inferIdleStreamsPerPeer || !reusable(channel.stream)) {
      closeQuietly(channel.stream)
      return
    }
    channel.idle = { pool: this, peer, since: Date.now() }
    list.push(channel)
    this.sweeper ??= setInterval(this.sweep, inferKeepAliveMs / 2).unref()
  }

  remove(channel: InferChannel): void {
    const peer = channel.idle?.peer
    channel.idle = null
    const list = peer != null ? this.idle.get(peer) : undefined
    const i = list?.indexOf(channel) ?? -1
    if (i >= 0) list!.splice(i, 1)
  }

  private readonly sweep = (): void => {
    const now = Date.now()
    for (const [peer, list] of this.idle) {
      for (const channel of list.filter((c) => now - (c.idle?.since ?? now) >= inferKeepAliveMs)) {
        channel.idle = null
        list.splice(list.indexOf(channel), 1)
        closeQuietly(channel.stream)
      }
      if (list.length === 0) this.idle.delete(peer)
    }
    if (this.idle.size === 0 && this.sweeper != null) {
      clearInterval(this.sweeper)
      this.sweeper = null
    }
  }
}

const pools = new WeakMap<MeshNode, InferStreamPool>()

function poolOf(node: MeshNode): InferStreamPool {
  let pool = pools.get(node)
  if (pool == null) {
    pool = new InferStreamPool()
    pools.set(node, pool)
  }
  return pool
}

type CallState = 'head' | 'body' | 'done' | 'failed'
type Release = (channel: InferChannel) => void

/** The head's end of one exchange: sends the request, parses the response, paces the reader. */
class InferCall {
  private state: CallState = 'head'
  private readonly decoder: FrameDecoder
  private readonly head = deferred<InferResponse>()
  private readonly queue: Uint8Array[] = []
  private queuedBytes = 0
  private paused = false
  private resuming = false
  private pending: Deferred<IteratorResult<Uint8Array>> | null = null
  private failure: Error | null = null
  private iterated = false
  private timer: NodeJS.Timeout | undefined
  private lastFrameAt = 0
  private framesReceived = 0
  private readonly stream: Stream
  private readonly signal: AbortSignal | undefined
  private readonly firstByteTimeoutMs: number
  private readonly idleTimeoutMs: number
  /** Where a cleanly finished stream goes for the next request; null closes it. */
  private readonly release: Release | null
  private readonly channel: InferChannel

  constructor(channel: InferChannel, options: SendInferOptions, release: Release | null) {
    this.channel = channel
    this.stream = channel.stream
    this.signal = options.signal
    this.firstByteTimeoutMs = options.firstByteTimeoutMs ?? inferFirstByteTimeoutMs
    this.idleTimeoutMs = options.idleTimeoutMs ?? inferIdleTimeoutMs
    this.release = release
    this.decoder = new FrameDecoder(this.checkFrame, this.onFrame)
  }

  /** Sends the request; resolves with the response head. */
  start(wire: Uint8Array): Promise<InferResponse> {
    const stream = this.stream
    this.channel.call = this
    this.signal?.addEventListener('abort', this.onAbort, { once: true })
    this.timer = setTimeout(this.onFirstByteTimeout, this.firstByteTimeoutMs)
    try {
      stream.send(wire)
    } catch (err) {
      this.fail(
        new InferStreamError('reset', `could not send the request: ${(err as Error).message}`, {
          cause: err,
        }),
      )
    }
    return this.head.promise
  }

  /** A kept-alive stream that died before this exchange got a byte: the request never ran there. */
  stale(err: unknown): boolean {
    return (
      this.framesReceived === 0 &&
      err instanceof InferStreamError &&
      (err.code === 'reset' || err.code === 'truncated') &&
      this.signal?.aborted !== true
    )
  }

  private readonly checkFrame = (type: number, length: number): void => {
    if (this.state === 'head') {
      if (type === InferFrameType.ResponseHead || type === InferFrameType.Error) {
        if (length > inferHeadMaxBytes) {
          throw new InferProtocolError(`${frameName(type)} of ${length} bytes is over ${inferHeadMaxBytes}`)
        }
        return
      }
    } else if (this.state === 'body') {
      if (type === InferFrameType.Data) {
        if (length === 0) throw new InferProtocolError('empty DATA frame')
        if (length > inferFrameMaxBytes) {
          throw new InferProtocolError(`DATA frame of ${length} bytes is over ${inferFrameMaxBytes}`)
        }
        return
      }
      if (type === InferFrameType.End) {
        if (length !== 0) throw new InferProtocolError('END frame carries no payload')
        return
      }
      if (type === InferFrameType.Error) {
        if (length > inferHeadMaxBytes)
          throw new InferProtocolError(`ERROR frame of ${length} bytes is too large`)
        return
      }
    }
    throw new InferProtocolError(`unexpected ${frameName(type)} frame from the node`)
  }

  private readonly onFrame = (type: number, payload: Uint8Array): boolean => {
    this.framesReceived++
    this.lastFrameAt = Date.now()
    if (type === InferFrameType.Data) {
      this.push(payload)
      return true
    }
    if (type === InferFrameType.ResponseHead) {
      const { status, headers } = decodeResponseHead(payload)
      this.state = 'body'
      clearTimeout(this.timer)
      this.timer = setTimeout(this.onIdleCheck, this.idleTimeoutMs)
      this.head.resolve({ status, headers, body: { [Symbol.asyncIterator]: this.iterator } })
      return true
    }
    if (type === InferFrameType.End) {
      this.finish()
      return false
    }
    // ERROR, before or after the head: the exchange is over, the stream may carry another.
    const { code, message } = decodeError(payload)
    const err =
      this.state === 'head' ? new InferRemoteError(code, message) : new InferStreamError(code, message)
    this.end(err)
    return false
  }

  onMessage(evt: StreamMessageEvent): void {
    if (this.state === 'done' || this.state === 'failed') return
    try {
      this.decoder.feed(evt.data)
    } catch (err) {
      const e = err as Error
      this.fail(this.state === 'body' ? new InferStreamError('protocol_error', e.message, { cause: e }) : e)
    }
  }

  onEnd(): void {
    // After a reset 'end' fires too, just before 'close' carries the error.
    if (this.stream.status === 'reset' || this.stream.status === 'aborted') return
    this.fail(new InferStreamError('truncated', 'the node closed the stream before END'))
  }

  onClose(evt: StreamCloseEvent): void {
    // A clean close can come while frames still wait in a paused read buffer: 'end' judges those.
    if (evt.error != null)
      this.fail(new InferStreamError('reset', 'the stream was reset', { cause: evt.error }))
  }

  private readonly onAbort = (): void => {
    this.fail(abortReason(this.signal!), true)
  }

  private readonly onFirstByteTimeout = (): void => {
    this.fail(new InferFirstByteTimeoutError(`no response head within ${this.firstByteTimeoutMs} ms`))
  }

  private readonly onIdleCheck = (): void => {
    if (this.state !== 'body') return
    const now = Date.now()
    // A paused stream waits on our reader, not on the node.
    if (this.paused) this.lastFrameAt = now
    const waited = now - this.lastFrameAt
    if (waited >= this.idleTimeoutMs) {
      this.fail(new InferStreamError('idle_timeout', `no frame from the node for ${this.idleTimeoutMs} ms`))
      return
    }
    this.timer = setTimeout(this.onIdleCheck, this.idleTimeoutMs - waited)
  }

  private push(chunk: Uint8Array): void {
    const waiting = this.pending
    if (waiting != null) {
      this.pending = null
      waiting.resolve({ value: chunk, done: false })
      return
    }
    this.queue.push(chunk)
    this.queuedBytes += chunk.byteLength
    if (!this.resuming) this.maybePause()
  }

  private maybePause(): void {
    if (
      !this.paused &&
      this.queuedBytes >= inferResponseBufferBytes &&
      this.stream.readStatus === 'readable'
    ) {
      this.paused = true
      this.stream.pause()
    }
  }

  private resumeReading(): void {
    this.paused = false
    this.lastFrameAt = Date.now()
    if (this.stream.readStatus !== 'paused') return
    // resume() delivers the buffered bytes before it tells yamux to resume; a pause() from inside
    // that delivery would be undone and the window would open without limit. Pause after it instead.
    this.resuming = true
    try {
      this.stream.resume()
    } finally {
      this.resuming = false
    }
    if (this.state === 'body') this.maybePause()
  }

  private readonly iterator = (): AsyncIterator<Uint8Array> => {
    if (this.iterated)
      throw new InferStreamError('consumed', 'an infer response body can be iterated only once')
    this.iterated = true
    return {
      next: () => this.next(),
      return: () => {
        if (this.state === 'body')
          this.fail(new InferStreamError('cancelled', 'the reader left the body early'), true)
        this.queue.length = 0
        return Promise.resolve({ value: undefined, done: true })
      },
    }
  }

  private next(): Promise<IteratorResult<Uint8Array>> {
    const chunk = this.queue.shift()
    if (chunk != null) {
      this.queuedBytes -= chunk.byteLength
      if (this.paused && this.queuedBytes <= inferResponseBufferBytes / 2) this.resumeReading()
      return Promise.resolve({ value: chunk, done: false })
    }
    if (this.state === 'done') return Promise.resolve({ value: undefined, done: true })
    if (this.failure != null) return Promise.reject(this.failure)
    this.pending = deferred()
    return this.pending.promise
  }

  /** END: the reader gets the rest of the queue; the stream goes back to the pool. */
  private finish(): void {
    this.state = 'done'
    const waiting = this.pending
    this.pending = null
    waiting?.resolve({ value: undefined, done: true })
    this.settle()
  }

  /** An ERROR frame: the exchange failed cleanly, the stream may still be reused. */
  private end(err: Error): void {
    const before = this.state
    this.state = 'failed'
    this.failure = err
    if (before === 'head') this.head.reject(err)
    const waiting = this.pending
    this.pending = null
    waiting?.reject(err)
    this.settle()
  }

  private settle(): void {
    this.detach()
    const stream = this.stream
    // Resumed without a listener: anything the node sent past END stays unread and spoils reuse.
    if (stream.readStatus === 'paused') stream.resume()
    if (this.decoder.buffered > 0) stream.abort(new InferProtocolError('a frame after END'))
    else if (this.release != null && reusable(stream)) this.release(this.channel)
    else closeQuietly(stream)
  }

  /** The reader still gets what arrived before a failure, unless it cancelled itself. */
  private fail(err: Error, discard = false): void {
    if (this.state === 'failed' || this.state === 'done') return
    const before = this.state
    this.state = 'failed'
    this.failure = err
    if (discard) this.queue.length = 0
    this.detach()
    if (before === 'head') this.head.reject(err)
    const waiting = this.pending
    this.pending = null
    waiting?.reject(err)
    this.stream.abort(err)
  }

  private detach(): void {
    clearTimeout(this.timer)
    this.signal?.removeEventListener('abort', this.onAbort)
    if (this.channel.call === this) this.channel.call = null
  }
}

async function openStream(
  node: MeshNode,
  peer: PeerId | Multiaddr,
  options: SendInferOptions,
): Promise<Stream> {
  const userSignal = options.signal
  const connectTimeoutMs = options.connectTimeoutMs ?? inferConnectTimeoutMs
  const connect = new AbortController()
  const timer = setTimeout(() => connect.abort(), connectTimeoutMs)
  let stream: Stream
  try {
    stream = await node.dialProtocol(peer, INFER_PROTOCOL, {
      signal: userSignal != null ? AbortSignal.any([connect.signal, userSignal]) : connect.signal,
      runOnLimitedConnection: true,
      maxOutboundStreams: inferMaxOutboundStreams,
    })
  } catch (err) {
    if (userSignal?.aborted === true) throw abortReason(userSignal)
    const why = connect.signal.aborted ? `timed out after ${connectTimeoutMs} ms` : (err as Error).message
    throw new InferConnectError(`could not open ${INFER_PROTOCOL} to ${peer.toString()}: ${why}`, {
      cause: err,
    })
  } finally {
    clearTimeout(timer)
  }
  if (userSignal?.aborted === true) {
    stream.abort(abortReason(userSignal))
    throw abortReason(userSignal)
  }
  // A slow reader pauses the stream; what yamux's window lets in meanwhile must not reset it.
  stream.maxReadBufferLength = Math.max(stream.maxReadBufferLength, inferStreamReadBufferMaxBytes)
  return stream
}

/**
 * Sends one HTTP request to `peer` over /garage/infer/1.0.0 and resolves when the response head
 * arrives. Reuses a finished stream to the same PeerId when one is idle. Rejects with
 * InferRequestInvalidError (before dialling), InferConnectError, InferFirstByteTimeoutError,
 * InferRemoteError (ERROR before the head, with its code), InferProtocolError, InferStreamError
 * (`reset`/`truncated` before the head), or the signal's reason.
 */
export async function sendInferRequest(
  node: MeshNode,
  peer: PeerId | Multiaddr,
  request: InferRequest,
  options: SendInferOptions = {},
): Promise<InferResponse> {
  const wire = encodeRequest(request)
  options.signal?.throwIfAborted()
  // Only a PeerId names the same node every time; a multiaddr dial always opens a new stream.
  const key = isMultiaddr(peer) ? null : peer.toString()
  const pool = key != null ? poolOf(node) : null
  const release: Release | null = pool != null && key != null ? (c) => pool.release(key, c) : null
  const idle = pool != null && key != null ? pool.acquire(key) : null
  if (idle != null) {
    const call = new InferCall(idle, options, release)
    try {
      return await call.start(wire)
    } catch (err) {
      // The node closed that stream as we reused it; the request is sent again on a new one.
      if (!call.stale(err)) throw err
    }
  }
  const stream = await openStream(node, peer, options)
  return new InferCall(new InferChannel(stream), options, release).start(wire)
}

// ---------------------------------------------------------------------------------------------
// Node side
// ---------------------------------------------------------------------------------------------

type ServerState = 'head' | 'body' | 'handling' | 'closing' | 'closed'

/** The node's end of one stream: reads requests one after another and runs the handler on each. */
class InferServerStream {
  private state: ServerState = 'head'
  private readonly decoder: FrameDecoder
  private request: InferRequest | null = null
  private readonly bodyChunks: Uint8Array[] = []
  private bodyBytes = 0
  private timer: NodeJS.Timeout | undefined
  private lastFrameAt = Date.now()
  private exchange: InferExchange | null = null
  /** The head closed its side while a request was being served: close ours after the reply. */
  private remoteClosed = false
  readonly stream: Stream
  readonly peer: PeerId
  readonly init: InferServerInit
  readonly idleTimeoutMs: number
  private readonly onClosed: (s: InferServerStream) => void

  constructor(
    stream: Stream,
    peer: PeerId,
    init: InferServerInit,
    idleTimeoutMs: number,
    onClosed: (s: InferServerStream) => void,
  ) {
    this.stream = stream
    this.peer = peer
    this.init = init
    this.idleTimeoutMs = idleTimeoutMs
    this.onClosed = onClosed
    this.decoder = new FrameDecoder(this.checkFrame, this.onFrame)
  }

  start(): void {
    this.stream.addEventListener('message', this.onMessage)
    this.stream.addEventListener('end', this.onEnd)
    this.stream.addEventListener('close', this.onClose)
    this.timer = setTimeout(this.onReadIdleCheck, this.idleTimeoutMs)
  }

  /** Resets the stream; a running handler's signal aborts with `reason`. */
  abort(reason: Error): void {
    if (this.state === 'closed') return
    const midRequest = this.state === 'body' || (this.state === 'head' && this.decoder.buffered > 0)
    this.state = 'closed'
    clearTimeout(this.timer)
    this.exchange?.cancel(reason)
    this.stream.abort(reason)
    if (midRequest || reason instanceof InferProtocolError || reason instanceof InferPeerNotAllowedError) {
      this.init.onRejected?.(this.peer, reason)
    }
  }

  /** Called as the exchange's END or ERROR goes out: the next request may follow at once. */
  exchangeDone(exchange: InferExchange): void {
    if (this.exchange !== exchange || this.state !== 'handling') return
    this.exchange = null
    if (this.remoteClosed) {
      this.closeGracefully()
      return
    }
    this.state = 'head'
    this.lastFrameAt = Date.now()
    this.timer = setTimeout(this.onReadIdleCheck, this.idleTimeoutMs)
  }

  private readonly checkFrame = (type: number, length: number): void => {
    if (this.state === 'head' && type === InferFrameType.RequestHead) {
      if (length > inferHeadMaxBytes) {
        throw new InferProtocolError(`REQUEST_HEAD of ${length} bytes is over ${inferHeadMaxBytes}`)
      }
      return
    }
    if (this.state === 'body') {
      if (type === InferFrameType.Data) {
        if (length === 0) throw new InferProtocolError('empty DATA frame')
        if (length > inferFrameMaxBytes) {
          throw new InferProtocolError(`DATA frame of ${length} bytes is over ${inferFrameMaxBytes}`)
        }
        if (this.bodyBytes + length > inferRequestBodyMaxBytes) {
          throw new InferProtocolError(`request body over ${inferRequestBodyMaxBytes} bytes`)
        }
        return
      }
      if (type === InferFrameType.End) {
        if (length !== 0) throw new InferProtocolError('END frame carries no payload')
        return
      }
    }
    throw new InferProtocolError(`unexpected ${frameName(type)} frame from the head`)
  }

  private readonly onFrame = (type: number, payload: Uint8Array): boolean => {
    this.lastFrameAt = Date.now()
    if (type === InferFrameType.Data) {
      this.bodyChunks.push(payload)
      this.bodyBytes += payload.byteLength
      return true
    }
    if (type === InferFrameType.RequestHead) {
      if (!this.allowed()) {
        this.abort(new InferPeerNotAllowedError(`${this.peer.toString()} may no longer send requests here`))
        return false
      }
      this.request = decodeRequestHead(payload)
      this.state = 'body'
      return true
    }
    // END: the whole request is here.
    clearTimeout(this.timer)
    this.state = 'handling'
    const body = concatBytes(this.bodyChunks, this.bodyBytes)
    this.bodyChunks.length = 0
    this.bodyBytes = 0
    const exchange = new InferExchange(this)
    this.exchange = exchange
    void exchange.run({ ...this.request!, body })
    return true
  }

  allowed(): boolean {
    try {
      return this.init.allow(this.peer)
    } catch {
      return false
    }
  }

  private readonly onMessage = (evt: StreamMessageEvent): void => {
    // While closing, a request that crossed our close is dropped: the head retries it elsewhere.
    if (this.state === 'closed' || this.state === 'closing') return
    try {
      this.decoder.feed(evt.data)
    } catch (err) {
      this.abort(err as Error)
    }
  }

  private readonly onEnd = (): void => {
    if (this.stream.status === 'reset' || this.stream.status === 'aborted') return
    if (this.state === 'head' && this.decoder.buffered === 0) {
      // Between requests: the head is done with this stream.
      this.closeGracefully()
    } else if (this.state === 'handling') {
      this.remoteClosed = true
    } else if (this.state === 'head' || this.state === 'body') {
      this.abort(new InferProtocolError('the head closed the stream in the middle of a request'))
    }
  }

  private readonly onClose = (evt: StreamCloseEvent): void => {
    if (evt.error != null && this.state !== 'closed') {
      this.state = 'closed'
      this.exchange?.cancel(new InferStreamError('reset', 'the head reset the stream', { cause: evt.error }))
    }
    this.state = 'closed'
    clearTimeout(this.timer)
    this.onClosed(this)
  }

  private closeGracefully(): void {
    this.state = 'closing'
    clearTimeout(this.timer)
    // A head that never closes its side would pin the stream.
    this.timer = setTimeout(
      () => this.abort(new InferStreamError('idle_timeout', 'the head did not close the stream')),
      this.idleTimeoutMs,
    )
    closeQuietly(this.stream)
  }

  private readonly onReadIdleCheck = (): void => {
    if (this.state !== 'head' && this.state !== 'body') return
    const waited = Date.now() - this.lastFrameAt
    if (waited < this.idleTimeoutMs) {
      this.timer = setTimeout(this.onReadIdleCheck, this.idleTimeoutMs - waited)
    } else if (this.state === 'head' && this.decoder.buffered === 0) {
      // No request for a while: the head's keep-alive is shorter, so it has let this stream go.
      this.closeGracefully()
    } else {
      this.abort(new InferStreamError('idle_timeout', `no request frame for ${this.idleTimeoutMs} ms`))
    }
  }
}

/** One request being served: the handler's reply and signal. */
class InferExchange implements InferReply {
  private reply: 'none' | 'head' | 'done' = 'none'
  private readonly controller = new AbortController()
  private readonly owner: InferServerStream

  constructor(owner: InferServerStream) {
    this.owner = owner
  }

  get started(): boolean {
    return this.reply !== 'none'
  }

  cancel(reason: Error): void {
    this.controller.abort(reason)
  }

  async run(request: InferServerRequest): Promise<void> {
    const { init, peer } = this.owner
    const signal = this.controller.signal
    try {
      await init.handle(request, this, signal, peer)
      if (this.reply !== 'done' && !signal.aborted) {
        await this.error('internal_error', 'the node ended the request without a response')
      }
    } catch (err) {
      if (signal.aborted) return
      init.onError?.(peer, err as Error)
      if (this.reply !== 'done') {
        await this.error('internal_error', 'the node failed while serving the request').catch(() => {})
      }
    }
  }

  /** Sends frames in one write; waits while the head reads nothing, up to the idle timeout. */
  private async send(frames: Frame[], last: boolean): Promise<void> {
    const signal = this.controller.signal
    if (signal.aborted) throw abortReason(signal)
    const stream = this.owner.stream
    let ready: boolean
    try {
      ready = stream.send(encodeInferFrames(frames))
    } catch (err) {
      throw new InferStreamError('reset', `the stream is gone: ${(err as Error).message}`, { cause: err })
    }
    if (last) this.owner.exchangeDone(this)
    if (ready || !stream.writableNeedsDrain) return
    const timer = setTimeout(() => {
      this.owner.abort(
        new InferStreamError('idle_timeout', `the head read nothing for ${this.owner.idleTimeoutMs} ms`),
      )
    }, this.owner.idleTimeoutMs)
    try {
      await waitForDrain(stream)
    } catch (err) {
      throw signal.aborted ? abortReason(signal) : err
    } finally {
      clearTimeout(timer)
    }
  }

  private encodeHead(status: number, headers: Array<[string, string]>): Uint8Array {
    if (this.reply !== 'none') throw new InferReplyError('the response head was already sent')
    let payload: Uint8Array
    try {
      payload = encodeResponseHeadCbor(checkStatus(status), checkHeaders(headers))
    } catch (err) {
      throw new InferReplyError((err as Error).message)
    }
    if (payload.byteLength > inferHeadMaxBytes) {
      throw new InferReplyError(`response head of ${payload.byteLength} bytes is over ${inferHeadMaxBytes}`)
    }
    return payload
  }

  async head(status: number, headers: Array<[string, string]>, first?: Uint8Array): Promise<void> {
    const payload = this.encodeHead(status, headers)
    this.reply = 'head'
    const frames: Frame[] = [[InferFrameType.ResponseHead, payload]]
    await this.send(first != null ? pushData(frames, first) : frames, false)
  }

  async data(chunk: Uint8Array): Promise<void> {
    if (this.reply !== 'head') throw new InferReplyError('data() needs head() first and no end()')
    if (chunk.byteLength === 0) return
    await this.send(pushData([], chunk), false)
  }

  async end(): Promise<void> {
    if (this.reply !== 'head') throw new InferReplyError('end() needs head() first and only once')
    this.reply = 'done'
    await this.send([[InferFrameType.End]], true)
  }

  async respond(status: number, headers: Array<[string, string]>, body?: Uint8Array): Promise<void> {
    const payload = this.encodeHead(status, headers)
    this.reply = 'done'
    const frames: Frame[] = [[InferFrameType.ResponseHead, payload]]
    if (body != null) pushData(frames, body)
    frames.push([InferFrameType.End])
    await this.send(frames, true)
  }

  async error(code: string, message: string): Promise<void> {
    if (this.reply === 'done') throw new InferReplyError('error() after the reply ended')
    if (!errorCodePattern.test(code))
      throw new InferReplyError(`error code ${JSON.stringify(code)} is not a-z0-9_`)
    this.reply = 'done'
    const payload = encodeCanonical({ code, message: message.slice(0, errorMessageMaxChars) })
    await this.send([[InferFrameType.Error, payload]], true)
  }
}

/**
 * Serves /garage/infer/1.0.0 on `node` (relayed connections included). Returns `unhandle`: it stops
 * taking streams and resets those still open (running handlers' signals abort with code `stopped`).
 */
export async function handleInferProtocol(
  node: MeshNode,
  init: InferServerInit,
): Promise<() => Promise<void>> {
  const open = new Set<InferServerStream>()
  const idleTimeoutMs = init.idleTimeoutMs ?? inferIdleTimeoutMs
  const onClosed = (s: InferServerStream): void => {
    open.delete(s)
  }
  await node.handle(
    INFER_PROTOCOL,
    (stream: Stream, connection: Connection) => {
      const server = new InferServerStream(stream, connection.remotePeer, init, idleTimeoutMs, onClosed)
      if (!server.allowed()) {
        server.abort(
          new InferPeerNotAllowedError(`${connection.remotePeer.toString()} may not open ${INFER_PROTOCOL}`),
        )
        return
      }
      open.add(server)
      server.start()
    },
    {
      maxInboundStreams: inferMaxInboundStreams,
      maxOutboundStreams: inferMaxOutboundStreams,
      // Nodes behind NAT are reached through their region's relay until DCUtR upgrades the link.
      runOnLimitedConnection: true,
    },
  )
  return async () => {
    await node.unhandle(INFER_PROTOCOL)
    for (const s of [...open]) s.abort(new InferStreamError('stopped', 'the node stopped serving'))
    open.clear()
  }
}
