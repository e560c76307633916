import { describe, expect, it } from 'vitest'
import { SseSplitter } from '../../core/sse.ts'
import { prepareUpstreamRequest } from '../../openai/request.ts'
import { countNonStreamed, StreamTokenCounter, VerifiedThroughput } from '../../openai/usage.ts'

const chunk = (v: unknown): string => `data: ${JSON.stringify(v)}\n\n`
const delta = (content: string): string =>
  chunk({ object: 'chat.completion.chunk', choices: [{ index: 0, delta: { content }, finish_reason: null }] })
const usageChunk = (completion: number, prompt = 9): string =>
  chunk({
    object: 'chat.completion.chunk',
    choices: [],
    usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion },
  })

/** A chat stream as the embedded engine sends it: role chunk, text, finish, usage, [DONE]. */
function chatStream(parts: string[], completionTokens: number | null): string {
  let s = chunk({ choices: [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }] })
  for (const p of parts) s += delta(p)
  s += chunk({ choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] })
  if (completionTokens != null) s += usageChunk(completionTokens)
  return `${s}data: [DONE]\n\n`
}

/** What the proxy does: split, feed, forward; returns what the client got. */
function proxy(stream: string, counter: StreamTokenCounter): string {
  const splitter = new SseSplitter()
  let out = ''
  for (const e of splitter.push(new TextEncoder().encode(stream))) if (counter.feed(e.data)) out += e.raw
  return out
}

describe('prepareUpstreamRequest', () => {
  const messages = [{ role: 'user', content: 'hi' }]

  it('forces usage on a stream and remembers the client did not ask for it', () => {
    const body = { model: 'm', messages, stream: true, max_tokens: 64 }
    const prepared = prepareUpstreamRequest(body, 'chat')
    expect(prepared).toEqual({
      body: { model: 'm', messages, stream: true, max_tokens: 64, stream_options: { include_usage: true } },
      clientWantsUsage: false,
      stream: true,
      maxTokens: 64,
      n: 1,
      model: 'm',
      hiddenTokensPerChoice: 1,
      promptBound: null,
    })
    expect(body).not.toHaveProperty('stream_options') // the client's object is left alone
  })

  it('keeps the client’s other stream options and its wish for usage', () => {
    const prepared = prepareUpstreamRequest(
      {
        model: 'm',
        prompt: 'x',
        stream: true,
        stream_options: { include_usage: true, continuous_usage_stats: true },
      },
      'completion',
    )
    expect(prepared.body.stream_options).toEqual({ include_usage: true, continuous_usage_stats: true })
    expect(prepared.clientWantsUsage).toBe(true)
  })

  it('leaves a non-streamed body as it is (its usage is always in the answer)', () => {
    const prepared = prepareUpstreamRequest({ model: 'm', messages, stream: false }, 'chat')
    expect(prepared.body).toEqual({ model: 'm', messages, stream: false })
    expect(prepared).toMatchObject({ stream: false, clientWantsUsage: true, maxTokens: null })
  })

  it('takes the bound the engine obeys: max_completion_tokens for chat, max_tokens for completions', () => {
    expect(
      prepareUpstreamRequest({ model: 'm', max_tokens: 100, max_completion_tokens: 10 }, 'chat').maxTokens,
    ).toBe(10)
    expect(prepareUpstreamRequest({ model: 'm', max_tokens: 100 }, 'chat').maxTokens).toBe(100)
    expect(
      prepareUpstreamRequest({ model: 'm', max_tokens: 100, max_completion_tokens: 10 }, 'completion')
        .maxTokens,
    ).toBe(100)
    expect(prepareUpstreamRequest({ model: 'm', n: 3, max_tokens: null }, 'chat')).toMatchObject({
      n: 3,
      maxTokens: null,
    })
  })

  it('refuses what the head cannot work with, naming the parameter', () => {
    const cases: Array<[unknown, string, string | null]> = [
      [null, 'invalid_type', null],
      [[{ model: 'm' }], 'invalid_type', null],
      [{ messages }, 'missing_required_parameter', 'model'],
      [{ model: '' }, 'missing_required_parameter', 'model'],
      [{ model: 7 }, 'missing_required_parameter', 'model'],
      [{ model: 'm', stream: 'yes' }, 'invalid_type', 'stream'],
      [{ model: 'm', max_tokens: 0 }, 'invalid_value', 'max_tokens'],
      [{ model: 'm', max_tokens: -5 }, 'invalid_value', 'max_tokens'],
      [{ model: 'm', max_tokens: 1.5 }, 'invalid_value', 'max_tokens'],
      [{ model: 'm', max_tokens: '10' }, 'invalid_value', 'max_tokens'],
      [{ model: 'm', max_completion_tokens: 0 }, 'invalid_value', 'max_completion_tokens'],
      [{ model: 'm', n: 0 }, 'invalid_value', 'n'],
      [{ model: 'm', stream: true, stream_options: 'usage' }, 'invalid_type', 'stream_options'],
    ]
    for (const [body, code, param] of cases) {
      let error: unknown = null
      try {
        prepareUpstreamRequest(body, 'chat')
      } catch (err) {
        error = err
      }
      expect(error, JSON.stringify(body)).toMatchObject({ name: 'ApiError', status: 400, code, param })
    }
    try {
      prepareUpstreamRequest({ model: 'm', max_tokens: 0 }, 'chat')
    } catch (err) {
      expect((err as { body(): unknown }).body()).toEqual({
        error: {
          message: 'max_tokens must be a positive integer',
          type: 'invalid_request_error',
          param: 'max_tokens',
          code: 'invalid_value',
        },
      })
    }
  })
})

describe('StreamTokenCounter', () => {
  it('counts a chat stream and drops the usage chunk the client did not ask for', () => {
    const stream = chatStream(['Caf\u00e9', ' au', ' lait \ud83d\ude80'], 5)
    const counter = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: null })
    const forwarded = proxy(stream, counter)
    expect(forwarded).toBe(stream.replace(usageChunk(5), ''))
    expect(counter).toMatchObject({
      textBytes: 5 + 3 + 10,
      contentChunks: 3,
      finishReason: 'stop',
      done: true,
      error: null,
      usage: { completionTokens: 5, promptTokens: 9 },
    })
    expect(counter.verifiedTokens()).toBe(5)
    expect(counter.promptTokens()).toBe(9)
  })

  it('passes the usage chunk on when the client asked for it', () => {
    const stream = chatStream(['a', 'b'], 2)
    const counter = new StreamTokenCounter({ clientWantsUsage: true, maxTokens: 16 })
    expect(proxy(stream, counter)).toBe(stream)
    expect(counter.verifiedTokens()).toBe(2)
  })

  it('never drops anything but the usage-only chunk', () => {
    const counter = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: null })
    const kept = [
      null, // a comment or keep-alive
      'not json',
      '42',
      JSON.stringify({ choices: [{ index: 0, delta: { content: 'x' } }], usage: { completion_tokens: 1 } }),
      JSON.stringify({ choices: [], usage: null }),
      JSON.stringify({ choices: [] }),
      JSON.stringify({ error: { message: 'engine died', type: 'server_error' } }),
      '[DONE]',
    ]
    for (const data of kept) expect(counter.feed(data), String(data)).toBe(true)
    expect(counter.feed(JSON.stringify({ choices: [], usage: { completion_tokens: 3 } }))).toBe(false)
    // A usage chunk without choices at all, or with a usage the head cannot read, is still usage-only.
    expect(counter.feed(JSON.stringify({ usage: { completion_tokens: 3 } }))).toBe(false)
    expect(counter.feed(JSON.stringify({ choices: [], usage: { completion_tokens: 'many' } }))).toBe(false)
    expect(counter).toMatchObject({
      malformed: 1,
      done: true,
      error: { message: 'engine died', type: 'server_error' },
    })
  })

  it('counts a completions stream by its text', () => {
    const counter = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: 10 })
    for (const text of ['Once', ' upon', '', ' a time']) {
      expect(counter.feed(JSON.stringify({ choices: [{ index: 0, text, finish_reason: null }] }))).toBe(true)
    }
    counter.feed(JSON.stringify({ choices: [{ index: 0, text: '', finish_reason: 'length' }] }))
    counter.feed(JSON.stringify({ choices: [], usage: { prompt_tokens: 3, completion_tokens: 4 } }))
    expect(counter).toMatchObject({ textBytes: 16, contentChunks: 3, finishReason: 'length' })
    expect(counter.verifiedTokens()).toBe(4)
  })

  it('counts the content-bearing chunks of a cut stream (no usage)', () => {
    const full = chatStream(['one', ' two', ' three', ' four'], 4)
    const cut = full.slice(0, full.indexOf(' three') + 20) // mid-event: that event never completes
    const counter = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: null })
    proxy(cut, counter)
    expect(counter).toMatchObject({ contentChunks: 2, usage: null, done: false, finishReason: null })
    expect(counter.verifiedTokens()).toBe(2)
    expect(counter.promptTokens()).toBeNull()
  })

  it('bounds an over-claiming usage by max_tokens and by the text bytes + 1', () => {
    const byMax = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: 50 })
    proxy(chatStream(['x'.repeat(400)], 1000), byMax)
    expect(byMax.verifiedTokens()).toBe(50)

    const byText = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: 1000 })
    proxy(chatStream(['hel', 'lo'], 1000), byText)
    expect(byText.verifiedTokens()).toBe(6) // 5 bytes + a final special token

    const byBytesNotChars = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: null })
    proxy(chatStream(['\u4f60\u597d'], 1000), byBytesNotChars) // 2 characters, 6 bytes
    expect(byBytesNotChars.verifiedTokens()).toBe(7)

    const honest = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: 1000 })
    proxy(chatStream(['hel', 'lo'], 2), honest)
    expect(honest.verifiedTokens()).toBe(2)
  })

  it('never credits fewer tokens than content chunks, nor more than max_tokens', () => {
    const under = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: null })
    proxy(chatStream(['a', 'b', 'c', 'd'], 1), under)
    expect(under.verifiedTokens()).toBe(4)

    const split = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: 3 })
    proxy(chatStream(['a', 'b', 'c', 'd', 'e'], null), split)
    expect(split.verifiedTokens()).toBe(3)
  })

  it('counts reasoning and tool-call text, which a client receives too', () => {
    const counter = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: null })
    counter.feed(JSON.stringify({ choices: [{ index: 0, delta: { reasoning_content: 'think' } }] }))
    counter.feed(
      JSON.stringify({
        choices: [
          { index: 0, delta: { tool_calls: [{ index: 0, function: { name: 'f', arguments: '{"a":1}' } }] } },
        ],
      }),
    )
    counter.feed(JSON.stringify({ choices: [], usage: { completion_tokens: 9 } }))
    expect(counter).toMatchObject({ textBytes: 5 + 1 + 7, contentChunks: 2 })
    expect(counter.verifiedTokens()).toBe(9)
  })

  it('scales the bounds with n choices', () => {
    const counter = new StreamTokenCounter({ clientWantsUsage: false, maxTokens: 4, n: 2 })
    counter.feed(JSON.stringify({ choices: [{ index: 0, delta: { content: 'abcdefgh' } }] }))
    counter.feed(JSON.stringify({ choices: [{ index: 1, delta: { content: 'ijklmnop' } }] }))
    counter.feed(JSON.stringify({ choices: [], usage: { completion_tokens: 100 } }))
    expect(counter.verifiedTokens()).toBe(8)
  })
})

describe('countNonStreamed', () => {
  const chat = (content: string, completion?: number): unknown => ({
    object: 'chat.completion',
    choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }],
    ...(completion != null ? { usage: { prompt_tokens: 3, completion_tokens: completion } } : {}),
  })

  it('applies the same rule to a chat body', () => {
    expect(countNonStreamed(chat('hello world', 2), null)).toBe(2)
    expect(countNonStreamed(chat('hello world', 500), null)).toBe(12)
    expect(countNonStreamed(chat('hello world', 500), 8)).toBe(8)
    expect(countNonStreamed(chat('hello world'), null)).toBe(1) // no usage: one choice with text
    expect(countNonStreamed(chat('', 3), null)).toBe(1) // only an end token can be unseen
  })

  it('applies it to a completions body and to n choices', () => {
    const body = {
      object: 'text_completion',
      choices: [
        { index: 0, text: 'abc', finish_reason: 'length' },
        { index: 1, text: 'defg', finish_reason: 'length' },
      ],
      usage: { prompt_tokens: 2, completion_tokens: 40 },
    }
    expect(countNonStreamed(body, 100, 2)).toBe(9)
    expect(countNonStreamed(body, 3, 2)).toBe(6)
    expect(countNonStreamed({ ...body, usage: undefined }, null, 2)).toBe(2)
  })

  it('credits nothing for what is not a completion', () => {
    expect(countNonStreamed(null, 10)).toBe(0)
    expect(countNonStreamed({ error: { message: 'x' } }, 10)).toBe(0)
    expect(countNonStreamed('text', 10)).toBe(0)
  })
})

describe('VerifiedThroughput', () => {
  it('allows, never credits, the tails of cut streams: 64 per cut stream, one per slot at a join', () => {
    const throughput = new VerifiedThroughput()
    throughput.joined('a', 2)
    // Streams its dead head had sent it finish after the join: up to 2 × 64 tokens unseen.
    expect(throughput.compare('a', 128)).toBeNull()
    expect(throughput.verified('a')).toBe(0)
    expect(throughput.compare('a', 128 * 1.1 + 21)?.flagged).toBe(true)
    const b = new VerifiedThroughput()
    b.add('b', 100)
    b.abandoned('b', 500)
    b.abandoned('b', 10)
    expect(b.compare('b', 100 + 64 + 10)).toBeNull()
    expect(b.verified('b')).toBe(100)
    // A liar is still caught: 200 tokens nobody saw.
    expect(b.compare('b', 100 + 64 + 10 + 200)?.flagged).toBe(true)
  })

  it('flags a node claiming over 10% and over 20 tokens more than verified, once per change', () => {
    let t = 1000
    const throughput = new VerifiedThroughput({ now: () => t })
    throughput.add('a', 1000)
    expect(throughput.compare('a', 1100)).toBeNull() // exactly 10% more is within bounds
    expect(throughput.flagged('a')).toBe(false)
    t = 2000
    expect(throughput.compare('a', 1101)).toEqual({
      peer: 'a',
      flagged: true,
      verified: 1000,
      reported: 1101,
      at: 2000,
    })
    expect(throughput.flagged('a')).toBe(true)
    t = 3000
    expect(throughput.compare('a', 1500)).toBeNull() // still flagged: no second warning
    throughput.add('a', 400)
    expect(throughput.compare('a', 1500)).toEqual({
      peer: 'a',
      flagged: false,
      verified: 1400,
      reported: 1500,
      at: 3000,
    })
    expect(throughput.flagged('a')).toBe(false)
  })

  it('allows 20 tokens of slack on small totals', () => {
    const throughput = new VerifiedThroughput({ now: () => 0 })
    throughput.add('a', 10)
    expect(throughput.compare('a', 30)).toBeNull()
    expect(throughput.compare('a', 31)?.flagged).toBe(true)
    expect(throughput.compare('new', 20)).toBeNull()
    expect(throughput.compare('new', 21)?.flagged).toBe(true)
  })

  it('counts tokens still streaming as credited when the head says so', () => {
    const throughput = new VerifiedThroughput({ now: () => 0 })
    throughput.add('a', 100)
    expect(throughput.compare('a', 600, 500)).toBeNull()
    expect(throughput.compare('a', 600)?.flagged).toBe(true)
  })

  it('reports every node for /metrics and forgets one that left', () => {
    let t = 5
    const throughput = new VerifiedThroughput({ now: () => t })
    throughput.add('b', 200)
    throughput.add('b', 0)
    throughput.add('b', -3)
    throughput.compare('b', 250)
    throughput.add('a', 50)
    t = 9
    throughput.compare('c', 10)
    expect(throughput.compare('c', Number.NaN)).toBeNull()
    expect(throughput.snapshot()).toEqual([
      {
        peer: 'a',
        verified: 50,
        reported: null,
        ratio: null,
        flagged: false,
        flaggedSince: null,
        reportedAt: null,
      },
      { peer: 'b', verified: 200, reported: 250, ratio: 1.25, flagged: true, flaggedSince: 5, reportedAt: 5 },
      {
        peer: 'c',
        verified: 0,
        reported: 10,
        ratio: null,
        flagged: false,
        flaggedSince: null,
        reportedAt: 9,
      },
    ])
    expect(throughput.verified('b')).toBe(200)
    expect(throughput.remove('b')).toBe(true)
    expect(throughput.verified('b')).toBe(0)
    expect(throughput.flagged('b')).toBe(false)
  })
})
