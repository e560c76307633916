import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { nextLlr, quarantineLlr } from '../../bootstrap/head/integrity.ts'
import {
  AnswerCapture,
  buildSample,
  captureMaxBytes,
  IntegritySampleError,
  integritySampleMaxBytes,
  judgeAnswer,
  outsideBound,
  parseSample,
  poissonBinomialTail,
  readScores,
  type SamplingParams,
  sampleDecision,
  samplingOf,
  scoringRequest,
  scoringTopK,
  type TokenScore,
  uncheckableReason,
} from '../../openai/integrity.ts'

const greedy: SamplingParams = { temperature: 0, topP: 1, presencePenalty: 0, frequencyPenalty: 0 }
const t1: SamplingParams = { ...greedy, temperature: 1 }

describe('which answers are checked', () => {
  it('leaves out what a prefill cannot replay, and says why', () => {
    expect(uncheckableReason('chat', { messages: [] })).toBeNull()
    expect(uncheckableReason('completion', { prompt: 'x' })).toBeNull()
    expect(uncheckableReason('chat', { tools: [{}] })).toBe('tools')
    expect(uncheckableReason('chat', { tools: [{}], tool_choice: 'none' })).toBeNull()
    expect(uncheckableReason('chat', { response_format: { type: 'json_object' } })).toBe('structured output')
    expect(uncheckableReason('chat', { logit_bias: { '3': 5 } })).toBe('logit_bias')
    expect(uncheckableReason('chat', { n: 2 })).toBe('several choices')
    expect(uncheckableReason('completion', { prompt: 'x', echo: true })).toBe('echo')
    expect(uncheckableReason('completion', { prompt: ['a', 'b'] })).toBe('prompt is not one string')
    expect(uncheckableReason('embedding', {})).toBe('not a generation')
  })

  it('samples at the rate given, and never what cannot be checked', () => {
    expect(sampleDecision('chat', {}, 0.5, () => 0.49)).toBe(true)
    expect(sampleDecision('chat', {}, 0.5, () => 0.5)).toBe(false)
    expect(sampleDecision('chat', {}, 0, () => 0)).toBe(false)
    expect(sampleDecision('chat', { n: 3 }, 1, () => 0)).toBe(false)
  })
})

describe('AnswerCapture', () => {
  it('keeps choice 0 of a stream, and of a whole body', () => {
    const c = new AnswerCapture()
    c.feedEvent(JSON.stringify({ choices: [{ index: 0, delta: { role: 'assistant' } }] }))
    c.feedEvent(JSON.stringify({ choices: [{ index: 0, delta: { content: 'Hel' } }] }))
    c.feedEvent(JSON.stringify({ choices: [{ index: 1, delta: { content: 'other' } }] }))
    c.feedEvent(JSON.stringify({ choices: [{ index: 0, delta: { content: 'lo' }, finish_reason: 'stop' }] }))
    c.feedEvent(JSON.stringify({ choices: [], usage: { completion_tokens: 2 } }))
    c.feedEvent('[DONE]')
    expect(c.output()).toEqual({ text: 'Hello', finishReason: 'stop' })
    const b = new AnswerCapture()
    b.feedBody({ choices: [{ index: 0, text: 'abc', finish_reason: 'length' }] })
    expect(b.output()).toEqual({ text: 'abc', finishReason: 'length' })
  })

  it('gives nothing for an error, a tool call, an empty or an oversized answer', () => {
    const e = new AnswerCapture()
    e.feedEvent(JSON.stringify({ choices: [{ index: 0, delta: { content: 'a' } }] }))
    e.feedEvent(JSON.stringify({ error: { message: 'boom' } }))
    expect(e.output()).toBeNull()
    const t = new AnswerCapture()
    t.feedBody({ choices: [{ index: 0, message: { content: 'x', tool_calls: [{ id: 'c' }] } }] })
    expect(t.output()).toBeNull()
    expect(new AnswerCapture().output()).toBeNull()
    const big = new AnswerCapture()
    big.feedEvent(
      JSON.stringify({ choices: [{ index: 0, delta: { content: 'x'.repeat(captureMaxBytes) } }] }),
    )
    big.feedEvent(JSON.stringify({ choices: [{ index: 0, delta: { content: 'y' } }] }))
    expect(big.output()).toBeNull()
  })
})

describe('the sample', () => {
  const base = {
    model: 'm',
    node: 'peer',
    endpoint: 'chat' as const,
    request: { model: 'm', messages: [{ role: 'user', content: 'hi' }], temperature: 0.7 },
    output: { text: 'hello', finishReason: 'stop' },
    requestId: 'r1',
    at: 1,
  }

  it('is bounded plain JSON that survives a round trip', () => {
    const s = buildSample(base)!
    expect(parseSample(JSON.parse(JSON.stringify(s)))).toEqual(s)
    expect(
      buildSample({ ...base, output: { text: 'x'.repeat(integritySampleMaxBytes), finishReason: null } }),
    ).toBeNull()
  })

  it('refuses a malformed or uncheckable sample with the reason', () => {
    expect(() => parseSample({ ...base, v: 2 })).toThrow(IntegritySampleError)
    expect(() => parseSample({ ...base, v: 1, endpoint: 'embedding' })).toThrow(/endpoint/)
    expect(() => parseSample({ ...base, v: 1, output: { text: '' } })).toThrow(/output.text/)
    expect(() => parseSample({ ...base, v: 1, request: { ...base.request, n: 2 } })).toThrow(
      /several choices/,
    )
    expect(() => parseSample('x')).toThrow(/not an object/)
  })

  it("asks the verifier in vLLM's scoring form", () => {
    const chat = scoringRequest(buildSample(base)!)
    expect(chat.path).toBe('/v1/chat/completions')
    expect(chat.body).toMatchObject({
      prompt_logprobs: scoringTopK,
      return_token_ids: true,
      max_tokens: 1,
      continue_final_message: true,
      add_generation_prompt: false,
      messages: [...base.request.messages, { role: 'assistant', content: 'hello' }],
    })
    const completion = scoringRequest(
      buildSample({ ...base, endpoint: 'completion', request: { model: 'm', prompt: 'Say:' } })!,
    )
    expect(completion).toMatchObject({ path: '/v1/completions', body: { prompt: 'Say:hello' } })
    expect(samplingOf({ temperature: 0.3, top_p: 0.9, presence_penalty: 1 })).toEqual({
      temperature: 0.3,
      topP: 0.9,
      presencePenalty: 1,
      frequencyPenalty: 0,
    })
    expect(samplingOf({})).toMatchObject({ temperature: 1, topP: 1 })
  })
})

describe('reading the scores', () => {
  const entry = (id: number, lp: number, rank: number, text: string, top: number[]) => ({
    [String(id)]: { logprob: lp, rank, decoded_token: text },
    ...Object.fromEntries(
      top.map((l, i) => [String(900 + i), { logprob: l, rank: i + 1, decoded_token: '?' }]),
    ),
  })

  it("takes the answer's tokens from the end, leaving out one that straddles the prompt", () => {
    const answer = {
      prompt_token_ids: [0, 1, 2, 3, 4],
      prompt_logprobs: [
        null,
        entry(1, -1, 1, 'Say', [-1]),
        entry(2, -2, 2, ':h', [-0.5, -2]), // ':' is the prompt's, 'h' the answer's
        entry(3, -0.1, 1, 'el', [-0.1]),
        entry(4, -9, 6, 'lo', [-0.2, -0.3, -0.4, -0.5, -0.6]),
      ],
    }
    const scores = readScores(answer, 'hello')
    expect(scores.map((s) => s.text)).toEqual(['el', 'lo'])
    expect(scores[1]).toMatchObject({ logprob: -9, rank: 6, top: [-0.2, -0.3, -0.4, -0.5, -0.6] })
    expect(() => readScores({ choices: [] }, 'x')).toThrow(/prompt_logprobs/)
  })
})

describe('the statistic', () => {
  it('bounds the chance of a token outside the top k from the top k alone', () => {
    const top = [-0.5, -2, -3, -4, -5]
    const tail = 1 - top.reduce((a, l) => a + Math.exp(l), 0)
    expect(outsideBound(top, greedy, 0, 270)).toBe(0)
    expect(outsideBound(top, t1, 0, 270)).toBeCloseTo(tail, 6)
    expect(outsideBound(top, { ...t1, temperature: 0.5 }, 0, 270)).toBeLessThan(tail)
    expect(outsideBound(top, { ...t1, temperature: 1.5 }, 0, 270)).toBeGreaterThan(tail)
    expect(outsideBound(top, { ...t1, temperature: 1.5 }, 0, 262_144)).toBeGreaterThan(
      outsideBound(top, { ...t1, temperature: 1.5 }, 0, 270),
    )
    expect(outsideBound(top, { ...t1, topP: 0.5 }, 0, 270)).toBe(0)
    expect(outsideBound(top, t1, 2, 270)).toBeGreaterThan(tail)
    // Greedy with penalties large enough to lift a tail token past the top one.
    expect(outsideBound(top, greedy, 6, 270)).toBe(1)
  })

  it('holds for honest sampling: tokens fall outside the top k no more often than bounded', () => {
    fc.assert(
      fc.property(
        fc.array(fc.double({ min: -6, max: 6, noNaN: true }), { minLength: 20, maxLength: 60 }),
        fc.double({ min: 0.05, max: 2, noNaN: true }),
        fc.constantFrom(1, 0.95, 0.8, 0.5),
        (logits, temperature, topP) => {
          const lse = (xs: number[]): number => {
            const m = Math.max(...xs)
            return m + Math.log(xs.reduce((a, x) => a + Math.exp(x - m), 0))
          }
          const z = lse(logits)
          const order = logits.map((l, i) => [l - z, i] as const).sort((a, b) => b[0] - a[0])
          const top = order.slice(0, scoringTopK).map(([l]) => l)
          const topIds = new Set(order.slice(0, scoringTopK).map(([, i]) => i))
          // The engine's sampler: temperature, then top_p over the tempered distribution.
          const tempered = order.map(([l, i]) => [l / temperature, i] as const)
          const tz = lse(tempered.map(([l]) => l))
          const kept: Array<[number, number]> = []
          let mass = 0
          for (const [l, i] of tempered) {
            kept.push([Math.exp(l - tz), i])
            mass += Math.exp(l - tz)
            if (mass >= topP) break
          }
          let outsideMass = 0
          for (const [p, i] of kept) if (!topIds.has(i)) outsideMass += p
          outsideMass /= mass
          const u = outsideBound(
            top,
            { temperature, topP, presencePenalty: 0, frequencyPenalty: 0 },
            0,
            logits.length,
          )
          return outsideMass <= u + 1e-9
        },
      ),
      { numRuns: 500 },
    )
  })

  it('is the binomial tail when the bounds are equal', () => {
    const us = Array(10).fill(0.3)
    let binom = 0
    const c = (n: number, k: number): number => (k === 0 ? 1 : (c(n, k - 1) * (n - k + 1)) / k)
    for (let k = 4; k <= 10; k++) binom += c(10, k) * 0.3 ** k * 0.7 ** (10 - k)
    expect(poissonBinomialTail(us, 4)).toBeCloseTo(binom, 10)
    expect(poissonBinomialTail(us, 0)).toBe(1)
  })

  it('passes answers inside the top k, fails answers outside it, and judges nothing on too few tokens', () => {
    const inside: TokenScore = { logprob: -0.3, rank: 1, top: [-0.3, -2, -3, -4, -5], text: 'a' }
    const outside: TokenScore = { logprob: -9, rank: 6, top: [-0.3, -2, -3, -4, -5], text: 'b' }
    expect(judgeAnswer(Array(30).fill(inside), t1).verdict).toBe('pass')
    const bad = judgeAnswer(Array(30).fill(outside), t1)
    expect(bad).toMatchObject({ verdict: 'fail', outside: 30, tokens: 30 })
    expect(bad.pValue).toBeLessThan(1e-10)
    // Greedy: even a few tokens outside are damning; the floor keeps one from failing an answer.
    expect(judgeAnswer([...Array(29).fill(inside), outside], greedy).verdict).toBe('pass')
    expect(judgeAnswer([...Array(20).fill(inside), ...Array(5).fill(outside)], greedy).verdict).toBe('fail')
    // A token just below the k-th is inside (numeric differences between engines).
    expect(judgeAnswer(Array(30).fill({ ...outside, logprob: -5.05 }), t1).outside).toBe(0)
    expect(judgeAnswer(Array(3).fill(outside), t1).verdict).toBe('inconclusive')
  })
})

describe('the sequential test', () => {
  it('quarantines on three failures close together, and forgets them under passes', () => {
    let llr = 0
    for (let i = 0; i < 2; i++) llr = nextLlr(llr, 'fail')
    expect(llr).toBeLessThan(quarantineLlr)
    expect(nextLlr(llr, 'fail')).toBeGreaterThanOrEqual(quarantineLlr)
    for (let i = 0; i < 200; i++) llr = nextLlr(llr, 'pass')
    expect(llr).toBe(0)
  })
})

describe('regression: a request nested too deeply to serialise again', () => {
  it('is not sampled (buildSample gives null) rather than failing the answer', () => {
    let deep: unknown = 'x'
    for (let i = 0; i < 100_000; i++) deep = [deep]
    const sample = buildSample({
      model: 'm',
      node: 'n',
      endpoint: 'chat',
      request: { messages: [{ role: 'user', content: 'hi' }], metadata: deep },
      output: { text: 'a', finishReason: null },
      requestId: 'r',
      at: 0,
    })
    expect(sample).toBeNull()
    expect(() => parseSample({ v: 1, request: deep })).toThrow(IntegritySampleError)
  })
})
