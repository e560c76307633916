/**
 * Incremental server-sent-events splitter for the head's proxy: byte chunks in (cut anywhere, even
 * inside a UTF-8 character), complete events out, each with its raw text (through the blank line
 * that ends it, so the proxy can pass it on unchanged) and its parsed `data:` payload.
 *
 * Line endings are LF, CRLF or CR (the SSE spec); an empty line ends an event. Scanning is per byte
 * and each byte is scanned once: CR and LF never occur inside a multi-byte UTF-8 sequence, so a
 * chunk can be split on them before decoding, and an event is decoded once, whole.
 *
 * An event cut off by the end of the stream is not an event (the spec discards it): end() hands
 * back its bytes. Raw text is exactly the input for valid UTF-8; invalid bytes decode to U+FFFD.
 */

import { concatBytes } from './bytes.ts'

export const maxSseEventBytes = 1024 * 1024

const LF = 0x0a
const CR = 0x0d

export class SseEventTooLargeError extends Error {
  override name = 'SseEventTooLargeError'
}

export interface SseEvent {
  /** The event as received, including the blank line that ended it. */
  raw: string
  /** The `data:` lines joined by '\n'; null when the event has none (a comment, a keep-alive). */
  data: string | null
  /** The `event:` field, when there is one. */
  event: string | null
}

export interface SseSplitterInit {
  maxEventBytes?: number
}

export class SseSplitter {
  readonly #maxEventBytes: number
  readonly #decoder = new TextDecoder('utf-8', { ignoreBOM: true })
  /** Bytes of the event in progress, from earlier chunks. */
  #pending: Uint8Array[] = []
  #pendingBytes = 0
  /** Nothing but line endings since the last line ending: the next line ending is a blank line. */
  #atLineStart = true
  /** The previous byte was a CR, so an LF now completes a CRLF rather than ending another line. */
  #afterCr = false
  #first = true

  constructor(init: SseSplitterInit = {}) {
    this.#maxEventBytes = init.maxEventBytes ?? maxSseEventBytes
  }

  /** Feeds a chunk; returns the events it completed, in order. */
  push(chunk: Uint8Array): SseEvent[] {
    const events: SseEvent[] = []
    const length = chunk.length
    let start = 0
    let i = 0
    let nextLf = chunk.indexOf(LF)
    let nextCr = chunk.indexOf(CR)
    while (nextLf !== -1 || nextCr !== -1) {
      const p = nextCr === -1 || (nextLf !== -1 && nextLf < nextCr) ? nextLf : nextCr
      const byte = chunk[p]
      if (p > i) {
        this.#atLineStart = false
        this.#afterCr = false
      }
      let end = p + 1
      if (byte === LF && this.#afterCr) {
        this.#afterCr = false
      } else if (this.#atLineStart) {
        // A blank line: the event ends here, with the LF of a CRLF when it is already in this chunk.
        if (byte === CR && chunk[p + 1] === LF) end = p + 2
        this.#afterCr = byte === CR && end === p + 1
        events.push(this.#complete(chunk.subarray(start, end)))
        start = end
      } else {
        this.#atLineStart = true
        this.#afterCr = byte === CR
      }
      i = end
      if (nextLf !== -1 && nextLf < i) nextLf = chunk.indexOf(LF, i)
      if (nextCr !== -1 && nextCr < i) nextCr = chunk.indexOf(CR, i)
    }
    if (i < length) {
      this.#atLineStart = false
      this.#afterCr = false
    }
    if (start < length) {
      const rest = chunk.length - start
      if (this.#pendingBytes + rest > this.#maxEventBytes) this.#tooLarge(this.#pendingBytes + rest)
      // Copied: the caller may reuse its buffer once push() returns.
      this.#pending.push(chunk.slice(start))
      this.#pendingBytes += rest
    }
    return events
  }

  /** Ends the stream; returns the bytes of an unterminated last event (empty when there is none). */
  end(): Uint8Array {
    const rest = concatBytes(this.#pending, this.#pendingBytes)
    this.#pending = []
    this.#pendingBytes = 0
    this.#atLineStart = true
    this.#afterCr = false
    return rest
  }

  #complete(tail: Uint8Array): SseEvent {
    const size = this.#pendingBytes + tail.length
    if (size > this.#maxEventBytes) this.#tooLarge(size)
    let bytes = tail
    if (this.#pendingBytes > 0) {
      this.#pending.push(tail)
      bytes = concatBytes(this.#pending, size)
      this.#pending = []
      this.#pendingBytes = 0
    }
    const raw = this.#decoder.decode(bytes)
    const bom = this.#first && raw.charCodeAt(0) === 0xfeff
    this.#first = false
    return parseEvent(raw, bom ? 1 : 0)
  }

  #tooLarge(size: number): never {
    this.#pending = []
    this.#pendingBytes = 0
    throw new SseEventTooLargeError(`an SSE event exceeds ${this.#maxEventBytes} bytes (${size} so far)`)
  }
}

function parseEvent(raw: string, from: number): SseEvent {
  let data: string | null = null
  let event: string | null = null
  const length = raw.length
  let lineStart = from
  while (lineStart < length) {
    let lineEnd = lineStart
    while (lineEnd < length) {
      const c = raw.charCodeAt(lineEnd)
      if (c === LF || c === CR) break
      lineEnd++
    }
    if (lineEnd > lineStart && raw.charCodeAt(lineStart) !== 0x3a /* ':' comment */) {
      const colon = raw.indexOf(':', lineStart)
      const hasValue = colon !== -1 && colon < lineEnd
      const field = raw.slice(lineStart, hasValue ? colon : lineEnd)
      let valueStart = hasValue ? colon + 1 : lineEnd
      if (raw.charCodeAt(valueStart) === 0x20 && valueStart < lineEnd) valueStart++
      const value = raw.slice(valueStart, lineEnd)
      if (field === 'data') data = data == null ? value : `${data}\n${value}`
      else if (field === 'event') event = value
    }
    lineStart = lineEnd
    if (raw.charCodeAt(lineStart) === CR) lineStart++
    if (raw.charCodeAt(lineStart) === LF) lineStart++
    if (lineStart === lineEnd) break
  }
  return { raw, data, event }
}
