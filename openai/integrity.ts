/**
 * Result integrity, the parts every hop shares (docs/integrity.md): which answers are checked and
 * what of them is kept (the sample), the verifier's scoring request and how its answer is read, and
 * the per-answer statistic. The head decides what follows (bootstrap/head/integrity.ts).
 *
 * A sample is decided before the answer is relayed (`sampleDecision`); only then is the answer's
 * text captured (`AnswerCapture`, fed by relay.ts), so answers that are not checked cost nothing.
 * The sample is small, plain JSON and bounded (`integritySampleMaxBytes`): whoever relayed the
 * answer (the head today, the federation on the direct path) builds it and hands it to the head.
 *
 * The statistic: the verifier scores the prompt and the answer in one prefill pass and reports,
 * for each answer token, its log-probability and whether it is among the model's top k. An honest
 * node draws each token from the model's distribution as the request's temperature, top_p and
 * penalties shape it; from the verifier's top-k log-probabilities an upper bound u_i on the chance
 * that such a token falls outside the top k follows (no tuning: `outsideBound`). The number of
 * answer tokens outside the top k is then compared with the Poisson-binomial tail of the u_i: an
 * answer fails when that tail is below `answerAlpha`. A node serving another model, a smaller one
 * or random text puts most of its tokens outside the top k; an honest node, by construction, rarely.
 */
import { Buffer } from 'node:buffer'
import { isPlainObject } from '../core/guards.ts'
import { chatCompletionsPath, completionsPath, type ProxiedKind } from './endpoints.ts'

/** Default share of a node's answers that are checked once it is established. */
export const defaultSampleRate = 0.02
/** Share checked while a node is new (its first checks), suspect (a failed check) or appealing. */
export const probationSampleRate = 0.5
/** Largest sample (request and captured answer, as JSON): longer answers are not checked. */
export const integritySampleMaxBytes = 256 * 1024
/** Answer text captured per sample: beyond it the capture gives up (and nothing is checked). */
export const captureMaxBytes = 32 * 1024
/** Alternatives per token the verifier reports (vLLM's default max_logprobs is 20). */
export const scoringTopK = 5
/** Largest vocabulary assumed when the policy does not say (bounds the tail at temperatures above 1). */
export const defaultVocabularySize = 262_144

/**
 * Why an answer cannot be re-scored, or null when it can. Checked: chat and completions without
 * tools, grammar, logit_bias, echo, suffix or several choices (docs/integrity.md says why each).
 */
export function uncheckableReason(kind: ProxiedKind, body: Record<string, unknown>): string | null {
  if (kind !== 'chat' && kind !== 'completion') return 'not a generation'
  if (Array.isArray(body.tools) && body.tools.length > 0 && body.tool_choice !== 'none') return 'tools'
  if (isPlainObject(body.response_format) && body.response_format.type !== 'text') return 'structured output'
  if (body.logit_bias != null && isPlainObject(body.logit_bias) && Object.keys(body.logit_bias).length > 0)
    return 'logit_bias'
  if (body.n != null && body.n !== 1) return 'several choices'
  if (body.echo === true) return 'echo'
  if (body.suffix != null) return 'suffix'
  if (kind === 'completion' && typeof body.prompt !== 'string') return 'prompt is not one string'
  return null
}

/**
 * Whether to check this answer: `rate` is the node's current sampling rate (the head's
 * IntegrityChecker.rateFor). Decided before relaying, so only sampled answers are captured.
 */
export function sampleDecision(
  kind: ProxiedKind,
  body: Record<string, unknown>,
  rate: number,
  random: () => number = Math.random,
): boolean {
  if (!(rate > 0)) return false
  if (uncheckableReason(kind, body) != null) return false
  return random() < rate
}

/** What a node answered, as its client received it (choice 0). */
export interface CapturedOutput {
  text: string
  finishReason: string | null
}

/**
 * Collects the text of choice 0 from an answer being relayed: SSE events (`feedEvent`) or a whole
 * body (`feedBody`). Bounded: past captureMaxBytes it stops and `output()` is null.
 */
export class AnswerCapture {
  #parts: string[] = []
  #bytes = 0
  #overflow = false
  #finish: string | null = null
  #failed = false

  /** One SSE event's data (relay.ts calls it for sampled answers only). */
  feedEvent(data: string | null): void {
    if (data == null || data === '[DONE]' || this.#overflow) return
    let chunk: unknown
    try {
      chunk = JSON.parse(data)
    } catch {
      this.#failed = true
      return
    }
    if (!isPlainObject(chunk)) return
    if (chunk.error != null) this.#failed = true
    this.#choices(chunk.choices, 'delta')
  }

  /** A non-streamed answer's parsed JSON. */
  feedBody(json: unknown): void {
    if (!isPlainObject(json)) {
      this.#failed = true
      return
    }
    this.#choices(json.choices, 'message')
  }

  #choices(choices: unknown, field: 'delta' | 'message'): void {
    if (!Array.isArray(choices)) return
    for (const choice of choices) {
      if (!isPlainObject(choice) || (choice.index ?? 0) !== 0) continue
      const m = choice[field]
      const text = typeof choice.text === 'string' ? choice.text : isPlainObject(m) ? m.content : null
      if (isPlainObject(m) && Array.isArray(m.tool_calls) && m.tool_calls.length > 0) this.#failed = true
      if (typeof text === 'string' && text !== '') this.#push(text)
      if (typeof choice.finish_reason === 'string') this.#finish = choice.finish_reason
    }
  }

  #push(text: string): void {
    this.#bytes += Buffer.byteLength(text)
    if (this.#bytes > captureMaxBytes) {
      this.#overflow = true
      this.#parts = []
      return
    }
    this.#parts.push(text)
  }

  /** The captured answer; null when there is nothing to check (empty, too long, an error, a tool call). */
  output(): CapturedOutput | null {
    if (this.#overflow || this.#failed) return null
    const text = this.#parts.join('')
    if (text === '') return null
    return { text, finishReason: this.#finish }
  }
}

/** One checked answer: what the node was asked and what it answered. Plain JSON, bounded. */
export interface IntegritySample {
  v: 1
  model: string
  /** The PeerId of the node that served it. */
  node: string
  /** Who runs the node, where known (today: its PeerId; docs/integrity.md). */
  operator?: string
  endpoint: 'chat' | 'completion'
  /** The JSON body the node received. */
  request: Record<string, unknown>
  output: CapturedOutput
  requestId: string
  /** Milliseconds since the epoch, when the answer ended. */
  at: number
}

export class IntegritySampleError extends Error {
  override name = 'IntegritySampleError'
}

/**
 * Builds a sample; null when it would exceed integritySampleMaxBytes, or cannot be serialised (a
 * request nested thousands of levels deep: JSON.parse took it, JSON.stringify runs out of stack).
 */
export function buildSample(init: Omit<IntegritySample, 'v'>): IntegritySample | null {
  const sample: IntegritySample = { v: 1, ...init }
  let json: string
  try {
    json = JSON.stringify(sample)
  } catch {
    return null
  }
  return Buffer.byteLength(json) > integritySampleMaxBytes ? null : sample
}

/** Checks a sample received from elsewhere (the federation on the direct path); throws IntegritySampleError. */
export function parseSample(value: unknown): IntegritySample {
  const fail = (why: string): never => {
    throw new IntegritySampleError(`integrity sample: ${why}`)
  }
  if (!isPlainObject(value)) return fail('not an object')
  let json = ''
  try {
    json = JSON.stringify(value)
  } catch {
    fail('cannot be serialised (nested too deeply)')
  }
  if (Buffer.byteLength(json) > integritySampleMaxBytes) fail(`over ${integritySampleMaxBytes} bytes`)
  const v = value
  if (v.v !== 1) fail('v must be 1')
  for (const key of ['model', 'node', 'requestId'] as const)
    if (typeof v[key] !== 'string' || v[key] === '' || (v[key] as string).length > 256)
      fail(`${key} must be a string of 1-256 characters`)
  if (v.operator != null && typeof v.operator !== 'string') fail('operator must be a string')
  if (v.endpoint !== 'chat' && v.endpoint !== 'completion') fail('endpoint must be chat or completion')
  if (!isPlainObject(v.request)) fail('request must be an object')
  const out = v.output
  if (!isPlainObject(out) || typeof out.text !== 'string' || out.text === '')
    fail('output.text must be a non-empty string')
  const o = out as Record<string, unknown>
  if (o.finishReason != null && typeof o.finishReason !== 'string')
    fail('output.finishReason must be a string')
  if (typeof v.at !== 'number' || !Number.isFinite(v.at)) fail('at must be a number')
  const reason = uncheckableReason(v.endpoint as 'chat' | 'completion', v.request as Record<string, unknown>)
  if (reason != null) fail(`the request cannot be checked (${reason})`)
  return value as unknown as IntegritySample
}

/**
 * The verifier's call, in vLLM's scoring form (the embedded engine speaks it too): the prompt and
 * the answer scored in one prefill, `prompt_logprobs` alternatives per token, `max_tokens` 1 (vLLM
 * needs at least one; the embedded engine generates none). Chat: the answer is the final assistant
 * message, continued (`continue_final_message`), so it is read under the model's own chat template
 * exactly where the serving node generated it.
 */
export function scoringRequest(sample: IntegritySample): { path: string; body: Record<string, unknown> } {
  const common = {
    model: sample.model,
    max_tokens: 1,
    temperature: 0,
    prompt_logprobs: scoringTopK,
    return_token_ids: true,
  }
  if (sample.endpoint === 'chat') {
    const messages = Array.isArray(sample.request.messages) ? sample.request.messages : []
    return {
      path: chatCompletionsPath,
      body: {
        ...common,
        messages: [...messages, { role: 'assistant', content: sample.output.text }],
        continue_final_message: true,
        add_generation_prompt: false,
      },
    }
  }
  return {
    path: completionsPath,
    body: { ...common, prompt: String(sample.request.prompt ?? '') + sample.output.text },
  }
}

/** One answer token as the verifier scored it. */
export interface TokenScore {
  logprob: number
  /** 1 = the model's most likely token; k + 1 or more: outside the top k. */
  rank: number
  /** The top-k log-probabilities at this position, highest first. */
  top: number[]
  /** The token's text (penalties count repeats by it). */
  text: string
}

export class ScoringAnswerError extends Error {
  override name = 'ScoringAnswerError'
}

/**
 * The answer's tokens from a scoring answer (`prompt_logprobs` and `prompt_token_ids`): the last
 * tokens whose text adds up to the answer's bytes. A token that straddles the prompt and the answer
 * is left out (only whole answer tokens are judged).
 */
export function readScores(answer: unknown, outputText: string): TokenScore[] {
  if (!isPlainObject(answer)) throw new ScoringAnswerError('the scoring answer is not an object')
  const lps = answer.prompt_logprobs
  const ids = answer.prompt_token_ids
  if (!Array.isArray(lps) || !Array.isArray(ids) || lps.length !== ids.length || lps.length === 0)
    throw new ScoringAnswerError(
      'the scoring answer has no prompt_logprobs and prompt_token_ids of one length',
    )
  let need = Buffer.byteLength(outputText)
  const out: TokenScore[] = []
  for (let i = lps.length - 1; i > 0 && need > 0; i--) {
    const entry = lps[i]
    const own = isPlainObject(entry) ? entry[String(ids[i])] : null
    if (!isPlainObject(entry) || !isPlainObject(own) || typeof own.logprob !== 'number')
      throw new ScoringAnswerError(`prompt_logprobs[${i}] does not score its token`)
    const text = typeof own.decoded_token === 'string' ? own.decoded_token : ''
    need -= Buffer.byteLength(text)
    if (need < 0) break
    const top = Object.values(entry)
      .filter(isPlainObject)
      .filter((e) => typeof e.rank === 'number' && (e.rank as number) <= scoringTopK)
      .map((e) => Number(e.logprob))
      .filter(Number.isFinite)
      .sort((a, b) => b - a)
    out.push({
      logprob: Number.isFinite(own.logprob) ? own.logprob : -1e9,
      rank: typeof own.rank === 'number' ? own.rank : scoringTopK + 1,
      top,
      text,
    })
  }
  return out.reverse()
}

/** What shaped an honest node's sampling, read from the request it received. */
export interface SamplingParams {
  temperature: number
  topP: number
  presencePenalty: number
  frequencyPenalty: number
}

export function samplingOf(request: Record<string, unknown>): SamplingParams {
  const num = (key: string, fallback: number): number => {
    const v = request[key]
    return typeof v === 'number' && Number.isFinite(v) ? v : fallback
  }
  return {
    temperature: Math.max(0, num('temperature', 1)),
    topP: Math.min(1, Math.max(0, num('top_p', 1))),
    presencePenalty: num('presence_penalty', 0),
    frequencyPenalty: num('frequency_penalty', 0),
  }
}

export interface JudgeOptions {
  /** Tokens the model knows (the tail bound at temperatures above 1 grows with it). */
  vocabularySize?: number
  /** A token this close (nats) below the k-th counts as inside: numeric differences between engines. */
  marginNats?: number
  /** Least chance of a token outside, whatever the bound: re-tokenisation, numeric differences. */
  floor?: number
  /** An answer fails when its count of tokens outside is this unlikely for an honest node. */
  alpha?: number
  /** Fewer judged tokens than this: inconclusive. */
  minTokens?: number
}

export const judgeDefaults: Required<JudgeOptions> = Object.freeze({
  vocabularySize: defaultVocabularySize,
  marginNats: 0.1,
  floor: 0.01,
  alpha: 1e-4,
  minTokens: 4,
})

export type AnswerVerdict = 'pass' | 'fail' | 'inconclusive'

export interface AnswerJudgement {
  verdict: AnswerVerdict
  /** Answer tokens judged. */
  tokens: number
  /** Of them, outside the verifier's top k. */
  outside: number
  /** Σ u_i: the most an honest node is expected to put outside. */
  expectedOutside: number
  /** P(at least `outside` outside | honest): the Poisson-binomial tail of the bounds. */
  pValue: number
  /** Mean log-probability of the answer's tokens under the verifier. */
  meanLogprob: number
}

/**
 * The chance, at most, that an honest node's token at this position falls outside the top k:
 * u = W_tail / (W_top + W_tail) with W the tempered weights p^(1/T), the tail's weight bounded from
 * its mass R = 1 − Σ top (each tail token at most the k-th's probability; spread thin over the
 * vocabulary at T > 1, where p^(1/T) is concave), penalties letting the tail gain up to `shift`
 * nats, and 0 when top_p is reached inside the top k.
 */
export function outsideBound(
  top: number[],
  s: SamplingParams,
  shift: number,
  vocabularySize: number,
): number {
  if (top.length === 0) return 1
  const T = s.temperature
  if (T <= 1e-6) {
    // Greedy: the token is the top one, unless penalties lift another past it.
    return shift > 0 && top.length > 1 && top[0]! - top.at(-1)! < shift ? 1 : 0
  }
  const probs = top.map((lp) => Math.exp(lp))
  const mass = probs.reduce((a, b) => a + b, 0)
  const tail = Math.max(0, 1 - mass)
  if (tail === 0) return 0
  const inv = 1 / T
  const wTop = probs.reduce((a, p) => a + p ** inv, 0)
  const pk = probs.at(-1)!
  const others = Math.max(1, vocabularySize - top.length)
  let wTail: number
  if (T >= 1) wTail = Math.min(others * (tail / others) ** inv, others * pk ** inv)
  else wTail = (tail / pk) * pk ** inv
  wTail *= Math.exp(shift / T)
  const u = wTail / (wTop + wTail)
  // Nucleus sampling: when the top k already hold top_p of the tempered mass, the tail is cut.
  if (s.topP < 1 && 1 - u >= s.topP) return 0
  return Math.min(1, u)
}

/** P(X ≥ x) for X a sum of independent Bernoulli(u_i). */
export function poissonBinomialTail(us: number[], x: number): number {
  if (x <= 0) return 1
  // dist[j] = P(j successes so far), j capped at x (the tail is what we want).
  let dist = new Float64Array(x + 1)
  dist[0] = 1
  for (const u of us) {
    const next = new Float64Array(x + 1)
    for (let j = 0; j <= x; j++) {
      const p = dist[j]!
      if (p === 0) continue
      next[j]! += p * (1 - u)
      next[Math.min(x, j + 1)]! += p * u
    }
    dist = next
  }
  return dist[x]!
}

/** The per-answer statistic (the file comment). */
export function judgeAnswer(
  scores: TokenScore[],
  sampling: SamplingParams,
  options: JudgeOptions = {},
): AnswerJudgement {
  const o = { ...judgeDefaults, ...options }
  const counts = new Map<string, number>()
  const us: number[] = []
  let outside = 0
  let sum = 0
  const pen = Math.abs(sampling.presencePenalty)
  const freq = Math.abs(sampling.frequencyPenalty)
  let most = 0
  for (const score of scores) {
    // Penalties lower (or raise) tokens already in the answer: the tail may gain this much.
    const shift = pen > 0 || freq > 0 ? (counts.size > 0 ? pen + freq * most : 0) : 0
    const u = Math.max(o.floor, outsideBound(score.top, sampling, shift, o.vocabularySize))
    us.push(u)
    const kth = score.top.at(-1) ?? Number.POSITIVE_INFINITY
    const inside = score.rank <= scoringTopK || score.logprob >= kth - o.marginNats
    if (!inside) outside++
    sum += score.logprob
    const c = (counts.get(score.text) ?? 0) + 1
    counts.set(score.text, c)
    if (c > most) most = c
  }
  const tokens = scores.length
  const pValue = poissonBinomialTail(us, outside)
  return {
    verdict: tokens < o.minTokens ? 'inconclusive' : pValue < o.alpha ? 'fail' : 'pass',
    tokens,
    outside,
    expectedOutside: us.reduce((a, b) => a + b, 0),
    pValue,
    meanLogprob: tokens > 0 ? sum / tokens : 0,
  }
}
