import { createHash } from 'node:crypto'
import { existsSync, readFileSync } from 'node:fs'
import { gunzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { exchangeProblems, openApiValidator } from '../helpers/openapi.ts'

const vendored = new URL('../fixtures/openai/openai-openapi.json.gz', import.meta.url)
const shared = new URL('../../../shared/openai-openapi.json', import.meta.url)

const chatAnswer = () => ({
  id: 'chatcmpl-1',
  object: 'chat.completion',
  created: 1,
  model: 'm',
  choices: [
    {
      index: 0,
      message: { role: 'assistant', content: 'hi', refusal: null },
      logprobs: null,
      finish_reason: 'stop',
    },
  ],
  usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
})

describe("OpenAI's spec as the tests read it", () => {
  it('is the same document as ../shared/openai-openapi.json', (ctx) => {
    if (!existsSync(shared))
      ctx.skip('no ../shared checkout beside this one (CI): the vendored copy is used as is')
    const ours = createHash('sha256')
      .update(gunzipSync(readFileSync(vendored)))
      .digest('hex')
    const theirs = createHash('sha256').update(readFileSync(shared)).digest('hex')
    expect(ours).toBe(theirs)
  })

  it('accepts a complete chat answer and names what an incomplete one lacks', () => {
    const v = openApiValidator()
    expect(v.check('CreateChatCompletionResponse', chatAnswer())).toEqual([])
    const noRefusal = chatAnswer()
    delete (noRefusal.choices[0]!.message as { refusal?: null }).refusal
    expect(v.check('CreateChatCompletionResponse', noRefusal)).toEqual([
      "/choices/0/message must have required property 'refusal'",
    ])
  })

  it('reads OpenAPI 3.0 nullable and rejects a value of the wrong kind', () => {
    const v = openApiValidator()
    const chunk = {
      id: 'c',
      object: 'chat.completion.chunk',
      created: 1,
      model: 'm',
      choices: [{ index: 0, delta: { content: 'x' }, logprobs: null, finish_reason: null }],
      usage: null,
    }
    expect(v.check('CreateChatCompletionStreamResponse', chunk)).toEqual([])
    expect(v.check('Model', 'gpt')).not.toEqual([])
    expect(v.check('ResponseStreamEvent', { type: 'response.bogus', sequence_number: 0 })).not.toEqual([])
    expect(() => v.check('NoSuchSchema', {})).toThrow(/no schema NoSuchSchema/)
  })

  it('checks every event of a stream and the error shape of a failure', () => {
    const chunk = (extra: object) =>
      JSON.stringify({ id: 'c', object: 'text_completion', created: 1, model: 'm', ...extra })
    const good = `data: ${chunk({ choices: [{ index: 0, text: 'a', logprobs: null, finish_reason: null }] })}\n\ndata: [DONE]\n\n`
    const base = {
      method: 'POST',
      path: '/v1/completions',
      status: 200,
      contentType: 'text/event-stream',
      request: null,
    }
    expect(exchangeProblems({ ...base, body: good })).toEqual([])
    const bad = `data: ${chunk({ choices: [{ index: 0, text: 'a', finish_reason: null }] })}\n\n`
    expect(exchangeProblems({ ...base, body: bad })).toEqual([
      "POST /v1/completions 200 event 0: CreateCompletionStreamResponse: /choices/0 must have required property 'logprobs'",
    ])
    const error = {
      error: { message: 'no', type: 'invalid_request_error', param: 'n', code: 'invalid_value' },
    }
    expect(
      exchangeProblems({
        ...base,
        status: 400,
        contentType: 'application/json',
        body: JSON.stringify(error),
      }),
    ).toEqual([])
    expect(
      exchangeProblems({ ...base, status: 400, contentType: 'application/json', body: '{"message":"no"}' }),
    ).not.toEqual([])
  })
})
