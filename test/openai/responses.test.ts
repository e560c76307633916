import { describe, expect, it } from 'vitest'
import { ApiError } from '../../core/errors.ts'
import type { AnswerSink } from '../../openai/relay.ts'
import { OutputItemStore, responsesSink, responsesToChat } from '../../openai/responses.ts'
import { openApiValidator } from '../helpers/openapi.ts'

/** A sink that keeps what it is given. */
function memorySink(): AnswerSink & { status: number; headers: Record<string, string>; text: () => string } {
  const parts: string[] = []
  const decoder = new TextDecoder()
  const sink = {
    gone: new AbortController().signal,
    started: false,
    status: 0,
    headers: {} as Record<string, string>,
    text: () => parts.join(''),
    async head(status: number, headers: Record<string, string>) {
      sink.started = true
      sink.status = status
      sink.headers = headers
    },
    async write(chunk: Uint8Array | string) {
      parts.push(typeof chunk === 'string' ? chunk : decoder.decode(chunk))
    },
    async end(last?: Uint8Array | string) {
      if (last != null) await sink.write(last)
    },
  }
  return sink
}

const sse = (chunks: object[]): string =>
  `${chunks.map((c) => `data: ${JSON.stringify(c)}\n\n`).join('')}data: [DONE]\n\n`
const chunk = (choice: object, usage: object | null = null) => ({
  id: 'c',
  object: 'chat.completion.chunk',
  created: 1,
  model: 'm',
  choices: [{ index: 0, logprobs: null, finish_reason: null, ...choice }],
  usage,
})

function events(text: string): Array<Record<string, unknown>> {
  return text
    .split('\n\n')
    .filter((b) => b.includes('data:'))
    .map((b) => JSON.parse(b.slice(b.indexOf('data:') + 5)) as Record<string, unknown>)
}

describe('Responses requests as chat requests', () => {
  const items = new OutputItemStore()
  const toChat = (body: unknown) => responsesToChat(body, { items, scope: 'key-a' })

  it('turns instructions, items, tools and text.format into one chat request', () => {
    const { chat, request } = toChat({
      model: 'm',
      instructions: 'be brief',
      input: [
        { role: 'developer', content: 'use tools' },
        { type: 'message', role: 'user', content: [{ type: 'input_text', text: 'weather?' }] },
        { type: 'function_call', call_id: 'call_1', name: 'weather', arguments: '{"city":"Oslo"}' },
        { type: 'function_call', call_id: 'call_2', name: 'weather', arguments: '{"city":"Rome"}' },
        { type: 'function_call_output', call_id: 'call_1', output: 'cold' },
        { type: 'function_call_output', call_id: 'call_2', output: { temp: 30 } },
        { type: 'reasoning', id: 'rs_1', summary: [] },
      ],
      tools: [{ type: 'function', name: 'weather', parameters: { type: 'object' }, strict: true }],
      tool_choice: { type: 'function', name: 'weather' },
      text: { format: { type: 'json_schema', name: 'w', schema: { type: 'object' }, strict: true } },
      max_output_tokens: 20,
      top_logprobs: 2,
      store: false,
      user: 'u',
      stream: true,
    })
    expect(chat).toEqual({
      model: 'm',
      messages: [
        { role: 'system', content: 'be brief' },
        { role: 'system', content: 'use tools' },
        { role: 'user', content: 'weather?' },
        {
          role: 'assistant',
          content: null,
          tool_calls: [
            { id: 'call_1', type: 'function', function: { name: 'weather', arguments: '{"city":"Oslo"}' } },
            { id: 'call_2', type: 'function', function: { name: 'weather', arguments: '{"city":"Rome"}' } },
          ],
        },
        { role: 'tool', tool_call_id: 'call_1', content: 'cold' },
        { role: 'tool', tool_call_id: 'call_2', content: '{"temp":30}' },
      ],
      tools: [
        { type: 'function', function: { name: 'weather', parameters: { type: 'object' }, strict: true } },
      ],
      tool_choice: { type: 'function', function: { name: 'weather' } },
      response_format: {
        type: 'json_schema',
        json_schema: { name: 'w', schema: { type: 'object' }, strict: true },
      },
      max_completion_tokens: 20,
      logprobs: true,
      top_logprobs: 2,
      stream: true,
      stream_options: { include_usage: true },
    })
    expect(request).toMatchObject({
      model: 'm',
      stream: true,
      maxOutputTokens: 20,
      topLogprobs: 2,
      scope: 'key-a',
    })
  })

  it.each([
    [
      { model: 'm', input: 'x', previous_response_id: 'resp_1' },
      'previous_response_id',
      /stores no responses/,
    ],
    [{ model: 'm', input: 'x', conversation: 'conv_1' }, 'conversation', /stores no conversations/],
    [{ model: 'm', input: [] }, 'input', /non-empty list/],
    [{ input: 'x' }, 'model', /model is required/],
    [{ model: 'm', input: 'x', tools: [{ type: 'web_search' }] }, 'tools[0].type', /only function tools/],
    [
      { model: 'm', input: 'x', text: { format: { type: 'xml' } } },
      'text.format.type',
      /text, json_object or json_schema/,
    ],
    [{ model: 'm', input: 'x', top_logprobs: 21 }, 'top_logprobs', /0 to 20/],
    [{ model: 'm', input: 'x', frobnicate: 1 }, 'frobnicate', /not supported/],
    [
      {
        model: 'm',
        input: [{ type: 'message', role: 'user', content: [{ type: 'input_image', image_url: 'x' }] }],
      },
      'input[0].content',
      /only text parts/,
    ],
  ])('refuses %j naming %s', (body, param, message) => {
    let err: unknown
    try {
      toChat(body)
    } catch (e) {
      err = e
    }
    expect(err).toBeInstanceOf(ApiError)
    expect((err as ApiError).param).toBe(param)
    expect((err as ApiError).message).toMatch(message)
    expect((err as ApiError).status).toBe(400)
  })

  it('resolves item_reference to an output item of the same key only', () => {
    const store = new OutputItemStore()
    const item = { id: 'fc_1', type: 'function_call', call_id: 'call_9', name: 'f', arguments: '{}' }
    store.put('key-a', item)
    const { chat } = responsesToChat(
      {
        model: 'm',
        input: [
          { type: 'item_reference', id: 'fc_1' },
          { type: 'function_call_output', call_id: 'call_9', output: '1' },
        ],
      },
      { items: store, scope: 'key-a' },
    )
    expect((chat.messages as Array<{ role: string }>).map((m) => m.role)).toEqual(['assistant', 'tool'])
    expect(() =>
      responsesToChat(
        { model: 'm', input: [{ type: 'item_reference', id: 'fc_1' }] },
        { items: store, scope: 'key-b' },
      ),
    ).toThrow(/not known here.*store = false/)
  })

  it('forgets items after their time and beyond its size', () => {
    let now = 0
    const store = new OutputItemStore({ maxItems: 2, ttlMs: 10, now: () => now })
    for (const id of ['a', 'b', 'c']) store.put('k', { id })
    expect(store.get('k', 'a')).toBeNull()
    expect(store.get('k', 'c')).toEqual({ id: 'c' })
    now = 11
    expect(store.get('k', 'c')).toBeNull()
  })
})

describe('chat answers as Responses', () => {
  const v = openApiValidator()
  const request = (stream: boolean) =>
    responsesToChat(
      { model: 'm', input: 'hi', stream, top_logprobs: 1 },
      { items: new OutputItemStore(), scope: 'k' },
    ).request

  it('streams the Responses event sequence, each event valid, text and calls joined', async () => {
    const items = new OutputItemStore()
    const out = memorySink()
    const sink = responsesSink(out, request(true), items)
    const lp = {
      token: 'He',
      logprob: -0.5,
      bytes: [72, 101],
      top_logprobs: [{ token: 'He', logprob: -0.5, bytes: [72, 101] }],
    }
    const body = sse([
      chunk({ delta: { role: 'assistant', content: '' } }),
      chunk({ delta: { content: 'He' }, logprobs: { content: [lp], refusal: null } }),
      chunk({ delta: { content: 'llo' } }),
      chunk({
        delta: {
          tool_calls: [{ index: 0, id: 'call_a', type: 'function', function: { name: 'f', arguments: '' } }],
        },
      }),
      chunk({ delta: { tool_calls: [{ index: 0, function: { arguments: '{"x":' } }] } }),
      chunk({ delta: { tool_calls: [{ index: 0, function: { arguments: '1}' } }] } }),
      chunk({ delta: {}, finish_reason: 'tool_calls' }),
      { ...chunk({}), choices: [], usage: { prompt_tokens: 3, completion_tokens: 5, total_tokens: 8 } },
    ])
    await sink.head(200, { 'content-type': 'text/event-stream' })
    // Split mid-event: the sink must reassemble events across writes.
    const cut = Math.floor(body.length / 2)
    await sink.write(body.slice(0, cut))
    await sink.end(body.slice(cut))
    const evs = events(out.text())
    expect(evs.map((e) => e.type)).toEqual([
      'response.created',
      'response.in_progress',
      'response.output_item.added',
      'response.content_part.added',
      'response.output_text.delta',
      'response.output_text.delta',
      'response.output_text.done',
      'response.content_part.done',
      'response.output_item.done',
      'response.output_item.added',
      'response.function_call_arguments.delta',
      'response.function_call_arguments.delta',
      'response.function_call_arguments.done',
      'response.output_item.done',
      'response.completed',
    ])
    expect(evs.map((e) => e.sequence_number)).toEqual(evs.map((_, i) => i))
    for (const e of evs) expect(v.check('ResponseStreamEvent', e), String(e.type)).toEqual([])
    const done = evs.at(-1)!.response as {
      output: Array<Record<string, unknown>>
      usage: Record<string, unknown>
    }
    expect(v.check('Response', done)).toEqual([])
    expect(done.output[0]).toMatchObject({
      type: 'message',
      content: [{ type: 'output_text', text: 'Hello' }],
    })
    expect(done.output[1]).toMatchObject({
      type: 'function_call',
      call_id: 'call_a',
      name: 'f',
      arguments: '{"x":1}',
    })
    expect(done.usage).toMatchObject({ input_tokens: 3, output_tokens: 5, total_tokens: 8 })
    // Both items can be referred to later by the same key.
    expect(items.get('k', done.output[1]!.id as string)).toMatchObject({ call_id: 'call_a' })
  })

  it('turns one chat completion into one Response; a cut-off answer is incomplete', async () => {
    const out = memorySink()
    const sink = responsesSink(out, request(false), new OutputItemStore())
    await sink.head(200, { 'content-type': 'application/json' })
    await sink.end(
      JSON.stringify({
        id: 'c',
        object: 'chat.completion',
        created: 1,
        model: 'm',
        choices: [
          {
            index: 0,
            message: { role: 'assistant', content: 'abc', refusal: null },
            logprobs: null,
            finish_reason: 'length',
          },
        ],
        usage: { prompt_tokens: 2, completion_tokens: 3, total_tokens: 5 },
      }),
    )
    const response = JSON.parse(out.text())
    expect(v.check('Response', response)).toEqual([])
    expect(response).toMatchObject({
      status: 'incomplete',
      incomplete_details: { reason: 'max_output_tokens' },
      output: [{ type: 'message', status: 'completed', content: [{ text: 'abc' }] }],
      usage: { input_tokens: 2, output_tokens: 3 },
    })
  })

  it('passes errors on as they are, and a stream broken off becomes an error event', async () => {
    const out = memorySink()
    const sink = responsesSink(out, request(false), new OutputItemStore())
    const error = JSON.stringify({
      error: { message: 'bad', type: 'invalid_request_error', param: 'n', code: 'invalid_value' },
    })
    await sink.head(400, { 'content-type': 'application/json' })
    await sink.end(error)
    expect(out.status).toBe(400)
    expect(out.text()).toBe(error)

    const broken = memorySink()
    const s2 = responsesSink(broken, request(true), new OutputItemStore())
    await s2.head(200, { 'content-type': 'text/event-stream' })
    await s2.end(
      sse([
        chunk({ delta: { content: 'a' } }),
        { error: { message: 'node went away', type: 'server_error' } },
      ]),
    )
    const evs = events(broken.text())
    expect(evs.at(-1)).toMatchObject({ type: 'error', code: 'stream_interrupted', message: 'node went away' })
    expect(v.check('ResponseStreamEvent', evs.at(-1))).toEqual([])
    expect(evs.some((e) => e.type === 'response.completed')).toBe(false)
  })
})
