import fc from 'fast-check'
import { beforeAll, describe, expect, it } from 'vitest'
import { ApiError, errorCodesOf } from '../../core/errors.ts'
import { maxSseEventBytes, type SseEvent, SseEventTooLargeError, SseSplitter } from '../../core/sse.ts'
import { prepareUpstreamRequest, upstreamBody } from '../../openai/request.ts'
import { countNonStreamed, StreamTokenCounter } from '../../openai/usage.ts'
import { announceFuzz, deepJson, fuzzParams, fuzzTimeoutMs } from './fuzz.ts'

const encoder = new TextEncoder()
const decoder = new TextDecoder('utf-8', { ignoreBOM: true })

/** The SSE spec's line rules, over the whole text at once: the oracle for the incremental splitter. */
function oracle(text: string): Array<Pick<SseEvent, 'data' | 'event'>> {
  const events: Array<Pick<SseEvent, 'data' | 'event'>> = []
  let data: string | null = null
  let event: string | null = null
  const body = text.charCodeAt(0) === 0xfeff ? text.slice(1) : text
  const re = /([^\r\n]*)(\r\n|\r|\n)/y
  for (let m = re.exec(body); m != null; m = re.exec(body)) {
    const line = m[1]!
    if (line === '') {
      events.push({ data, event })
      data = null
      event = null
      continue
    }
    if (line.startsWith(':')) continue
    const colon = line.indexOf(':')
    const field = colon === -1 ? line : line.slice(0, colon)
    let value = colon === -1 ? '' : line.slice(colon + 1)
    if (value.startsWith(' ')) value = value.slice(1)
    if (field === 'data') data = data == null ? value : `${data}\n${value}`
    else if (field === 'event') event = value
  }
  return events
}

const sseLine = fc.oneof(
  fc.string({ unit: 'grapheme', maxLength: 30 }).map((s) => `data: ${s}`),
  fc.string({ unit: 'grapheme', maxLength: 30 }).map((s) => `data:${s}`),
  fc.constant('data'),
  fc.string({ maxLength: 10 }).map((s) => `event: ${s}`),
  fc.string({ maxLength: 20 }).map((s) => `: ${s}`),
  fc.string({ maxLength: 20 }).map((s) => `id: ${s}`),
  fc.constant(''),
  fc.string({ unit: 'grapheme', maxLength: 20 }),
)
const lineEnd = fc.constantFrom('\n', '\r\n', '\r')
/** SSE text: lines of every kind with every line ending, an optional BOM, maybe cut mid-line. */
const sseText = fc
  .tuple(fc.boolean(), fc.array(fc.tuple(sseLine, lineEnd), { maxLength: 30 }), fc.string({ maxLength: 10 }))
  .map(
    ([bom, lines, tail]) =>
      `${bom ? '\ufeff' : ''}${lines.map(([l, e]) => l.replace(/[\r\n]/g, '') + e).join('')}${tail.replace(/[\r\n]/g, '')}`,
  )

/** Bytes biased to the characters SSE cares about, and invalid UTF-8. */
const sseBytes = fc
  .array(
    fc.oneof(
      fc.constantFrom(0x0a, 0x0d, 0x3a, 0x20, 0x64, 0x61, 0x74, 0xef, 0xbb, 0xbf, 0xe2, 0x82, 0xac, 0xff),
      fc.integer({ min: 0, max: 255 }),
    ),
    { maxLength: 200 },
  )
  .map((b) => Uint8Array.from(b))

/** Cuts `bytes` at the given points (anywhere: inside a CRLF, inside a UTF-8 character). */
function cut(bytes: Uint8Array, points: number[]): Uint8Array[] {
  const at = [...new Set(points.map((p) => (bytes.byteLength === 0 ? 0 : p % (bytes.byteLength + 1))))].sort(
    (a, b) => a - b,
  )
  const chunks: Uint8Array[] = []
  let from = 0
  for (const p of at) {
    chunks.push(bytes.slice(from, p))
    from = p
  }
  chunks.push(bytes.slice(from))
  return chunks
}

function splitAll(chunks: Uint8Array[], maxEventBytes?: number): { events: SseEvent[]; rest: Uint8Array } {
  const splitter = new SseSplitter(maxEventBytes != null ? { maxEventBytes } : {})
  const events = chunks.flatMap((c) => splitter.push(c))
  return { events, rest: splitter.end() }
}

describe('fuzz: SSE splitting (core/sse.ts)', { timeout: fuzzTimeoutMs }, () => {
  beforeAll(() => announceFuzz('SSE splitting'))

  it('finds the same events wherever the stream is cut, and loses no byte', () => {
    fc.assert(
      fc.property(
        fc.oneof(
          sseText.map((t) => encoder.encode(t)),
          sseBytes,
        ),
        fc.array(fc.nat(), { maxLength: 12 }),
        (bytes, points) => {
          const whole = splitAll([bytes])
          const pieces = splitAll(cut(bytes, points))
          const fields = (events: SseEvent[]) => events.map(({ data, event }) => ({ data, event }))
          expect(fields(pieces.events)).toEqual(fields(whole.events))
          // Raw text is the input, event by event, with the unterminated rest handed back as bytes. (A
          // cut between the CR and LF of a blank line moves that LF to the next event's raw text.)
          for (const { events, rest } of [whole, pieces]) {
            expect(events.map((e) => e.raw).join('') + decoder.decode(rest)).toBe(decoder.decode(bytes))
          }
        },
      ),
      fuzzParams(2_000),
    )
  })

  it('parses data and event fields as the SSE spec does', () => {
    fc.assert(
      fc.property(sseText, fc.array(fc.nat(), { maxLength: 6 }), (text, points) => {
        const { events } = splitAll(cut(encoder.encode(text), points))
        // The spec dispatches only events with data; the others (comments, keep-alives) pass through.
        const withData = events.filter((e) => e.data != null).map(({ data, event }) => ({ data, event }))
        expect(withData).toEqual(oracle(text).filter((e) => e.data != null))
      }),
      fuzzParams(2_000),
    )
  })

  it('refuses an event over the limit with SseEventTooLargeError, and only then', () => {
    fc.assert(
      fc.property(
        sseText,
        fc.array(fc.nat(), { maxLength: 6 }),
        fc.integer({ min: 1, max: 64 }),
        (text, points, max) => {
          const chunks = cut(encoder.encode(text), points)
          // Sizes as the same cuts produce them (a cut inside a CRLF moves one LF to the next event).
          const unlimited = splitAll(chunks)
          const sizes = [
            ...unlimited.events.map((e) => encoder.encode(e.raw).byteLength),
            unlimited.rest.byteLength,
          ]
          let err: unknown = null
          try {
            splitAll(chunks, max)
          } catch (e) {
            err = e
          }
          if (sizes.some((s) => s > max)) {
            expect(err).toBeInstanceOf(SseEventTooLargeError)
            expect((err as Error).message).toContain(`exceeds ${max} bytes`)
          } else expect(err).toBeNull()
        },
      ),
      fuzzParams(1_000),
    )
  })

  it('holds at most the limit while an endless event streams in (default 1 MiB)', () => {
    const splitter = new SseSplitter()
    const chunk = new Uint8Array(64 * 1024).fill(0x61)
    let pushed = 0
    const err = (() => {
      try {
        for (;;) {
          splitter.push(chunk)
          pushed += chunk.byteLength
        }
      } catch (e) {
        return e
      }
    })()
    expect(err).toBeInstanceOf(SseEventTooLargeError)
    expect(pushed).toBeLessThanOrEqual(maxSseEventBytes)
    expect(splitter.end().byteLength).toBe(0)
  })
})

const nonEmpty = fc.string({ unit: 'grapheme', minLength: 1, maxLength: 20 })
const anyJson = fc.jsonValue({ maxDepth: 4 })

/** A chunk a node might send: honest fields, wrong types, extra junk. */
const chunkShape = fc.record(
  {
    choices: fc.oneof(
      fc.array(
        fc.record(
          {
            index: fc.nat(4),
            delta: fc.oneof(
              fc.record(
                {
                  content: fc.oneof(nonEmpty, anyJson),
                  reasoning_content: nonEmpty,
                  refusal: nonEmpty,
                  tool_calls: anyJson,
                },
                { requiredKeys: [] },
              ),
              anyJson,
            ),
            text: fc.oneof(nonEmpty, anyJson),
            finish_reason: fc.oneof(fc.constantFrom('stop', 'length'), anyJson),
          },
          { requiredKeys: [] },
        ),
        { maxLength: 3 },
      ),
      anyJson,
    ),
    usage: fc.oneof(
      fc.record({
        completion_tokens: fc.oneof(fc.maxSafeNat(), anyJson),
        prompt_tokens: fc.oneof(fc.maxSafeNat(), anyJson),
      }),
      anyJson,
    ),
    error: anyJson,
  },
  { requiredKeys: [] },
)

const maxTokensArb = fc.option(fc.integer({ min: 1, max: 100_000 }), { nil: null })
const nArb = fc.integer({ min: 1, max: 8 })

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

function expectTokenCount(tokens: number, maxTokens: number | null, n: number): void {
  expect(Number.isSafeInteger(tokens)).toBe(true)
  expect(tokens).toBeGreaterThanOrEqual(0)
  if (maxTokens != null) expect(tokens).toBeLessThanOrEqual(maxTokens * n)
}

describe('fuzz: token accounting (openai/usage.ts)', { timeout: fuzzTimeoutMs }, () => {
  beforeAll(() => announceFuzz('token accounting'))

  it('counts any stream a node sends without throwing, within max_tokens x n', () => {
    const data = fc.oneof(
      fc.constant(null),
      fc.constant('[DONE]'),
      fc.string({ maxLength: 50 }),
      anyJson.map((v) => JSON.stringify(v)),
      chunkShape.map((v) => JSON.stringify(v)),
    )
    fc.assert(
      fc.property(
        fc.array(data, { maxLength: 20 }),
        fc.boolean(),
        maxTokensArb,
        nArb,
        (events, wantsUsage, maxTokens, n) => {
          const counter = new StreamTokenCounter({ clientWantsUsage: wantsUsage, maxTokens, n })
          for (const e of events) expect(typeof counter.feed(e)).toBe('boolean')
          expectTokenCount(counter.verifiedTokens(), maxTokens, n)
          const prompt = counter.promptTokens()
          if (prompt != null) expect(Number.isSafeInteger(prompt) && prompt >= 0).toBe(true)
        },
      ),
      fuzzParams(2_000),
    )
  })

  it('credits an honest stream exactly: its usage, bounded by the text it carried', () => {
    fc.assert(
      fc.property(
        fc.array(nonEmpty, { minLength: 1, maxLength: 20 }),
        fc.nat(100),
        fc.boolean(),
        maxTokensArb,
        (pieces, extra, wantsUsage, maxTokens) => {
          const counter = new StreamTokenCounter({ clientWantsUsage: wantsUsage, maxTokens, n: 1 })
          for (const p of pieces) {
            expect(counter.feed(JSON.stringify({ choices: [{ index: 0, delta: { content: p } }] }))).toBe(
              true,
            )
          }
          const claimed = pieces.length + extra
          const usageChunk = JSON.stringify({
            choices: [],
            usage: { completion_tokens: claimed, prompt_tokens: 3 },
          })
          // The usage chunk the head forced on reaches the client only when it asked for it.
          expect(counter.feed(usageChunk)).toBe(wantsUsage)
          expect(counter.feed('[DONE]')).toBe(true)
          const textBytes = pieces.reduce((s, p) => s + Buffer.byteLength(p), 0)
          const cap = maxTokens ?? Number.POSITIVE_INFINITY
          expect(counter.verifiedTokens()).toBe(
            Math.max(Math.min(pieces.length, cap), Math.min(claimed, cap, textBytes + 1)),
          )
          expect(counter.promptTokens()).toBe(3)
        },
      ),
      fuzzParams(1_000),
    )
  })

  it('counts any non-streamed body without throwing, within max_tokens x n', () => {
    const body = fc.oneof(
      anyJson,
      chunkShape,
      chunkShape.map((c) => ({
        ...c,
        choices: Array.isArray(c.choices)
          ? c.choices.map((ch) => (isRecord(ch) ? { ...ch, message: ch.delta } : ch))
          : c.choices,
      })),
    )
    fc.assert(
      fc.property(body, maxTokensArb, nArb, (json, maxTokens, n) => {
        expectTokenCount(countNonStreamed(json, maxTokens, n), maxTokens, n)
      }),
      fuzzParams(2_000),
    )
  })
})

describe('fuzz: request preparation (openai/request.ts)', {
  timeout: fuzzTimeoutMs,
}, () => {
  beforeAll(() => announceFuzz('request preparation'))

  const requestBody = fc.oneof(
    anyJson,
    fc.record(
      {
        model: fc.oneof(nonEmpty, anyJson),
        stream: fc.oneof(fc.boolean(), anyJson),
        stream_options: fc.oneof(
          fc.record({ include_usage: fc.oneof(fc.boolean(), anyJson) }, { requiredKeys: [] }),
          anyJson,
        ),
        max_tokens: fc.oneof(fc.integer({ min: -5, max: 5000 }), anyJson),
        max_completion_tokens: fc.oneof(fc.integer({ min: -5, max: 5000 }), anyJson),
        n: fc.oneof(fc.integer({ min: -2, max: 8 }), anyJson),
        messages: anyJson,
        prompt: anyJson,
      },
      { requiredKeys: [] },
    ),
  )

  it('prepares any JSON body or refuses it with a registered 400 code naming the field', () => {
    fc.assert(
      fc.property(requestBody, fc.constantFrom('chat' as const, 'completion' as const), (body, kind) => {
        let prepared: ReturnType<typeof prepareUpstreamRequest>
        try {
          prepared = prepareUpstreamRequest(body, kind)
        } catch (err) {
          expect(err).toBeInstanceOf(ApiError)
          const e = err as ApiError
          expect(e.status).toBe(400)
          expect([...errorCodesOf('openai').keys()]).toContain(e.code)
          if (e.param != null) expect(e.message).toContain(e.param)
          return
        }
        const b = body as Record<string, unknown>
        expect(prepared.model).toBe(b.model)
        expect(prepared.stream).toBe(b.stream === true)
        expect(prepared.n).toBeGreaterThanOrEqual(1)
        // Every field the client sent goes on; a stream always asks the node for usage.
        for (const [k, v] of Object.entries(b))
          if (k !== 'stream_options' || !prepared.stream) expect(prepared.body[k]).toEqual(v)
        if (prepared.stream)
          expect((prepared.body.stream_options as { include_usage: boolean }).include_usage).toBe(true)
        const bytes = encoder.encode(JSON.stringify(body))
        // What the next hop parses is what this one did (as JSON carries it: -0 travels as 0).
        const sent = prepared.stream && !prepared.clientWantsUsage ? prepared.body : body
        expect(JSON.parse(decoder.decode(upstreamBody(bytes, prepared)))).toEqual(
          JSON.parse(JSON.stringify(sent)),
        )
      }),
      fuzzParams(2_000),
    )
  })

  it('passes on or refuses with a 400 a streamed body nested deeper than JSON.stringify can go', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 50_000 }), (depth) => {
        const text = `{"model":"m","stream":true,"messages":${deepJson(depth)}}`
        const bytes = encoder.encode(text)
        const prepared = prepareUpstreamRequest(JSON.parse(text), 'chat')
        try {
          const out = upstreamBody(bytes, prepared)
          expect(out.byteLength).toBeGreaterThan(0)
        } catch (err) {
          expect(err).toBeInstanceOf(ApiError)
          expect((err as ApiError).status).toBe(400)
          expect((err as ApiError).message).toMatch(/nest/)
        }
      }),
      fuzzParams(50),
    )
  })
})
