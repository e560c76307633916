import type { LlamaEmbeddingContext, LlamaModel, Token } from 'node-llama-cpp'
import { apiError } from '../../../core/errors.ts'
import type { EmbeddedEngineMetrics } from './metrics.ts'
import type { EmbeddingRequest } from './request.ts'
import type { SlotPool } from './sequences.ts'

/**
 * /v1/embeddings on the embedded engine: one vector per input from node-llama-cpp's embedding
 * context (the pooling the GGUF names: mean for `garage model tiny --embedding`, the last token
 * when it names none), scaled to unit length as OpenAI's are, as floats or base64 (little-endian
 * float32, what the openai SDK asks for by default).
 */
export class Embedder {
  readonly #model: LlamaModel
  readonly #pool: SlotPool<LlamaEmbeddingContext>
  readonly #metrics: EmbeddedEngineMetrics
  readonly #servedModelName: string
  readonly #contextTokens: number

  constructor(init: {
    model: LlamaModel
    pool: SlotPool<LlamaEmbeddingContext>
    metrics: EmbeddedEngineMetrics
    servedModelName: string
    contextTokens: number
  }) {
    this.#model = init.model
    this.#pool = init.pool
    this.#metrics = init.metrics
    this.#servedModelName = init.servedModelName
    this.#contextTokens = init.contextTokens
  }

  /** Dimensions of this model's vectors. */
  get dimensions(): number {
    return this.#model.embeddingVectorSize
  }

  async embed(req: EmbeddingRequest, signal: AbortSignal): Promise<Record<string, unknown>> {
    if (req.dimensions != null && req.dimensions !== this.dimensions)
      throw apiError(
        'unsupported_value',
        `this model's embeddings have ${this.dimensions} dimensions and it was not trained to be cut shorter; leave dimensions out`,
        { param: 'dimensions' },
      )
    const inputs = req.inputs.map((input) =>
      typeof input === 'string' ? this.#model.tokenize(input, false) : (input as Token[]),
    )
    const slot = await this.#pool.acquire(signal)
    try {
      const context = slot.value
      const data: Array<Record<string, unknown>> = []
      let promptTokens = 0
      for (const [index, tokens] of inputs.entries()) {
        const length = context.calculateInputLength(tokens)
        if (length >= this.#contextTokens)
          throw apiError(
            'context_length_exceeded',
            `input[${index}] is ${length} tokens; this engine embeds at most ${this.#contextTokens - 1}`,
            { param: 'input' },
          )
        signal.throwIfAborted()
        const { vector } = await context.getEmbeddingFor(tokens)
        promptTokens += length
        data.push({ object: 'embedding', index, embedding: encode(unit(vector), req.encoding) })
      }
      this.#metrics.prompted.inc(promptTokens)
      return {
        object: 'list',
        data,
        model: this.#servedModelName,
        usage: { prompt_tokens: promptTokens, total_tokens: promptTokens },
      }
    } finally {
      this.#pool.release(slot)
    }
  }
}

function unit(vector: readonly number[]): Float32Array {
  let norm = 0
  for (const x of vector) norm += x * x
  norm = Math.sqrt(norm)
  const out = new Float32Array(vector.length)
  for (let i = 0; i < vector.length; i++) out[i] = norm > 0 ? vector[i]! / norm : 0
  return out
}

function encode(vector: Float32Array, encoding: 'float' | 'base64'): number[] | string {
  if (encoding === 'float') return Array.from(vector)
  // Float32Array is little-endian on every platform Node runs on; spell it out anyway.
  const bytes = Buffer.alloc(vector.length * 4)
  for (let i = 0; i < vector.length; i++) bytes.writeFloatLE(vector[i]!, i * 4)
  return bytes.toString('base64')
}
