import { randomBytes } from 'node:crypto'
import { access, link, rename, rm } from 'node:fs/promises'
import { GarageError } from '../../../core/errors.ts'
import { type GgufFile, type GgufMetadataValue, type GgufTensor, writeGgufFile } from './gguf.ts'

/**
 * A llama-architecture model the project makes itself, so tests and demos need no download:
 * random F32 weights from a seeded PRNG (same seed and options, byte-identical file) and a
 * byte-level gpt2 tokenizer that encodes any UTF-8 text. It generates printable ASCII gibberish,
 * fast, always up to the token limit.
 */

export interface TinyModelOptions {
  /** uint32; default 1. */
  seed?: number
  /** n_embd; default 64. */
  embeddingLength?: number
  /** Transformer blocks; default 2. */
  layers?: number
  /** Attention heads; default 4. */
  heads?: number
  /** Key/value heads (grouped-query attention); default = heads. */
  kvHeads?: number
  /** n_ff; default 128. */
  feedForwardLength?: number
  /** Context the model says it was trained for; default 256. */
  contextLength?: number
  /** Embed a ChatML Jinja template in tokenizer.chat_template; default true. */
  chatTemplate?: boolean
  /**
   * An embedding model: `llama.pooling_type` mean, so llama.cpp averages the tokens' states into
   * one vector (without it, a llama model embeds with its last token); default false.
   */
  embedding?: boolean
  /**
   * Multiplies output.weight's random part: 1 (the default) leaves the next-token distribution
   * nearly flat over the printable tokens (about 4.6 nats); 16 makes it peaked like a trained
   * model's (about 1.5 nats at temperature 1), which the integrity tests need to tell models apart.
   */
  logitScale?: number
}

export type ResolvedTinyModelOptions = Required<TinyModelOptions>

export const tinyModelDefaults: Readonly<Omit<ResolvedTinyModelOptions, 'kvHeads'>> = Object.freeze({
  seed: 1,
  embeddingLength: 64,
  layers: 2,
  heads: 4,
  feedForwardLength: 128,
  contextLength: 4096,
  chatTemplate: true,
  embedding: false,
  logitScale: 1,
})

type SizeOption = Exclude<keyof TinyModelOptions, 'chatTemplate' | 'embedding' | 'logitScale'>

/** Inclusive bounds for each size; the parameter count is capped too (maxTinyModelParameters). */
export const tinyModelLimits: Readonly<Record<SizeOption, readonly [number, number]>> = Object.freeze({
  seed: [0, 0xffff_ffff],
  embeddingLength: [8, 8192],
  layers: [1, 256],
  heads: [1, 256],
  kvHeads: [1, 256],
  feedForwardLength: [1, 65_536],
  contextLength: [16, 1_048_576],
})

/** 512M parameters: a 2 GiB F32 file, far past tiny but useful for load and disk tests. */
export const maxTinyModelParameters = 512 * 1024 * 1024

/** An option out of range or inconsistent with another; `option` names which. */
export class TinyModelOptionsError extends GarageError {
  readonly option: SizeOption
  readonly detail: string

  constructor(option: SizeOption, detail: string) {
    super(`${option} ${detail}`, 'TINY_MODEL_OPTIONS')
    this.option = option
    this.detail = detail
  }
}

export class TinyModelExistsError extends GarageError {
  constructor(path: string) {
    super(`${path} already exists`, 'TINY_MODEL_EXISTS')
  }
}

/** Fills in defaults and checks every size; throws TinyModelOptionsError. */
export function resolveTinyModelOptions(options: TinyModelOptions = {}): ResolvedTinyModelOptions {
  const heads = options.heads ?? tinyModelDefaults.heads
  const o: ResolvedTinyModelOptions = {
    ...tinyModelDefaults,
    ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)),
    heads,
    kvHeads: options.kvHeads ?? heads,
  }
  for (const [option, [min, max]] of Object.entries(tinyModelLimits) as [SizeOption, [number, number]][]) {
    const v = o[option]
    if (!Number.isInteger(v) || v < min || v > max)
      throw new TinyModelOptionsError(option, `must be an integer from ${min} to ${max}, not ${v}`)
  }
  if (o.embeddingLength % o.heads !== 0)
    throw new TinyModelOptionsError(
      'embeddingLength',
      `(${o.embeddingLength}) must be a multiple of heads (${o.heads})`,
    )
  // RoPE rotates pairs of dimensions: each head needs an even size.
  if ((o.embeddingLength / o.heads) % 2 !== 0)
    throw new TinyModelOptionsError(
      'embeddingLength',
      `/ heads (${o.embeddingLength}/${o.heads}) must be even (the head size RoPE rotates in pairs)`,
    )
  if (o.kvHeads > o.heads || o.heads % o.kvHeads !== 0)
    throw new TinyModelOptionsError('kvHeads', `(${o.kvHeads}) must divide heads (${o.heads})`)
  if (typeof o.chatTemplate !== 'boolean') throw new GarageError('chatTemplate must be a boolean')
  if (typeof o.embedding !== 'boolean') throw new GarageError('embedding must be a boolean')
  if (typeof o.logitScale !== 'number' || !(o.logitScale > 0 && o.logitScale <= 1000))
    throw new GarageError(`logitScale must be a number above 0 and at most 1000, not ${o.logitScale}`)
  const parameters = tinyModelParameterCount(o)
  if (parameters > maxTinyModelParameters)
    throw new TinyModelOptionsError(
      'embeddingLength',
      `and the other sizes make ${parameters} parameters; at most ${maxTinyModelParameters} are allowed`,
    )
  return o
}

/** GPT-2's byte → printable character table (bytes_to_unicode), so every byte is one visible token. */
export function gpt2ByteToUnicode(): string[] {
  const printable = (b: number): boolean =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)
  const table: string[] = []
  let next = 256
  for (let b = 0; b < 256; b++) table.push(String.fromCodePoint(printable(b) ? b : next++))
  return table
}

/** Merges in rank order; each merged token follows the 256 byte tokens in this order. */
export const tinyModelMerges: readonly string[] = Object.freeze([
  'Ġ t',
  'h e',
  'Ġ a',
  'i n',
  'Ġt he',
  'e r',
  'o n',
  'r e',
])

export const tinyModelSpecialTokens = Object.freeze({
  endOfText: '<|endoftext|>',
  imStart: '<|im_start|>',
  imEnd: '<|im_end|>',
  // Fill-in-the-middle (completions with `suffix`), named as llama.cpp looks them up.
  fimPrefix: '<fim_prefix>',
  fimSuffix: '<fim_suffix>',
  fimMiddle: '<fim_middle>',
})

/** ChatML, as Qwen and many others use it. */
export const tinyModelChatTemplate =
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

/** llama.cpp's llama_token_type. */
const tokenTypeNormal = 1
const tokenTypeControl = 3

export interface TinyModelVocabulary {
  tokens: string[]
  tokenTypes: number[]
  merges: string[]
  endOfTextId: number
  imStartId: number
  imEndId: number
  fimPrefixId: number
  fimSuffixId: number
  fimMiddleId: number
}

export function tinyModelVocabulary(): TinyModelVocabulary {
  const tokens = gpt2ByteToUnicode()
  for (const merge of tinyModelMerges) tokens.push(merge.replace(' ', ''))
  const tokenTypes = tokens.map(() => tokenTypeNormal)
  const special = (text: string): number => {
    tokens.push(text)
    tokenTypes.push(tokenTypeControl)
    return tokens.length - 1
  }
  return {
    endOfTextId: special(tinyModelSpecialTokens.endOfText),
    imStartId: special(tinyModelSpecialTokens.imStart),
    imEndId: special(tinyModelSpecialTokens.imEnd),
    fimPrefixId: special(tinyModelSpecialTokens.fimPrefix),
    fimSuffixId: special(tinyModelSpecialTokens.fimSuffix),
    fimMiddleId: special(tinyModelSpecialTokens.fimMiddle),
    tokens,
    tokenTypes,
    merges: [...tinyModelMerges],
  }
}

const vocabularySize = 256 + tinyModelMerges.length + Object.keys(tinyModelSpecialTokens).length

interface TensorSpec {
  name: string
  dims: [number] | [number, number]
  norm?: true
}

function tensorSpecs(o: ResolvedTinyModelOptions): TensorSpec[] {
  const embd = o.embeddingLength
  const kv = (embd / o.heads) * o.kvHeads
  const ff = o.feedForwardLength
  const specs: TensorSpec[] = [
    { name: 'token_embd.weight', dims: [embd, vocabularySize] },
    { name: 'output_norm.weight', dims: [embd], norm: true },
    { name: 'output.weight', dims: [embd, vocabularySize] },
  ]
  for (let i = 0; i < o.layers; i++) {
    const blk = (part: string): string => `blk.${i}.${part}.weight`
    specs.push(
      { name: blk('attn_norm'), dims: [embd], norm: true },
      { name: blk('attn_q'), dims: [embd, embd] },
      { name: blk('attn_k'), dims: [embd, kv] },
      { name: blk('attn_v'), dims: [embd, kv] },
      { name: blk('attn_output'), dims: [embd, embd] },
      { name: blk('ffn_norm'), dims: [embd], norm: true },
      { name: blk('ffn_gate'), dims: [embd, ff] },
      { name: blk('ffn_up'), dims: [embd, ff] },
      { name: blk('ffn_down'), dims: [ff, embd] },
    )
  }
  return specs
}

export function tinyModelParameterCount(options: TinyModelOptions = {}): number {
  const o = {
    ...tinyModelDefaults,
    ...options,
    kvHeads: options.kvHeads ?? options.heads ?? tinyModelDefaults.heads,
  }
  return tensorSpecs(o).reduce((n, t) => n + t.dims.reduce((a, b) => a * b, 1), 0)
}

/** FNV-1a, to give each tensor its own PRNG stream (weights do not depend on tensor order). */
function fnv1a(text: string): number {
  let h = 0x811c9dc5
  for (const b of new TextEncoder().encode(text)) h = Math.imul(h ^ b, 0x01000193)
  return h >>> 0
}

/** xoshiro128** seeded through splitmix32: fast, 32-bit integer math only, so identical everywhere. */
export function seededUint32(seed: number): () => number {
  let sm = seed >>> 0
  const splitmix32 = (): number => {
    sm = (sm + 0x9e3779b9) | 0
    let z = sm
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b)
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35)
    return (z ^ (z >>> 16)) >>> 0
  }
  let a = splitmix32()
  let b = splitmix32()
  let c = splitmix32()
  let d = splitmix32()
  return () => {
    const r = Math.imul(rotl(Math.imul(b, 5), 7), 9)
    const t = b << 9
    c ^= a
    d ^= b
    b ^= c
    a ^= d
    c ^= t
    d = rotl(d, 11)
    return r >>> 0
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k))
}

/**
 * Printable ASCII bytes and the merges (all ASCII): the tokens the bias channel favours, so the
 * gibberish is readable, whole UTF-8 at any temperature, and no end-of-generation token ends it early.
 */
function isFavouredToken(id: number): boolean {
  return (id >= 0x20 && id <= 0x7e) || (id >= 256 && id < 256 + tinyModelMerges.length)
}

/** What every token embeds in residual dimension 0, and how strongly output.weight reads it. */
const biasChannelValue = 0.1
const biasLogitWeight = 20

/**
 * Uniform in ±0.5/sqrt(fan_in), fan_in = ne[0], so activations stay near unit size; norms are 1.
 * Residual dimension 0 is a bias channel: every token embeds the same constant there, no layer
 * writes to it, and output.weight reads it as a per-token logit bias (+ for favoured tokens).
 */
function randomWeights(seed: number, spec: TensorSpec, logitScale = 1): Float32Array {
  const [fanIn, rows = 1] = spec.dims
  const out = new Float32Array(fanIn * rows)
  if (spec.norm) return out.fill(1)
  const next = seededUint32((seed ^ fnv1a(spec.name)) >>> 0)
  const bound = (0.5 / Math.sqrt(fanIn)) * (spec.name === 'output.weight' ? logitScale : 1)
  for (let i = 0; i < out.length; i++) out[i] = (next() / 0x1_0000_0000) * 2 * bound - bound
  if (spec.name === 'token_embd.weight') for (let r = 0; r < rows; r++) out[r * fanIn] = biasChannelValue
  else if (spec.name === 'output.weight')
    for (let r = 0; r < rows; r++) out[r * fanIn] = isFavouredToken(r) ? biasLogitWeight : -biasLogitWeight
  else if (spec.name.endsWith('.attn_output.weight') || spec.name.endsWith('.ffn_down.weight'))
    out.fill(0, 0, fanIn) // output row 0: leave the bias channel alone
  return out
}

/** The model as a GGUF description; tensor data is made lazily, and the same on every call. */
export function tinyModelGguf(options: TinyModelOptions = {}): GgufFile {
  const o = resolveTinyModelOptions(options)
  const vocab = tinyModelVocabulary()
  const u32 = (value: number): GgufMetadataValue => ({ type: 'uint32', value })
  const f32 = (value: number): GgufMetadataValue => ({ type: 'float32', value })
  const str = (value: string): GgufMetadataValue => ({ type: 'string', value })
  const bool = (value: boolean): GgufMetadataValue => ({ type: 'bool', value })
  const metadata: Record<string, GgufMetadataValue> = {
    'general.architecture': str('llama'),
    'general.name': str('garage-tiny'),
    'general.description': str(
      `Garage tiny test model: random weights (seed ${o.seed}), generates gibberish. Made by 'garage model tiny'.`,
    ),
    'general.file_type': u32(0), // LLAMA_FTYPE_ALL_F32
    'general.alignment': u32(32),
    'llama.vocab_size': u32(vocab.tokens.length),
    'llama.context_length': u32(o.contextLength),
    'llama.embedding_length': u32(o.embeddingLength),
    'llama.block_count': u32(o.layers),
    'llama.feed_forward_length': u32(o.feedForwardLength),
    'llama.attention.head_count': u32(o.heads),
    'llama.attention.head_count_kv': u32(o.kvHeads),
    'llama.rope.dimension_count': u32(o.embeddingLength / o.heads),
    'llama.rope.freq_base': f32(10_000),
    'llama.attention.layer_norm_rms_epsilon': f32(1e-5),
    'tokenizer.ggml.model': str('gpt2'),
    'tokenizer.ggml.pre': str('gpt-2'),
    'tokenizer.ggml.tokens': { type: 'array', itemType: 'string', value: vocab.tokens },
    'tokenizer.ggml.token_type': { type: 'array', itemType: 'int32', value: vocab.tokenTypes },
    'tokenizer.ggml.merges': { type: 'array', itemType: 'string', value: vocab.merges },
    'tokenizer.ggml.bos_token_id': u32(vocab.endOfTextId),
    'tokenizer.ggml.eos_token_id': u32(o.chatTemplate ? vocab.imEndId : vocab.endOfTextId),
    'tokenizer.ggml.padding_token_id': u32(vocab.endOfTextId),
    'tokenizer.ggml.fim_pre_token_id': u32(vocab.fimPrefixId),
    'tokenizer.ggml.fim_suf_token_id': u32(vocab.fimSuffixId),
    'tokenizer.ggml.fim_mid_token_id': u32(vocab.fimMiddleId),
    'tokenizer.ggml.add_bos_token': bool(true),
    'tokenizer.ggml.add_eos_token': bool(false),
  }
  if (o.chatTemplate) metadata['tokenizer.chat_template'] = str(tinyModelChatTemplate)
  // LLAMA_POOLING_TYPE_MEAN.
  if (o.embedding) metadata['llama.pooling_type'] = u32(1)
  const tensors: GgufTensor[] = tensorSpecs(o).map((spec) => ({
    name: spec.name,
    dims: spec.dims,
    type: 'F32',
    data: () => randomWeights(o.seed, spec, o.logitScale),
  }))
  return { metadata, tensors, alignment: 32 }
}

export interface TinyModelFile {
  path: string
  bytes: number
  sha256: string
  parameters: number
  options: ResolvedTinyModelOptions
}

/**
 * Writes the model to `path` atomically (a temp file beside it, then a rename). With
 * `overwrite: false` an existing file is left alone and TinyModelExistsError is thrown.
 */
export async function writeTinyModel(
  path: string,
  options: TinyModelOptions = {},
  write: { overwrite?: boolean; signal?: AbortSignal } = {},
): Promise<TinyModelFile> {
  const file = tinyModelGguf(options)
  const resolved = resolveTinyModelOptions(options)
  const temp = `${path}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`
  try {
    const { bytes, sha256 } = await writeGgufFile(temp, file, { signal: write.signal })
    if (write.overwrite ?? true) await rename(temp, path)
    else {
      // link() fails when the name exists: no window where another writer's file is replaced.
      await link(temp, path).catch(async (err: NodeJS.ErrnoException) => {
        if (err.code === 'EEXIST') throw new TinyModelExistsError(path)
        if (!['EPERM', 'ENOTSUP', 'ENOSYS'].includes(err.code ?? '')) throw err
        // No hard links on this file system: check, then rename.
        if (
          await access(path).then(
            () => true,
            () => false,
          )
        )
          throw new TinyModelExistsError(path)
        await rename(temp, path)
      })
    }
    return { path, bytes, sha256, parameters: tinyModelParameterCount(resolved), options: resolved }
  } finally {
    await rm(temp, { force: true })
  }
}
