import type { ServerResponse } from 'node:http'
import { type ApiError, apiError } from '../core/errors.ts'
import { SseSplitter } from '../core/sse.ts'
import { type InferReply, InferReplyError, type InferResponse } from '../mesh/infer-protocol.ts'
import type { AnswerCapture } from './integrity.ts'
import type { PreparedRequest } from './request.ts'
import { countNonStreamed, StreamTokenCounter } from './usage.ts'

/**
 * Passing an OpenAI answer from the next hop back to whoever asked, counting its tokens on the way.
 * The head relays a node's answer, the federation a head's; the asker is an HTTP client or, for a
 * head, the federation over /garage/infer/1.0.0. An AnswerSink hides which.
 */
export interface AnswerSink {
  /** Aborts when the asker went away: the hop behind must be cancelled. */
  readonly gone: AbortSignal
  readonly started: boolean
  /** Status and headers; nothing is sent before this. */
  head(status: number, headers: Record<string, string>): Promise<void>
  /** Resolves when the asker can take more (backpressure). */
  write(chunk: Uint8Array | string): Promise<void>
  end(last?: Uint8Array | string): Promise<void>
}

const encoder = new TextEncoder()
const bytes = (chunk: Uint8Array | string): Uint8Array =>
  typeof chunk === 'string' ? encoder.encode(chunk) : chunk

/** An HTTP response as a sink. */
export function httpSink(res: ServerResponse): AnswerSink {
  const gone = new AbortController()
  res.on('close', () => {
    if (!res.writableFinished) gone.abort()
  })
  let started = false
  let wrote = false
  return {
    gone: gone.signal,
    get started() {
      return started
    },
    async head(status, headers) {
      started = true
      res.writeHead(status, headers)
      // Streams: the asker sees the status at once, before the first token; with it when that token
      // is already here (one write, not two).
      if (headers['content-type']?.startsWith('text/event-stream')) {
        setImmediate(() => {
          if (!wrote && !res.destroyed && !res.writableEnded) res.flushHeaders()
        })
      }
    },
    async write(chunk) {
      wrote = true
      if (res.destroyed || res.write(chunk)) return
      await new Promise<void>((resolve) => {
        const done = (): void => {
          res.off('drain', done)
          res.off('close', done)
          resolve()
        }
        res.on('drain', done)
        res.on('close', done)
      })
    },
    async end(last) {
      wrote = true
      if (res.destroyed) return
      if (last != null) res.end(last)
      else res.end()
    },
  }
}

/**
 * A reply on /garage/infer/1.0.0 as a sink (the head answering the federation). A whole answer
 * (head, body, END) leaves in one frame write: three writes would cost the asker three yamux frames
 * and three window updates. A stream's head still leaves at once, before its first token.
 */
export function inferSink(reply: InferReply, signal: AbortSignal): AnswerSink {
  let held: { status: number; headers: Array<[string, string]> } | null = null
  return {
    gone: signal,
    get started() {
      return held != null || reply.started
    },
    async head(status, headers) {
      if (held != null || reply.started) throw new InferReplyError('the response head was already sent')
      const pairs = Object.entries(headers)
      if (headers['content-type']?.startsWith('text/event-stream')) await reply.head(status, pairs)
      else held = { status, headers: pairs }
    },
    async write(chunk) {
      const data = bytes(chunk)
      if (held == null) return reply.data(data)
      const { status, headers } = held
      held = null
      await reply.head(status, headers, data.byteLength > 0 ? data : undefined)
    },
    async end(last) {
      const body =
        last != null && (typeof last === 'string' ? last.length : last.byteLength) > 0
          ? bytes(last)
          : undefined
      if (held != null) {
        const { status, headers } = held
        held = null
        await reply.respond(status, headers, body)
        return
      }
      if (body != null) await reply.data(body)
      await reply.end()
    },
  }
}

/** Sends an OpenAI-shaped error, or, past the first byte, just ends the answer. */
export async function sendApiError(
  sink: AnswerSink,
  err: ApiError,
  headers: Record<string, string> = {},
): Promise<void> {
  if (sink.started) {
    await sink.end()
    return
  }
  await sink.head(err.status, { 'content-type': 'application/json', ...headers, ...err.headers })
  await sink.end(JSON.stringify(err.body()))
}

/** A non-streamed answer is buffered to count its tokens; past this it is not an LLM answer. */
export const maxBufferedAnswerBytes = 16 * 1024 * 1024

export class RelayAnswerTooLargeError extends Error {
  override name = 'RelayAnswerTooLargeError'
}

export interface RelayOutcome {
  /** Completion tokens counted the way the head and federation verify them. */
  completionTokens: number
  promptTokens: number
  /** The answer was cut after its first byte (it ended with an SSE error event). */
  interrupted: Error | null
}

/**
 * Relays `response` to `sink`, counting tokens. Streams pass through event by event (the usage chunk
 * the hop added is dropped when the asker did not ask for it); a stream that breaks after its first
 * byte ends with an OpenAI-style SSE error event and [DONE]. `onDecodeStart` marks when a stream's
 * head arrived (the router times a node's speed from there); `onStreamed` follows a stream write by
 * write with the completion tokens relayed so far (never more than the outcome's). `capture`, given
 * only for answers an integrity check sampled, keeps the answer's text (openai/integrity.ts).
 */
export async function relayAnswer(
  response: InferResponse,
  sink: AnswerSink,
  prepared: PreparedRequest,
  headers: Record<string, string>,
  onDecodeStart: () => void = () => {},
  onStreamed: (completionTokens: number) => void = () => {},
  capture: AnswerCapture | null = null,
): Promise<RelayOutcome> {
  const contentType = response.headers.find(([k]) => k.toLowerCase() === 'content-type')?.[1] ?? ''
  const out: Record<string, string> = { ...headers, 'content-type': contentType || 'application/json' }
  if (!contentType.startsWith('text/event-stream')) {
    const chunks: Uint8Array[] = []
    let size = 0
    for await (const chunk of response.body) {
      size += chunk.byteLength
      if (size > maxBufferedAnswerBytes) throw new RelayAnswerTooLargeError(`an answer over ${size} bytes`)
      chunks.push(chunk)
    }
    const text = Buffer.concat(chunks)
    let completionTokens = 0
    let promptTokens = 0
    if (response.status === 200) {
      try {
        const json = JSON.parse(text.toString('utf8')) as { usage?: { prompt_tokens?: number } }
        capture?.feedBody(json)
        completionTokens = countNonStreamed(
          json,
          prepared.maxTokens,
          prepared.n,
          prepared.hiddenTokensPerChoice,
        )
        promptTokens = Math.min(
          Number(json.usage?.prompt_tokens ?? 0) || 0,
          prepared.promptBound ?? Number.POSITIVE_INFINITY,
        )
      } catch {
        completionTokens = 0
      }
    }
    await sink.head(response.status, out)
    await sink.end(text)
    return { completionTokens, promptTokens, interrupted: null }
  }
  onDecodeStart()
  await sink.head(response.status, { ...out, 'cache-control': 'no-cache' })
  const splitter = new SseSplitter()
  const counter = new StreamTokenCounter({
    clientWantsUsage: prepared.clientWantsUsage,
    maxTokens: prepared.maxTokens,
    n: prepared.n,
    hiddenTokensPerChoice: prepared.hiddenTokensPerChoice,
  })
  try {
    for await (const chunk of response.body) {
      let text = ''
      for (const event of splitter.push(chunk)) {
        if (counter.feed(event.data)) text += event.raw
        capture?.feedEvent(event.data)
      }
      if (text.length > 0) {
        await sink.write(text)
        // What the asker has so far, counted as an interrupted stream would be: billed as it streams.
        onStreamed(counter.verifiedTokens())
      }
    }
  } catch (err) {
    if (!sink.gone.aborted) {
      const event = apiError(
        'stream_interrupted',
        `the node serving this request failed mid-stream: ${(err as Error).message}`,
      ).body()
      await sink.end(`data: ${JSON.stringify(event)}\n\ndata: [DONE]\n\n`).catch(() => {})
    }
    return {
      completionTokens: counter.verifiedTokens(),
      promptTokens: counter.promptTokens() ?? 0,
      interrupted: err as Error,
    }
  }
  await sink.end()
  return {
    completionTokens: counter.verifiedTokens(),
    promptTokens: counter.promptTokens() ?? 0,
    interrupted: null,
  }
}
