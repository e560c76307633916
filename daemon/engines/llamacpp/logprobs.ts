import type { LlamaContextSequence, LlamaModel, Token } from 'node-llama-cpp'

/**
 * Log-probabilities in OpenAI's shapes over node-llama-cpp.
 *
 * Generated tokens: the sequence is asked for the distribution each token was sampled from
 * (`evaluateWithMetadata`). node-llama-cpp gives it after the whole sampler chain (logit_bias,
 * penalties, top_p, temperature, the grammar). At temperature 0 and 1 with top_p 1 that is the
 * model's own distribution; at other temperatures, with top_p 1, the model's is recovered exactly
 * (p_raw ∝ p^(T)); with top_p < 1 or a grammar the reported values are those of the truncated
 * distribution the token was drawn from (docs/api.md says so).
 *
 * Prompt tokens (completions `echo`): scored in one prefill pass with the raw distribution
 * (`controlledEvaluate`), without generating.
 */

/** One generated token as the sequence reported it. */
export interface SampledToken {
  token: Token
  /** Probability of `token` in the distribution it was drawn from. */
  confidence?: number
  /** That distribution, highest first (only when asked for). */
  probabilities?: Map<Token, number>
}

export interface TokenLogprob {
  token: Token
  logprob: number
  top: Array<[Token, number]>
}

/** The exact bytes of each token, from the GGUF vocabulary (detokenizing one token loses partial UTF-8). */
export function tokenBytes(model: LlamaModel): (token: Token) => Uint8Array {
  const ggml = (
    model.fileInfo.metadata as unknown as {
      tokenizer?: { ggml?: { tokens?: readonly string[]; model?: string } }
    }
  ).tokenizer?.ggml
  const pieces = ggml?.tokens ?? []
  const kind = ggml?.model
  let unicodeToByte: Map<string, number> | null = null
  if (kind === 'gpt2') {
    // The byte-level BPE alphabet: printable bytes stand for themselves, the rest from U+0100 on.
    unicodeToByte = new Map()
    let next = 256
    for (let b = 0; b < 256; b++) {
      const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)
      unicodeToByte.set(String.fromCodePoint(printable ? b : next++), b)
    }
  }
  const cache = new Map<Token, Uint8Array>()
  return (token) => {
    let out = cache.get(token)
    if (out != null) return out
    const piece = pieces[token] ?? ''
    if (model.isSpecialToken(token)) out = Buffer.from(piece, 'utf8')
    else if (unicodeToByte != null)
      out = Uint8Array.from([...piece].map((ch) => unicodeToByte.get(ch) ?? 0x3f))
    else if (kind === 'llama' && /^<0x[0-9A-Fa-f]{2}>$/.test(piece))
      out = Uint8Array.of(Number.parseInt(piece.slice(3, 5), 16))
    else if (kind === 'llama') out = Buffer.from(piece.replaceAll('\u2581', ' '), 'utf8')
    else out = Buffer.from(model.detokenize([token], true), 'utf8')
    if (cache.size < 65_536) cache.set(token, out)
    return out
  }
}

/**
 * The sequence as LlamaCompletion or LlamaChat sees it, except that each token it samples is also
 * reported to `onSample` with the metadata asked for. (evaluate() calls evaluateWithMetadata on
 * `this`, so this one method serves both.)
 */
export function recordingSequence(
  sequence: LlamaContextSequence,
  metadata: { confidence?: boolean; probabilities?: boolean },
  onSample: (sample: SampledToken) => void,
): LlamaContextSequence {
  const evaluateWithMetadata = async function* (
    tokens: Token[],
    _metadata: unknown,
    options?: Parameters<LlamaContextSequence['evaluateWithMetadata']>[2],
  ): AsyncGenerator<SampledToken, void, Token | Token[] | undefined> {
    const inner = sequence.evaluateWithMetadata(tokens, metadata, options) as AsyncGenerator<
      SampledToken,
      void,
      Token | Token[] | undefined
    >
    let input: Token | Token[] | undefined
    try {
      while (true) {
        const { value, done } = await inner.next(input as Token)
        if (done) return
        onSample(value)
        input = yield value
      }
    } finally {
      await inner.return()
    }
  }
  return new Proxy(sequence, {
    get: (target, key, receiver) =>
      key === 'evaluateWithMetadata' ? evaluateWithMetadata : Reflect.get(target, key, receiver),
  })
}

/**
 * A sampled token's logprob and its `top` alternatives. `temperature` undoes the temperature when the
 * whole distribution is there (top_p 1, no grammar).
 */
export function sampledLogprob(
  sample: SampledToken,
  top: number,
  init: { temperature: number; exact: boolean },
): TokenLogprob {
  const probs = sample.probabilities
  const log = (p: number): number => (p > 0 ? Math.log(p) : -9999)
  const t = init.temperature
  if (probs != null && init.exact && t > 0 && t !== 1) {
    // p_raw(x) = p(x)^T / Σ p^T: the temperature divided the logits, this multiplies them back.
    let sum = 0
    for (const p of probs.values()) if (p > 0) sum += p ** t
    const raw = (p: number): number => (p > 0 ? t * Math.log(p) - Math.log(sum) : -9999)
    const chosen = probs.get(sample.token) ?? sample.confidence ?? 0
    return {
      token: sample.token,
      logprob: raw(chosen),
      top: firstOf(probs, top).map(([k, p]) => [k, raw(p)]),
    }
  }
  const chosen = sample.confidence ?? probs?.get(sample.token) ?? 0
  return {
    token: sample.token,
    logprob: log(chosen),
    top: probs != null ? firstOf(probs, top).map(([k, p]) => [k, log(p)]) : [],
  }
}

function firstOf(probs: Map<Token, number>, n: number): Array<[Token, number]> {
  const out: Array<[Token, number]> = []
  if (n <= 0) return out
  for (const entry of probs) {
    out.push(entry)
    if (out.length >= n) break
  }
  return out
}

/**
 * Scores `tokens` without generating: the logprob of each token after the first given the ones
 * before it, with its `top` alternatives, from the model's raw distribution. The sequence must be
 * empty; it holds `tokens` afterwards.
 */
export async function scoreTokens(
  sequence: LlamaContextSequence,
  tokens: Token[],
  top: number,
): Promise<Array<TokenLogprob | null>> {
  const input = tokens.map((t, i) =>
    i + 1 < tokens.length
      ? ([
          t,
          {
            generateNext: {
              logits: { filter: { tokens: [tokens[i + 1]!], includeTop: Math.max(1, top) } },
              totalLogitWeight: true,
            },
          },
        ] as const)
      : t,
  )
  const out = await sequence.controlledEvaluate(
    input as Parameters<LlamaContextSequence['controlledEvaluate']>[0],
  )
  const scored: Array<TokenLogprob | null> = [null]
  for (let i = 0; i + 1 < tokens.length; i++) {
    const next = out[i]?.next as { logits?: Map<Token, number>; totalLogitWeight?: number } | undefined
    const logits = next?.logits
    if (logits == null || next?.totalLogitWeight == null) {
      scored.push(null)
      continue
    }
    // totalLogitWeight is Σ exp(logit - max); the map is sorted, highest logit first.
    const max = logits.values().next().value as number
    const lse = max + Math.log(next.totalLogitWeight)
    const token = tokens[i + 1]!
    scored.push({
      token,
      logprob: (logits.get(token) ?? Number.NEGATIVE_INFINITY) - lse,
      top: [...logits].slice(0, top).map(([k, l]) => [k, l - lse] as [Token, number]),
    })
  }
  return scored
}
