import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Ajv2020 } from 'ajv/dist/2020.js'
import addFormatsModule from 'ajv-formats'
import OpenAI from 'openai'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { LlamaCppEngine } from '../../../daemon/engines/llamacpp/engine.ts'
import { writeTinyModel } from '../../../daemon/engines/llamacpp/tiny-model.ts'
import type { EngineHandle } from '../../../daemon/engines/types.ts'
import { recordingFetch } from '../../helpers/openapi.ts'

/**
 * The OpenAI surface of the embedded engine past plain chat, on random-weight tiny models: whatever
 * such a model writes, the grammar makes structured output parse and match its schema, and tool
 * calls valid calls. Every answer is checked against OpenAI's spec.
 */

const addFormats = ((addFormatsModule as unknown as { default?: unknown }).default ?? addFormatsModule) as (
  ajv: Ajv2020,
) => void
const ajv = new Ajv2020({ strict: false })
addFormats(ajv)

const model = 'garage-tiny'
const embedModel = 'garage-tiny-embed'
const messages = [{ role: 'user' as const, content: 'Plan a trip.' }]

const tripSchema = {
  $schema: 'https://json-schema.org/draft/2020-12/schema',
  type: 'object',
  properties: {
    city: { type: 'string', maxLength: 12 },
    days: { type: 'integer', minimum: -9007199254740991, maximum: 9007199254740991 },
    start: { type: 'string', format: 'date' },
    code: { type: 'string', pattern: '^[A-Z]{3}-\\d{2}$' },
    mode: { enum: ['train', 'plane', null] },
    stops: { type: 'array', items: { type: 'string', maxLength: 6 }, maxItems: 2 },
    budget: { anyOf: [{ type: 'number' }, { type: 'null' }] },
  },
  required: ['city', 'days', 'start', 'code', 'mode', 'stops', 'budget'],
  additionalProperties: false,
}
const weatherTool = {
  type: 'function' as const,
  function: {
    name: 'get_weather',
    description: 'Weather for a city',
    parameters: {
      type: 'object',
      properties: { city: { type: 'string', maxLength: 10 }, unit: { enum: ['C', 'F'] } },
      required: ['city', 'unit'],
      additionalProperties: false,
    },
    strict: true,
  },
}
const timeTool = {
  type: 'function' as const,
  function: {
    name: 'get_time',
    parameters: {
      type: 'object',
      properties: { zone: { type: 'string', maxLength: 8 } },
      required: ['zone'],
    },
  },
}

describe('embedded engine: tools, structured output, sampling parameters, embeddings', () => {
  let dir: string
  const engines: LlamaCppEngine[] = []
  let chat: EngineHandle
  let embed: EngineHandle
  let client: OpenAI
  let embedClient: OpenAI
  const recorder = recordingFetch()

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-openai-'))
    await writeTinyModel(join(dir, 'tiny.gguf'), { seed: 7 })
    await writeTinyModel(join(dir, 'embed.gguf'), { seed: 7, embedding: true })
    const start = async (file: string, name: string, task: 'generate' | 'embed'): Promise<EngineHandle> => {
      const engine = new LlamaCppEngine()
      engines.push(engine)
      return engine.start({ model: join(dir, file), servedModelName: name, parallel: 2, threads: 1, task })
    }
    ;[chat, embed] = await Promise.all([
      start('tiny.gguf', model, 'generate'),
      start('embed.gguf', embedModel, 'embed'),
    ])
    const make = (h: EngineHandle) =>
      new OpenAI({
        baseURL: `${h.baseUrl}/v1`,
        apiKey: h.apiKey,
        maxRetries: 0,
        timeout: 60_000,
        fetch: recorder.fetch,
      })
    client = make(chat)
    embedClient = make(embed)
  })
  afterEach(async () => {
    // Every exchange of every test, valid against OpenAI's spec.
    expect(await recorder.problems()).toEqual([])
  })
  afterAll(async () => {
    await Promise.all(engines.map((e) => e.stop()))
    if (dir) await rm(dir, { recursive: true, force: true })
  })

  it('json_schema output parses and matches the schema, whatever the seed', async () => {
    const validate = ajv.compile(tripSchema)
    for (let seed = 1; seed <= 6; seed++) {
      const res = await client.chat.completions.create({
        model,
        messages,
        seed,
        max_tokens: 300,
        response_format: {
          type: 'json_schema',
          json_schema: { name: 'trip', schema: tripSchema, strict: true },
        },
      })
      const choice = res.choices[0]!
      expect(choice.finish_reason).toBe('stop')
      const value = JSON.parse(choice.message.content!)
      expect(validate(value), JSON.stringify({ value, errors: validate.errors })).toBe(true)
    }
  })

  it('json_object output is one JSON object', async () => {
    for (let seed = 1; seed <= 3; seed++) {
      const res = await client.chat.completions.create({
        model,
        messages: [{ role: 'system', content: 'Answer in JSON.' }, ...messages],
        seed,
        max_tokens: 200,
        response_format: { type: 'json_object' },
      })
      const content = res.choices[0]!.message.content!
      if (res.choices[0]!.finish_reason === 'stop') expect(typeof JSON.parse(content)).toBe('object')
      else expect(content.trimStart().startsWith('{')).toBe(true)
    }
  })

  it('tool_choice required and named always make valid calls; none never does', async () => {
    const validate = ajv.compile(weatherTool.function.parameters)
    for (const tool_choice of ['required', { type: 'function', function: { name: 'get_time' } }] as const) {
      for (let seed = 1; seed <= 3; seed++) {
        const res = await client.chat.completions.create({
          model,
          messages,
          seed,
          max_tokens: 120,
          tools: [weatherTool, timeTool],
          tool_choice,
          parallel_tool_calls: false,
        })
        const choice = res.choices[0]!
        expect(choice.finish_reason).toBe('tool_calls')
        expect(choice.message.content).toBeNull()
        expect(choice.message.tool_calls).toHaveLength(1)
        const call = choice.message.tool_calls![0]!
        if (call.type !== 'function') throw new Error('not a function call')
        expect(call.id).toMatch(/^call_/)
        const args = JSON.parse(call.function.arguments)
        if (typeof tool_choice === 'object') expect(call.function.name).toBe('get_time')
        if (call.function.name === 'get_weather') expect(validate(args)).toBe(true)
        else expect(typeof args.zone).toBe('string')
        expect(res.usage!.completion_tokens).toBeGreaterThan(0)
      }
    }
    const none = await client.chat.completions.create({
      model,
      messages,
      seed: 1,
      max_tokens: 8,
      tools: [weatherTool],
      tool_choice: 'none',
    })
    expect(none.choices[0]!.message.tool_calls ?? []).toEqual([])
    expect(none.choices[0]!.finish_reason).not.toBe('tool_calls')
  })

  it('auto lets the model decide: the answer is text or valid calls; a call max_tokens cut short says length', async () => {
    for (let seed = 1; seed <= 4; seed++) {
      const res = await client.chat.completions.create({
        model,
        messages,
        seed,
        max_tokens: 60,
        tools: [weatherTool],
      })
      const choice = res.choices[0]!
      for (const call of choice.message.tool_calls ?? []) {
        if (call.type !== 'function') throw new Error('not a function call')
        expect(call.function.name).toBe('get_weather')
        // Complete calls parse; one the token limit cut has its arguments as far as they got.
        if (choice.finish_reason !== 'length') JSON.parse(call.function.arguments)
      }
      if ((choice.message.tool_calls ?? []).length > 0)
        expect(choice.finish_reason).toMatch(/^(tool_calls|length)$/)
    }
  })

  it('with tools and a response_format, answers in valid calls or in JSON that matches the schema', async () => {
    const schema = {
      type: 'object',
      properties: { answer: { type: 'string', maxLength: 8 } },
      required: ['answer'],
      additionalProperties: false,
    }
    const validate = ajv.compile(schema)
    for (let seed = 1; seed <= 4; seed++) {
      const res = await client.chat.completions.create({
        model,
        messages,
        seed,
        max_tokens: 120,
        tools: [weatherTool],
        response_format: { type: 'json_schema', json_schema: { name: 'answer', schema, strict: true } },
      })
      const choice = res.choices[0]!
      if (choice.finish_reason === 'tool_calls') {
        for (const call of choice.message.tool_calls!)
          if (call.type === 'function') JSON.parse(call.function.arguments)
      } else {
        expect(choice.finish_reason).toBe('stop')
        expect(validate(JSON.parse(choice.message.content!))).toBe(true)
      }
    }
  })

  it('takes a conversation with calls and their results, and streams tool-call deltas that join to the same calls', async () => {
    const history = [
      ...messages,
      {
        role: 'assistant' as const,
        content: null,
        tool_calls: [
          {
            id: 'call_1',
            type: 'function' as const,
            function: { name: 'get_weather', arguments: '{"city":"Oslo","unit":"C"}' },
          },
        ],
      },
      { role: 'tool' as const, tool_call_id: 'call_1', content: '{"temp": 3}' },
      { role: 'user' as const, content: 'And the time there?' },
    ]
    const body = {
      model,
      messages: history,
      seed: 5,
      max_tokens: 120,
      tools: [weatherTool, timeTool],
      tool_choice: 'required' as const,
    }
    const whole = await client.chat.completions.create(body)
    const stream = await client.chat.completions.create({
      ...body,
      stream: true,
      stream_options: { include_usage: true },
    })
    const calls: Array<{ id?: string; name: string; arguments: string }> = []
    let finish: string | null = null
    let usage: OpenAI.CompletionUsage | null | undefined
    for await (const chunk of stream) {
      usage ??= chunk.usage
      for (const c of chunk.choices) {
        finish = c.finish_reason ?? finish
        for (const d of c.delta.tool_calls ?? []) {
          calls[d.index] ??= { name: '', arguments: '' }
          const call = calls[d.index]!
          if (d.id != null) call.id = d.id
          call.name += d.function?.name ?? ''
          call.arguments += d.function?.arguments ?? ''
        }
      }
    }
    const expected = whole.choices[0]!.message.tool_calls!.map((c) =>
      c.type === 'function' ? { name: c.function.name, arguments: c.function.arguments } : null,
    )
    expect(calls.map((c) => ({ name: c.name, arguments: c.arguments }))).toEqual(expected)
    expect(calls.every((c) => c.id?.startsWith('call_'))).toBe(true)
    expect(finish).toBe('tool_calls')
    expect(usage).toEqual(whole.usage)
  })

  it('gives chat logprobs whose tokens make the text, with the asked number of alternatives', async () => {
    const res = await client.chat.completions.create({
      model,
      messages,
      seed: 3,
      max_tokens: 12,
      logprobs: true,
      top_logprobs: 3,
    })
    const { content, logprobs } = {
      content: res.choices[0]!.message.content!,
      logprobs: res.choices[0]!.logprobs!.content!,
    }
    expect(logprobs).toHaveLength(res.usage!.completion_tokens)
    expect(Buffer.concat(logprobs.map((l) => Buffer.from(l.bytes!))).toString('utf8')).toBe(content)
    for (const l of logprobs) {
      expect(l.logprob).toBeLessThanOrEqual(0)
      expect(l.top_logprobs).toHaveLength(3)
      expect(l.top_logprobs[0]!.logprob).toBeGreaterThanOrEqual(l.top_logprobs[2]!.logprob)
    }
  })

  it('gives completion logprobs, echo with the scored prompt, and suffix (fill-in-the-middle)', async () => {
    const res = await client.completions.create({
      model,
      prompt: 'Once upon',
      max_tokens: 6,
      seed: 2,
      logprobs: 2,
      echo: true,
    })
    const choice = res.choices[0]!
    expect(choice.text.startsWith('Once upon')).toBe(true)
    const lp = choice.logprobs!
    expect(lp.tokens!.join('')).toBe(choice.text)
    // Every token has its logprob, the prompt's too (each read after the BOS token).
    expect(lp.token_logprobs!.every((l) => typeof l === 'number' && l <= 0)).toBe(true)
    expect(lp.top_logprobs!.every((t) => Object.keys(t).length >= 1 && Object.keys(t).length <= 2)).toBe(true)
    expect(lp.text_offset![0]).toBe(0)
    expect(lp.text_offset!.at(-1)).toBe(choice.text.length - lp.tokens!.at(-1)!.length)
    const streamed = await client.completions.create({
      model,
      prompt: 'Once upon',
      max_tokens: 6,
      seed: 2,
      echo: true,
      stream: true,
    })
    let text = ''
    for await (const chunk of streamed) text += chunk.choices[0]?.text ?? ''
    expect(text).toBe(choice.text)

    const infill = await client.completions.create({
      model,
      prompt: 'def f(',
      suffix: '):\n  return 1',
      max_tokens: 4,
      seed: 2,
    })
    expect(infill.choices[0]!.text.length).toBeGreaterThan(0)
    expect(infill.usage!.prompt_tokens).toBeGreaterThan('def f():\n  return 1'.length)
  })

  it("makes n choices, each its own, the prompt counted once and every choice's tokens", async () => {
    const one = await client.chat.completions.create({ model, messages, seed: 9, max_tokens: 6 })
    const two = await client.chat.completions.create({
      model,
      messages,
      seed: 9,
      max_tokens: 6,
      n: 2,
      logprobs: true,
    })
    expect(two.choices.map((c) => c.index)).toEqual([0, 1])
    // Choice i is sampled with seed + i: the first is the n = 1 answer.
    expect(two.choices[0]!.message.content).toBe(one.choices[0]!.message.content)
    expect(two.usage!.prompt_tokens).toBe(one.usage!.prompt_tokens)
    expect(two.usage!.completion_tokens).toBe(
      two.choices.reduce((sum, c) => sum + c.logprobs!.content!.length, 0),
    )
    const streamed = await client.chat.completions.create({
      model,
      messages,
      seed: 9,
      max_tokens: 6,
      n: 2,
      stream: true,
    })
    const texts = ['', '']
    for await (const chunk of streamed) for (const c of chunk.choices) texts[c.index] += c.delta.content ?? ''
    expect(texts).toEqual(two.choices.map((c) => c.message.content))
  })

  it("scores a chat answer in vLLM's form exactly as it was generated (the integrity check's verifier call)", async () => {
    const greedy = await client.chat.completions.create({
      model,
      messages,
      max_tokens: 24,
      temperature: 0,
      logprobs: true,
    })
    const generated = greedy.choices[0]!.logprobs!.content!
    const answer = greedy.choices[0]!.message.content!
    // The same answer as the final assistant message, continued: one prefill pass, nothing generated.
    const scored = (await client.post('/chat/completions', {
      body: {
        model,
        messages: [...messages, { role: 'assistant', content: answer }],
        continue_final_message: true,
        add_generation_prompt: false,
        max_tokens: 1,
        prompt_logprobs: 5,
        return_token_ids: true,
      },
    })) as {
      prompt_logprobs: Array<Record<string, { logprob: number; rank: number; decoded_token: string }> | null>
      prompt_token_ids: number[]
      usage: { completion_tokens: number; prompt_tokens: number }
    }
    expect(scored.usage.completion_tokens).toBe(0)
    expect(scored.prompt_logprobs[0]).toBeNull()
    expect(scored.prompt_logprobs).toHaveLength(scored.prompt_token_ids.length)
    // The last tokens are the answer's: the same tokens, the same log-probabilities, each the top one.
    const tail = scored.prompt_token_ids.slice(-generated.length).map((id, i) => {
      const entry = scored.prompt_logprobs[scored.prompt_token_ids.length - generated.length + i]!
      return entry[String(id)]!
    })
    expect(tail.map((t) => t.decoded_token)).toEqual(generated.map((g) => g.token))
    for (const [i, t] of tail.entries()) {
      expect(t.rank).toBe(1)
      expect(t.logprob).toBeCloseTo(generated[i]!.logprob, 3)
    }
    // The prompt before it is the chat template's rendering, as for generating.
    expect(scored.usage.prompt_tokens).toBe(greedy.usage!.prompt_tokens + generated.length)
  })

  it('applies logit_bias, presence and frequency penalties', async () => {
    // The tiny model's tokenizer is byte-level: printable ASCII characters are the tokens of their code.
    const idOf = (token: string): number | null =>
      token.length === 1 && token >= '!' && token <= '~' ? token.charCodeAt(0) : null
    const greedy = await client.chat.completions.create({
      model,
      messages,
      max_tokens: 24,
      temperature: 0,
      logprobs: true,
    })
    const written = greedy.choices[0]!.logprobs!.content!.map((l) => l.token)
    const banned = [...new Set(written.map(idOf).filter((id) => id != null))]
    expect(banned.length).toBeGreaterThan(0)
    const avoided = await client.chat.completions.create({
      model,
      messages,
      max_tokens: 24,
      temperature: 0,
      logprobs: true,
      logit_bias: Object.fromEntries(banned.map((id) => [String(id), -100])),
    })
    const again = avoided.choices[0]!.logprobs!.content!.map((l) => idOf(l.token))
    expect(again.filter((id) => id != null && banned.includes(id))).toEqual([])
    const forced = await client.chat.completions.create({
      model,
      messages,
      seed: 4,
      max_tokens: 4,
      logit_bias: { '65': 100 },
    })
    expect(forced.choices[0]!.message.content).toBe('AAAA')

    const mostRepeated = (tokens: string[]): number => {
      const counts = new Map<string, number>()
      for (const t of tokens) counts.set(t, (counts.get(t) ?? 0) + 1)
      return Math.max(...counts.values())
    }
    const penalised = await client.chat.completions.create({
      model,
      messages,
      max_tokens: 24,
      temperature: 0,
      logprobs: true,
      presence_penalty: 2,
      frequency_penalty: 2,
    })
    const penalisedTokens = penalised.choices[0]!.logprobs!.content!.map((l) => l.token)
    expect(penalisedTokens).not.toEqual(written)
    expect(mostRepeated(penalisedTokens)).toBeLessThanOrEqual(mostRepeated(written))
  })

  it('refuses what it cannot do with a 400 that names the parameter', async () => {
    const cases: Array<[Record<string, unknown>, string, RegExp]> = [
      [
        { response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'strnig' } } } },
        'response_format.json_schema.schema',
        /not a valid JSON Schema/,
      ],
      [
        {
          tools: [
            { type: 'function', function: { name: 'f', parameters: { type: 'object', properties: 3 } } },
          ],
        },
        'tools[0].function.parameters',
        /not a valid JSON Schema: properties must be an object/,
      ],
      [
        { tools: [weatherTool], tool_choice: { type: 'function', function: { name: 'nope' } } },
        'tool_choice',
        /nope/,
      ],
      [{ n: 9 }, 'n', /8/],
      [
        {
          response_format: {
            type: 'json_schema',
            json_schema: { name: 'x', schema: { type: 'string', pattern: '(?=a)' } },
          },
        },
        'response_format.json_schema.schema',
        /lookaround/,
      ],
    ]
    for (const [extra, param, message] of cases) {
      const err = await client.chat.completions
        .create({ model, messages, max_tokens: 4, ...extra } as never)
        .then(
          () => null,
          (e: unknown) => e,
        )
      expect(err).toBeInstanceOf(OpenAI.BadRequestError)
      const e = err as InstanceType<typeof OpenAI.BadRequestError>
      expect(e.param).toBe(param)
      expect(e.message).toMatch(message)
    }
    // Still serving.
    const ok = await client.chat.completions.create({ model, messages, max_tokens: 2 })
    expect(ok.choices).toHaveLength(1)
  })

  it('answers GET /v1/models/{id} and 404s an unknown one', async () => {
    const m = await client.models.retrieve(model)
    expect(m).toMatchObject({ id: model, object: 'model', owned_by: expect.any(String) })
    await expect(client.models.retrieve('nope')).rejects.toBeInstanceOf(OpenAI.NotFoundError)
  })

  it('embeds strings, lists and token arrays as unit vectors, in float and base64', async () => {
    const floats = await embedClient.embeddings.create({
      model: embedModel,
      input: ['hello', 'world'],
      encoding_format: 'float',
    })
    expect(floats.data.map((d) => d.index)).toEqual([0, 1])
    const [a, b] = floats.data.map((d) => d.embedding)
    const norm = (v: number[]) => Math.sqrt(v.reduce((s, x) => s + x * x, 0))
    expect(norm(a!)).toBeCloseTo(1, 5)
    expect(a).not.toEqual(b)
    expect(floats.usage.prompt_tokens).toBeGreaterThan(0)
    expect(floats.usage.total_tokens).toBe(floats.usage.prompt_tokens)
    // The SDK asks for base64 by default and decodes it: the same vector.
    const decoded = await embedClient.embeddings.create({ model: embedModel, input: 'hello' })
    expect(Math.max(...decoded.data[0]!.embedding.map((x, i) => Math.abs(x - a![i]!)))).toBeLessThan(1e-6)
    const tokens = await embedClient.embeddings.create({
      model: embedModel,
      input: [[1, 2, 3]],
      encoding_format: 'float',
    })
    expect(tokens.usage.prompt_tokens).toBe(4) // The 3 given and the BOS token the model reads first.
    expect(tokens.data[0]!.embedding).toHaveLength(a!.length)
    await expect(
      embedClient.embeddings.create({ model: embedModel, input: 'x', dimensions: 3 }),
    ).rejects.toThrow(/dimensions/)
    // The chat model serves no embeddings, and the embedding model no chat: precise 400s.
    await expect(client.embeddings.create({ model, input: 'x' })).rejects.toThrow(/embedding/)
    await expect(embedClient.chat.completions.create({ model: embedModel, messages })).rejects.toThrow(
      /embedding/,
    )
  })
})
