import { describe, expect, it } from 'vitest'
import { ApiError } from '../../../core/errors.ts'
import { type EngineLimits, parseGenerationRequest } from '../../../daemon/engines/llamacpp/request.ts'

const limits: EngineLimits = { contextTokens: 256, vocabularySize: 300, maxChoices: 8 }

function refusal(
  kind: 'chat' | 'completion',
  body: unknown,
): { param: string | null; code: string | null; status: number } {
  try {
    parseGenerationRequest(kind, body, limits)
  } catch (err) {
    expect(err).toBeInstanceOf(ApiError)
    const e = err as ApiError
    return { param: e.param, code: e.code, status: e.status }
  }
  throw new Error('accepted')
}

const chat = (extra: Record<string, unknown>) => ({
  model: 'm',
  messages: [{ role: 'user', content: 'hi' }],
  ...extra,
})

describe('OpenAI request validation', () => {
  it('accepts what the official SDK sends, with defaults', () => {
    const r = parseGenerationRequest(
      'chat',
      chat({ stream: true, stream_options: { include_usage: true }, stop: 'x', seed: 3 }),
      limits,
    )
    expect(r).toMatchObject({
      kind: 'chat',
      maxTokens: null,
      temperature: 1,
      topP: 1,
      seed: 3,
      stop: ['x'],
      stream: true,
      includeUsage: true,
    })
    const parts = parseGenerationRequest(
      'chat',
      {
        model: 'm',
        messages: [
          {
            role: 'developer',
            content: [
              { type: 'text', text: 'a' },
              { type: 'text', text: 'b' },
            ],
          },
        ],
      },
      limits,
    )
    expect(parts.messages).toEqual([{ role: 'system', content: 'ab' }])
    expect(parseGenerationRequest('completion', { model: 'm', prompt: ['one'] }, limits).prompt).toBe('one')
    expect(
      parseGenerationRequest('chat', chat({ max_completion_tokens: 9, presence_penalty: 0 }), limits)
        .maxTokens,
    ).toBe(9)
  })

  it('names the field it refuses', () => {
    expect(refusal('chat', [])).toMatchObject({ status: 400, param: 'body' })
    expect(refusal('chat', chat({ max_tokens: -1 }))).toMatchObject({
      param: 'max_tokens',
      code: 'invalid_value',
    })
    expect(refusal('chat', chat({ max_tokens: 1.5 }))).toMatchObject({
      param: 'max_tokens',
      code: 'invalid_type',
    })
    expect(refusal('chat', chat({ max_tokens: 10_000 }))).toMatchObject({ param: 'max_tokens' })
    expect(refusal('chat', chat({ temperature: 3 }))).toMatchObject({ param: 'temperature' })
    expect(refusal('chat', chat({ top_p: 0 }))).toMatchObject({ param: 'top_p' })
    expect(refusal('chat', chat({ n: 9 }))).toMatchObject({ param: 'n', code: 'invalid_value' })
    expect(refusal('chat', chat({ stop: ['a', 'b', 'c', 'd', 'e'] }))).toMatchObject({ param: 'stop' })
    expect(refusal('chat', chat({ frequency_penalty: 2.5 }))).toMatchObject({ param: 'frequency_penalty' })
    expect(refusal('chat', chat({ top_logprobs: 2 }))).toMatchObject({ param: 'top_logprobs' })
    expect(refusal('chat', chat({ logit_bias: { 300: 1 } }))).toMatchObject({ param: 'logit_bias' })
    expect(refusal('chat', chat({ functions: [] }))).toMatchObject({
      param: 'functions',
      code: 'unsupported_parameter',
    })
    expect(refusal('chat', chat({ tools: [{ type: 'custom', custom: {} }] }))).toMatchObject({
      param: 'tools[0].type',
      code: 'unsupported_value',
    })
    expect(refusal('chat', chat({ tool_choice: 'required' }))).toMatchObject({ param: 'tool_choice' })
    expect(refusal('completion', { model: 'm', prompt: 'a', max_tokens: 0 })).toMatchObject({
      param: 'max_tokens',
    })
    expect(refusal('chat', { model: 'm', messages: [] })).toMatchObject({ param: 'messages' })
    expect(refusal('chat', { model: 'm', messages: [{ role: 'function', content: 'x' }] })).toMatchObject({
      param: 'messages[0].role',
    })
    expect(
      refusal('chat', { model: 'm', messages: [{ role: 'tool', tool_call_id: 'c1', content: 'x' }] }),
    ).toMatchObject({
      param: 'messages[0].tool_call_id',
    })
    expect(
      refusal('chat', { model: 'm', messages: [{ role: 'user', content: [{ type: 'image_url' }] }] }),
    ).toMatchObject({
      code: 'unsupported_content',
    })
    expect(refusal('chat', { messages: [{ role: 'user', content: 'x' }] })).toMatchObject({
      param: 'model',
      code: 'missing_required_parameter',
    })
    expect(refusal('completion', { model: 'm', prompt: ['a', 'b'] })).toMatchObject({ param: 'prompt' })
    expect(refusal('completion', { model: 'm', prompt: 'a', messages: [] })).toMatchObject({
      param: 'messages',
    })
  })
})

describe("vLLM's scoring form (prompt_logprobs, continue_final_message)", () => {
  const scoring = (extra: Record<string, unknown>) =>
    chat({
      messages: [
        { role: 'user', content: 'hi' },
        { role: 'assistant', content: 'hello there' },
      ],
      max_tokens: 1,
      prompt_logprobs: 5,
      return_token_ids: true,
      continue_final_message: true,
      add_generation_prompt: false,
      ...extra,
    })

  it('takes the verifier call as the integrity check sends it', () => {
    const r = parseGenerationRequest('chat', scoring({}), limits)
    expect(r).toMatchObject({ promptLogprobs: 5, continueFinalMessage: true, maxTokens: 1 })
    const c = parseGenerationRequest(
      'completion',
      { model: 'm', prompt: 'ab', max_tokens: 1, prompt_logprobs: 0, return_token_ids: true },
      limits,
    )
    expect(c).toMatchObject({ promptLogprobs: 0, continueFinalMessage: false })
    // Without it, nothing changes.
    expect(parseGenerationRequest('chat', chat({}), limits).promptLogprobs).toBeNull()
  })

  it('refuses what the scoring form cannot do, naming the field', () => {
    expect(refusal('chat', scoring({ max_tokens: 2 }))).toMatchObject({ param: 'max_tokens', status: 400 })
    expect(refusal('chat', scoring({ stream: true }))).toMatchObject({ param: 'stream' })
    expect(refusal('chat', scoring({ n: 2 }))).toMatchObject({ param: 'n' })
    expect(refusal('chat', scoring({ prompt_logprobs: 21 }))).toMatchObject({ param: 'prompt_logprobs' })
    expect(refusal('chat', scoring({ add_generation_prompt: true }))).toMatchObject({
      param: 'add_generation_prompt',
    })
    expect(refusal('chat', scoring({ prompt_logprobs: undefined }))).toMatchObject({
      param: 'continue_final_message',
      code: 'unsupported_value',
    })
    expect(refusal('chat', scoring({ messages: [{ role: 'user', content: 'hi' }] }))).toMatchObject({
      param: 'messages',
    })
    expect(refusal('chat', scoring({ return_token_ids: 'yes' }))).toMatchObject({
      param: 'return_token_ids',
      code: 'invalid_type',
    })
  })
})
