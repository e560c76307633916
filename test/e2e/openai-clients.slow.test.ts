import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createOpenAI } from '@ai-sdk/openai'
import { tool as langchainTool } from '@langchain/core/tools'
import { ChatOpenAI, OpenAIEmbeddings } from '@langchain/openai'
import { embed, embedMany, generateObject, generateText, Output, streamText, tool } from 'ai'
import { ChatOpenAI as ChatOpenAIN8n, OpenAIEmbeddings as OpenAIEmbeddingsN8n } from 'langchain-openai-n8n'
import OpenAI from 'openai'
import { zodResponseFormat, zodTextFormat } from 'openai/helpers/zod'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { z } from 'zod'
import { type Devnet, startDevnet } from '../../cli/commands/devnet.ts'
import { abandonedStreamAllowanceTokens } from '../../openai/usage.ts'
import { recordingFetch } from '../helpers/openapi.ts'

/**
 * The federation of a devnet (1 region, a chat node and an embedding node, all real: libp2p, the
 * heads, llama.cpp on the tiny random-weight models) driven by the client libraries people use, as
 * their docs show: the official openai SDK, LangChain's @langchain/openai (latest, and 1.4.4 as n8n
 * pins it), and the Vercel AI SDK's default provider. Every exchange is checked against OpenAI's
 * published spec. Where a test asserts structure (a tool call, a JSON object), the grammar makes it
 * hold although the model writes gibberish; string lengths are bounded in the schemas only so the
 * tiny model's answers stay short.
 */

const model = 'garage-tiny'
const embedModel = 'garage-tiny-embed'

const Person = z.object({ name: z.string().max(12), age: z.number().int() })
const cityParams = {
  type: 'object',
  properties: { city: { type: 'string', maxLength: 10 } },
  required: ['city'],
  additionalProperties: false,
}
const weatherTool = {
  type: 'function' as const,
  function: { name: 'get_weather', description: 'Weather for a city', parameters: cityParams, strict: true },
}

describe('OpenAI client libraries against the federation', () => {
  let dir: string
  let devnet: Devnet
  let base: string
  let apiKey: string
  const recorder = recordingFetch()
  let openai: OpenAI

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-clients-'))
    devnet = await startDevnet({ dataDir: dir, regions: 1, nodes: 1, embeddingNodes: 1, port: 0 })
    base = `${devnet.info.federation.url}/v1`
    apiKey = devnet.info.federation.apiKey
    openai = new OpenAI({ baseURL: base, apiKey, maxRetries: 0, timeout: 60_000, fetch: recorder.fetch })
  })
  afterEach(async () => {
    // Every exchange of every test, valid against OpenAI's spec.
    expect(await recorder.problems()).toEqual([])
  })
  afterAll(async () => {
    await devnet?.stop()
    if (dir) await rm(dir, { recursive: true, force: true })
  })

  describe('the official openai SDK', () => {
    it('calls tools: required, a named one, then answers with the result in the history', async () => {
      const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Weather in Paris?' }]
      for (const tool_choice of [
        'required',
        { type: 'function', function: { name: 'get_weather' } },
      ] as const) {
        const res = await openai.chat.completions.create({
          model,
          messages,
          tools: [weatherTool],
          tool_choice,
          seed: 1,
        })
        const choice = res.choices[0]!
        expect(choice.finish_reason).toBe('tool_calls')
        const call = choice.message.tool_calls![0]!
        if (call.type !== 'function') throw new Error('not a function call')
        expect(call.function.name).toBe('get_weather')
        const { city } = JSON.parse(call.function.arguments)
        expect(typeof city === 'string' && city.length <= 10).toBe(true)
      }
      const first = await openai.chat.completions.create({
        model,
        messages,
        tools: [weatherTool],
        tool_choice: 'required',
      })
      const call = first.choices[0]!.message.tool_calls![0]!
      const answer = await openai.chat.completions.create({
        model,
        max_tokens: 8,
        tools: [weatherTool],
        messages: [
          ...messages,
          first.choices[0]!.message,
          { role: 'tool', tool_call_id: call.id, content: '{"temp": 21}' },
        ],
      })
      expect(answer.choices[0]!.finish_reason).toMatch(/length|tool_calls/)
    })

    it('streams tool-call deltas that join to the same calls as the whole answer with the same seed', async () => {
      const body = {
        model,
        seed: 11,
        messages: [{ role: 'user' as const, content: 'Weather in Oslo and Rome?' }],
        tools: [weatherTool],
        tool_choice: 'required' as const,
      }
      const whole = await openai.chat.completions.create(body)
      const joined: Array<{ name: string; arguments: string }> = []
      let finish: string | null = null
      for await (const chunk of await openai.chat.completions.create({ ...body, stream: true })) {
        for (const c of chunk.choices) {
          finish = c.finish_reason ?? finish
          for (const d of c.delta.tool_calls ?? []) {
            joined[d.index] ??= { name: '', arguments: '' }
            joined[d.index]!.name += d.function?.name ?? ''
            joined[d.index]!.arguments += d.function?.arguments ?? ''
          }
        }
      }
      expect(finish).toBe('tool_calls')
      expect(joined).toEqual(
        whole.choices[0]!.message.tool_calls!.map((c) =>
          c.type === 'function' ? { name: c.function.name, arguments: c.function.arguments } : null,
        ),
      )
      // The SDK's own stream helper assembles the same message.
      const helper = await openai.chat.completions.stream(body).finalChatCompletion()
      expect(
        helper.choices[0]!.message.tool_calls!.map((c) =>
          c.type === 'function' ? { name: c.function.name, arguments: c.function.arguments } : null,
        ),
      ).toEqual(joined)
    })

    it('gives structured output: json_schema through parse(), and json_object', async () => {
      const parsed = await openai.chat.completions.parse({
        model,
        messages: [{ role: 'user', content: 'Alice is 30' }],
        response_format: zodResponseFormat(Person, 'person'),
      })
      expect(Person.parse(parsed.choices[0]!.message.parsed)).toEqual(parsed.choices[0]!.message.parsed)
      const object = await openai.chat.completions.create({
        model,
        max_tokens: 200,
        messages: [{ role: 'user', content: 'Reply in JSON' }],
        response_format: { type: 'json_object' },
      })
      const content = object.choices[0]!.message.content!
      if (object.choices[0]!.finish_reason === 'stop') expect(typeof JSON.parse(content)).toBe('object')
    })

    it('uses the Responses API: plain, streamed, with tools and their outputs, and structured', async () => {
      const plain = await openai.responses.create({
        model,
        instructions: 'Be terse.',
        input: 'Say hello',
        max_output_tokens: 8,
      })
      expect(plain.status).toBe('incomplete')
      expect(plain.output_text.length).toBeGreaterThan(0)
      expect(plain.usage!.output_tokens).toBe(8)

      const events: string[] = []
      let text = ''
      let completed: OpenAI.Responses.Response | null = null
      for await (const e of await openai.responses.create({
        model,
        input: 'Say hello',
        max_output_tokens: 6,
        stream: true,
      })) {
        events.push(e.type)
        if (e.type === 'response.output_text.delta') text += e.delta
        if (e.type === 'response.incomplete' || e.type === 'response.completed') completed = e.response
      }
      expect(events[0]).toBe('response.created')
      expect(events).toContain('response.output_text.delta')
      expect(completed!.output_text ?? text).toBe(text)
      expect(completed!.usage!.output_tokens).toBe(6)
      // The SDK's stream helper (strict about the event sequence) gets the same.
      const helped = await openai.responses
        .stream({ model, input: 'Say hello', max_output_tokens: 6 })
        .finalResponse()
      expect(helped.output_text.length).toBeGreaterThan(0)

      const tools = [{ type: 'function' as const, name: 'get_weather', parameters: cityParams, strict: true }]
      const call = await openai.responses.create({
        model,
        input: 'Weather in Paris?',
        tools,
        tool_choice: 'required',
      })
      const fc = call.output.find((o) => o.type === 'function_call')
      if (fc?.type !== 'function_call') throw new Error('no function call')
      expect(typeof JSON.parse(fc.arguments).city).toBe('string')
      const after = await openai.responses.create({
        model,
        max_output_tokens: 6,
        tools,
        input: [
          { role: 'user', content: 'Weather in Paris?' },
          fc,
          { type: 'function_call_output', call_id: fc.call_id, output: '{"temp": 21}' },
        ],
      })
      expect(after.output.length).toBeGreaterThan(0)

      const structured = await openai.responses.parse({
        model,
        input: 'Alice is 30',
        text: { format: zodTextFormat(Person, 'person') },
      })
      expect(Person.parse(structured.output_parsed)).toEqual(structured.output_parsed)

      const refused = await openai.responses
        .create({ model, input: 'again', previous_response_id: plain.id })
        .then(
          () => null,
          (e: unknown) => e,
        )
      expect(refused).toBeInstanceOf(OpenAI.BadRequestError)
      expect((refused as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('previous_response_id')
    })

    it('embeds, in base64 (the SDK default) and float alike', async () => {
      const floats = await openai.embeddings.create({
        model: embedModel,
        input: ['hello', 'world'],
        encoding_format: 'float',
      })
      const decoded = await openai.embeddings.create({ model: embedModel, input: ['hello', 'world'] })
      expect(decoded.data).toHaveLength(2)
      expect(
        Math.max(...decoded.data[1]!.embedding.map((x, i) => Math.abs(x - floats.data[1]!.embedding[i]!))),
      ).toBeLessThan(1e-6)
      expect(floats.usage.prompt_tokens).toBeGreaterThan(0)
    })

    it('gives logprobs, n = 2, penalties, and the models by id', async () => {
      const lp = await openai.chat.completions.create({
        model,
        messages: [{ role: 'user', content: 'x' }],
        max_tokens: 5,
        logprobs: true,
        top_logprobs: 2,
      })
      expect(lp.choices[0]!.logprobs!.content).toHaveLength(5)
      const two = await openai.chat.completions.create({
        model,
        messages: [{ role: 'user', content: 'x' }],
        max_tokens: 5,
        n: 2,
        seed: 3,
      })
      expect(two.choices.map((c) => c.index)).toEqual([0, 1])
      expect(two.usage!.completion_tokens).toBe(10)
      const penalised = await openai.chat.completions.create({
        model,
        messages: [{ role: 'user', content: 'x' }],
        max_tokens: 5,
        presence_penalty: 1.5,
        frequency_penalty: 0.5,
      })
      expect(penalised.choices[0]!.message.content!.length).toBeGreaterThan(0)
      const completion = await openai.completions.create({
        model,
        prompt: 'Hello',
        max_tokens: 2,
        logprobs: 2,
        echo: true,
        temperature: 0,
      })
      expect(completion.choices[0]!.text.startsWith('Hello')).toBe(true)
      expect(await openai.models.retrieve(model)).toMatchObject({ id: model, object: 'model' })
      expect(await openai.models.retrieve(embedModel)).toMatchObject({ id: embedModel })
      await expect(openai.models.retrieve('nope')).rejects.toBeInstanceOf(OpenAI.NotFoundError)
    })

    it('gets precise 400s for bad input, and the gateway keeps serving', async () => {
      const messages = [{ role: 'user' as const, content: 'x' }]
      const cases: Array<[Record<string, unknown>, string, RegExp]> = [
        [
          {
            response_format: {
              type: 'json_schema',
              json_schema: { name: 'x', schema: { type: 'object', properties: { a: { type: 'strnig' } } } },
            },
          },
          'response_format.json_schema.schema',
          /"strnig" is not a JSON Schema type at \/properties\/a\/type/,
        ],
        [
          {
            tools: [
              { type: 'function', function: { name: 'f', parameters: { type: 'object', required: 'a' } } },
            ],
          },
          'tools[0].function.parameters',
          /required must be a list/,
        ],
        [
          { tools: [weatherTool], tool_choice: { type: 'function', function: { name: 'get_time' } } },
          'tool_choice',
          /get_time/,
        ],
        [{ n: 9 }, 'n', /at most 8/],
      ]
      for (const [extra, param, message] of cases) {
        const err = await openai.chat.completions
          .create({ model, messages, max_tokens: 2, ...extra } as never)
          .then(
            () => null,
            (e: unknown) => e,
          )
        expect(err, JSON.stringify(extra)).toBeInstanceOf(OpenAI.BadRequestError)
        expect((err as InstanceType<typeof OpenAI.BadRequestError>).param).toBe(param)
        expect((err as Error).message).toMatch(message)
      }
      const ok = await openai.chat.completions.create({ model, messages, max_tokens: 2 })
      expect(ok.choices[0]!.message.content!.length).toBeGreaterThan(0)
    })
  })

  describe.each([
    ['@langchain/openai (latest)', ChatOpenAI, OpenAIEmbeddings],
    ["@langchain/openai 1.4.4 (n8n's)", ChatOpenAIN8n, OpenAIEmbeddingsN8n],
  ] as const)('%s', (_name, Chat, Embeddings) => {
    const weather = langchainTool(async ({ city }: { city: string }) => `21C in ${city}`, {
      name: 'get_weather',
      description: 'Weather for a city',
      schema: z.object({ city: z.string().max(10) }),
    })
    const ChatModel = Chat as typeof ChatOpenAI
    const chat = (useResponsesApi: boolean, maxTokens?: number) =>
      new ChatModel({
        model,
        apiKey,
        useResponsesApi,
        maxRetries: 0,
        ...(maxTokens != null ? { maxTokens } : {}),
        configuration: { baseURL: base, fetch: recorder.fetch },
      } as ConstructorParameters<typeof ChatOpenAI>[0])

    it.each([false, true])(
      'binds tools and passes their results back (useResponsesApi: %s)',
      async (useResponsesApi) => {
        const bound = chat(useResponsesApi).bindTools([weather], { tool_choice: 'get_weather' })
        const ai = await bound.invoke('Weather in Paris?')
        expect(ai.tool_calls).toHaveLength(1)
        expect(ai.tool_calls![0]).toMatchObject({
          name: 'get_weather',
          args: { city: expect.any(String) },
          id: expect.any(String),
        })
        const streamed = await bound.stream('Weather in Paris?')
        let joined: Awaited<ReturnType<typeof bound.invoke>> | null = null
        for await (const chunk of streamed) joined = joined == null ? chunk : joined.concat(chunk)
        expect(joined!.tool_calls![0]).toMatchObject({
          name: 'get_weather',
          args: { city: expect.any(String) },
        })
        const result = await weather.invoke(ai.tool_calls![0]!)
        const answer = await chat(useResponsesApi, 6).invoke(['Weather in Paris?', ai, result] as never)
        expect(answer.text.length).toBeGreaterThan(0)
      },
    )

    it.each([false, true])(
      'withStructuredOutput with its default method (useResponsesApi: %s)',
      async (useResponsesApi) => {
        const person = await chat(useResponsesApi).withStructuredOutput(Person).invoke('Alice is 30')
        expect(Person.parse(person)).toEqual(person)
      },
    )

    it('embeds queries and documents', async () => {
      const embeddings = new Embeddings({
        model: embedModel,
        apiKey,
        maxRetries: 0,
        configuration: { baseURL: base, fetch: recorder.fetch },
      } as never)
      const [query, docs] = await Promise.all([
        embeddings.embedQuery('hello'),
        embeddings.embedDocuments(['hello', 'world\nagain']),
      ])
      expect(query).toHaveLength(64)
      expect(docs).toHaveLength(2)
      expect(Math.max(...query.map((x, i) => Math.abs(x - docs[0]![i]!)))).toBeLessThan(1e-6)
    })
  })

  describe("the Vercel AI SDK's default provider (the Responses API)", () => {
    const provider = () => createOpenAI({ baseURL: base, apiKey, fetch: recorder.fetch })
    /** The item types of the last Responses request the SDK sent. */
    const sentInputTypes = (): Array<string | undefined> =>
      (recorder.exchanges.at(-1)!.request as { input: Array<{ type?: string }> }).input.map((i) => i.type)
    const weather = tool({
      description: 'Weather for a city',
      inputSchema: z.object({ city: z.string().max(10) }),
      execute: async ({ city }) => ({ city, temp: 21 }),
    })

    it('generateText and streamText', async () => {
      const text = await generateText({
        model: provider()(model),
        system: 'Be terse.',
        prompt: 'Say hello',
        maxOutputTokens: 8,
        maxRetries: 0,
      })
      expect(text.text.length).toBeGreaterThan(0)
      expect(text.usage.outputTokens).toBe(8)
      expect(text.finishReason).toBe('length')
      const stream = streamText({
        model: provider()(model),
        prompt: 'Say hello',
        maxOutputTokens: 8,
        maxRetries: 0,
      })
      let streamed = ''
      for await (const part of stream.fullStream) {
        if (part.type === 'error') throw part.error
        if (part.type === 'text-delta') streamed += part.text
      }
      expect(streamed).toBe(await stream.text)
      expect((await stream.usage).outputTokens).toBe(8)
    })

    it('generateObject', async () => {
      const { object } = await generateObject({
        model: provider()(model),
        schema: Person,
        prompt: 'Alice is 30',
        maxRetries: 0,
      })
      expect(Person.parse(object)).toEqual(object)
    })

    it('calls tools, and passes their results back', async () => {
      const first = await generateText({
        model: provider()(model),
        prompt: 'Weather in Paris?',
        tools: { get_weather: weather },
        toolChoice: 'required',
        maxRetries: 0,
      })
      expect(first.toolCalls[0]).toMatchObject({
        toolName: 'get_weather',
        input: { city: expect.any(String) },
      })
      expect(first.toolResults[0]).toMatchObject({ output: { temp: 21 } })
      const next = await generateText({
        model: provider()(model),
        messages: [{ role: 'user', content: 'Weather in Paris?' }, ...first.response.messages],
        tools: { get_weather: weather },
        toolChoice: 'none',
        maxOutputTokens: 6,
        maxRetries: 0,
      })
      expect(next.text.length).toBeGreaterThan(0)
      expect(sentInputTypes()).toContain('function_call_output')

      const streamed = streamText({
        model: provider()(model),
        prompt: 'Weather?',
        tools: { get_weather: weather },
        toolChoice: 'required',
        maxRetries: 0,
      })
      const types = new Set<string>()
      for await (const part of streamed.fullStream) {
        if (part.type === 'error') throw part.error
        types.add(part.type)
      }
      expect(types).toContain('tool-call')
      expect(types).toContain('tool-result')
    })

    it('gives a structured answer from a call with tools (an agent with an output schema)', async () => {
      const result = await generateText({
        model: provider()(model),
        prompt: 'Weather in Paris, as an object',
        tools: { get_weather: weather },
        output: Output.object({ schema: Person }),
        maxOutputTokens: 120,
        maxRetries: 0,
      })
      if (result.finishReason === 'tool-calls') expect(result.toolCalls[0]?.toolName).toBe('get_weather')
      else expect(Person.parse(result.output)).toEqual(result.output)
      const sent = recorder.exchanges.at(-1)!.request as {
        tools?: unknown[]
        text?: { format?: { type?: string } }
      }
      expect(sent.tools).toHaveLength(1)
      expect(sent.text?.format?.type).toBe('json_schema')
    })

    it('continues a conversation whose earlier answers it refers to by id (item_reference, its default)', async () => {
      const first = await generateText({
        model: provider()(model),
        prompt: 'Say hello',
        maxOutputTokens: 4,
        maxRetries: 0,
      })
      const messages = [
        { role: 'user' as const, content: 'Say hello' },
        ...first.response.messages,
        { role: 'user' as const, content: 'Again' },
      ]
      const next = await generateText({
        model: provider()(model),
        messages,
        maxOutputTokens: 4,
        maxRetries: 0,
      })
      expect(next.text.length).toBeGreaterThan(0)
      expect(sentInputTypes()).toContain('item_reference')
      // Without the store (another key, or a restart), the reference is refused with what to do instead.
      const other = createOpenAI({
        baseURL: base,
        apiKey: (await devnet.federation.keys.create({ name: 'second-app' })).key,
        fetch: recorder.fetch,
      })
      await expect(
        generateText({ model: other(model), messages, maxOutputTokens: 4, maxRetries: 0 }),
      ).rejects.toThrow(/store = false/)
      const stateless = await generateText({
        model: other(model),
        messages,
        maxOutputTokens: 4,
        maxRetries: 0,
        providerOptions: { openai: { store: false } },
      })
      expect(stateless.text.length).toBeGreaterThan(0)
    })

    it('embed and embedMany', async () => {
      const one = await embed({ model: provider().embedding(embedModel), value: 'hello', maxRetries: 0 })
      const many = await embedMany({
        model: provider().embedding(embedModel),
        values: ['hello', 'world'],
        maxRetries: 0,
      })
      expect(one.embedding).toHaveLength(64)
      expect(Math.max(...one.embedding.map((x, i) => Math.abs(x - many.embeddings[0]![i]!)))).toBeLessThan(
        1e-6,
      )
      expect(one.usage.tokens).toBeGreaterThan(0)
    })
  })

  it('bills exactly what the answers say: tools, structured output, n > 1, responses and embeddings; the honest nodes are not flagged', async () => {
    const usageTotals = async () =>
      (await devnet.federation.ledger.usageByKey()).reduce(
        (t, u) => ({
          prompt: t.prompt + u.promptTokens,
          completion: t.completion + u.completionTokens,
          requests: t.requests + u.requests,
        }),
        { prompt: 0, completion: 0, requests: 0 },
      )
    const creditTotals = async () =>
      (await devnet.federation.ledger.creditsByNode()).reduce(
        (t, c) => ({ prompt: t.prompt + c.promptTokens, completion: t.completion + c.completionTokens }),
        { prompt: 0, completion: 0 },
      )
    const before = await usageTotals()
    const creditsBefore = await creditTotals()
    const seen = { prompt: 0, completion: 0, requests: 0 }
    const add = (prompt: number, completion: number) => {
      seen.prompt += prompt
      seen.completion += completion
      seen.requests += 1
    }
    const messages = [{ role: 'user' as const, content: 'Weather?' }]
    const tools = await openai.chat.completions.create({
      model,
      messages,
      tools: [weatherTool],
      tool_choice: 'required',
      n: 2,
      seed: 5,
    })
    add(tools.usage!.prompt_tokens, tools.usage!.completion_tokens)
    let streamedUsage: OpenAI.CompletionUsage | null = null
    for await (const c of await openai.chat.completions.create({
      model,
      messages,
      tools: [weatherTool],
      tool_choice: 'required',
      stream: true,
      stream_options: { include_usage: true },
    }))
      streamedUsage = c.usage ?? streamedUsage
    add(streamedUsage!.prompt_tokens, streamedUsage!.completion_tokens)
    const structured = await openai.chat.completions.parse({
      model,
      messages,
      response_format: zodResponseFormat(Person, 'p'),
      n: 2,
    })
    add(structured.usage!.prompt_tokens, structured.usage!.completion_tokens)
    const response = await openai.responses.create({ model, input: 'hi', max_output_tokens: 7 })
    add(response.usage!.input_tokens, response.usage!.output_tokens)
    // A call max_tokens cuts short is in the answer as far as it got, finish_reason 'length' (as
    // OpenAI answers): its tokens are ones the head can see. Dropped, they got honest nodes flagged.
    const cut = await openai.chat.completions.create({
      model,
      messages,
      tools: [weatherTool],
      tool_choice: 'required',
      max_tokens: 24,
      seed: 3,
    })
    expect(cut.choices[0]!.finish_reason).toBe('length')
    expect(cut.choices[0]!.message.tool_calls?.[0]).toMatchObject({ function: { name: 'get_weather' } })
    expect(cut.usage!.completion_tokens).toBe(24)
    add(cut.usage!.prompt_tokens, cut.usage!.completion_tokens)
    const embedded = await openai.embeddings.create({ model: embedModel, input: ['one', 'two', 'three'] })
    add(embedded.usage.prompt_tokens, 0)

    const deadline = Date.now() + 10_000
    let after = await usageTotals()
    while (after.requests - before.requests < seen.requests && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 25))
      after = await usageTotals()
    }
    expect({
      prompt: after.prompt - before.prompt,
      completion: after.completion - before.completion,
      requests: after.requests - before.requests,
    }).toEqual(seen)
    const credits = await creditTotals()
    expect({
      prompt: credits.prompt - creditsBefore.prompt,
      completion: credits.completion - creditsBefore.completion,
    }).toEqual({ prompt: seen.prompt, completion: seen.completion })

    // Streams their clients abandon: the node generates on until the reset reaches it, unseen.
    const aborts = 3
    for (let i = 0; i < aborts; i++) {
      const abort = new AbortController()
      const stream = await openai.chat.completions.create(
        { model, messages, max_tokens: 400, stream: true },
        { signal: abort.signal },
      )
      let chunks = 0
      await (async () => {
        for await (const _ of stream) if (++chunks === 3) abort.abort()
      })().catch(() => {})
    }

    // What each node says it generated (its telemetry's source) against what its head verified:
    // exactly equal but for what the abandoned streams generated unseen, and never flagged.
    const head = devnet.heads[0]!
    for (const node of devnet.info.nodes) {
      let reported = 0
      let verified = 0
      // Once the engine has nothing running (the abandoned generations have stopped).
      for (let wait = 0; wait < 100; wait++) {
        const metrics = await (await fetch(`${node.engineUrl}/metrics`)).text()
        reported = Number(/^vllm:generation_tokens_total\{[^}]*\} (\S+)$/m.exec(metrics)?.[1] ?? 0)
        // The gateway's direct requests reach the head's count with its next report: sent now.
        await devnet.federation.direct?.flush()
        verified = head.verified.verified(node.peerId)
        if (Number(/^vllm:num_requests_running\{[^}]*\} (\S+)$/m.exec(metrics)?.[1] ?? 1) === 0) break
        await new Promise((r) => setTimeout(r, 50))
      }
      head.verified.compare(node.peerId, reported)
      const why = `${node.model}: reported ${reported}, verified ${verified}`
      expect(head.verified.flagged(node.peerId), why).toBe(false)
      expect(reported, why).toBeGreaterThanOrEqual(verified)
      expect(reported - verified, why).toBeLessThanOrEqual(aborts * abandonedStreamAllowanceTokens)
    }
  })
})
