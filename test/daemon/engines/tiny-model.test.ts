import { mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  getLlama,
  type Llama,
  LlamaChatSession,
  LlamaCompletion,
  type LlamaModel,
  readGgufFileInfo,
} from 'node-llama-cpp'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { decodeGgufHeader, encodeGguf } from '../../../daemon/engines/llamacpp/gguf.ts'
import {
  gpt2ByteToUnicode,
  resolveTinyModelOptions,
  TinyModelExistsError,
  TinyModelOptionsError,
  tinyModelChatTemplate,
  tinyModelGguf,
  tinyModelParameterCount,
  writeTinyModel,
} from '../../../daemon/engines/llamacpp/tiny-model.ts'

describe('the tiny model file', () => {
  let dir: string
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-tiny-'))
  })
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('is byte-identical for the same seed and options, and different for another seed', async () => {
    const a = await writeTinyModel(join(dir, 'a.gguf'), { seed: 42 })
    const b = await writeTinyModel(join(dir, 'b.gguf'), { seed: 42 })
    const c = await writeTinyModel(join(dir, 'c.gguf'), { seed: 43 })
    expect(a.sha256).toBe(b.sha256)
    expect((await readFile(join(dir, 'a.gguf'))).equals(await readFile(join(dir, 'b.gguf')))).toBe(true)
    expect(c.sha256).not.toBe(a.sha256)
    expect(c.bytes).toBe(a.bytes)
    const d = await writeTinyModel(join(dir, 'd.gguf'), { seed: 42, layers: 3 })
    expect(d.sha256).not.toBe(a.sha256)
    // The in-memory encoding is the same bytes, every time (lazy tensors are pure).
    const file = tinyModelGguf({ seed: 42 })
    expect(Buffer.from(encodeGguf(file)).equals(encodeGguf(file))).toBe(true)
    expect((await readFile(join(dir, 'a.gguf'))).equals(encodeGguf(file))).toBe(true)
  })

  it('has the llama metadata, gpt2 tokenizer and tensors llama.cpp needs, as node-llama-cpp reads them', async () => {
    const path = join(dir, 'default.gguf')
    const written = await writeTinyModel(path)
    expect(written.bytes).toBe((await stat(path)).size)
    expect(written.parameters).toBe(116_800)
    // docs/models.md quotes this: a change here is a format change, to be made on purpose.
    expect(written.sha256).toBe('6a0bdd48f25337d8222c55a42f1c498259e968c7c99a28001362c963e8fce582')
    expect(written.bytes).toBe(473_824)
    const info = await readGgufFileInfo(path, { logWarnings: false })
    expect(info.version).toBe(3)
    expect(info.metadata.general).toMatchObject({
      architecture: 'llama',
      name: 'garage-tiny',
      file_type: 0,
      alignment: 32,
    })
    expect(info.architectureMetadata).toMatchObject({
      context_length: 4096,
      embedding_length: 64,
      block_count: 2,
      feed_forward_length: 128,
      vocab_size: 270,
      attention: { head_count: 4, head_count_kv: 4 },
      rope: { dimension_count: 16, freq_base: 10_000 },
    })
    expect(info.architectureMetadata.attention?.layer_norm_rms_epsilon).toBeCloseTo(1e-5, 10)
    const tokenizer = info.metadata.tokenizer!
    expect(tokenizer.chat_template).toBe(tinyModelChatTemplate)
    const ggml = tokenizer.ggml as unknown as Record<string, unknown>
    expect(ggml.model).toBe('gpt2')
    expect(ggml.pre).toBe('gpt-2')
    const tokens = ggml.tokens as string[]
    expect(tokens).toHaveLength(270)
    expect(tokens.slice(0, 256)).toEqual(gpt2ByteToUnicode())
    expect(tokens[32]).toBe('Ġ') // space
    expect(tokens[10]).toBe('Ċ') // newline
    expect(tokens[65]).toBe('A')
    expect(new Set(tokens).size).toBe(tokens.length)
    expect(ggml.merges).toContain('Ġ t')
    expect(tokens).toContain('Ġt')
    expect(tokens.slice(-6)).toEqual([
      '<|endoftext|>',
      '<|im_start|>',
      '<|im_end|>',
      '<fim_prefix>',
      '<fim_suffix>',
      '<fim_middle>',
    ])
    expect((ggml.token_type as number[]).slice(-7)).toEqual([1, 3, 3, 3, 3, 3, 3])
    expect(ggml.bos_token_id).toBe(264)
    expect(ggml.eos_token_id).toBe(266)
    expect([ggml.fim_pre_token_id, ggml.fim_suf_token_id, ggml.fim_mid_token_id]).toEqual([267, 268, 269])

    const tensors = new Map(info.tensorInfo!.map((t) => [t.name, t]))
    expect(tensors.size).toBe(3 + 2 * 9)
    expect(tensors.get('token_embd.weight')?.dimensions).toEqual([64, 270])
    expect(tensors.get('output.weight')?.dimensions).toEqual([64, 270])
    expect(tensors.get('output_norm.weight')?.dimensions).toEqual([64])
    expect(tensors.get('blk.1.attn_k.weight')?.dimensions).toEqual([64, 64])
    expect(tensors.get('blk.1.ffn_gate.weight')?.dimensions).toEqual([64, 128])
    expect(tensors.get('blk.1.ffn_down.weight')?.dimensions).toEqual([128, 64])
    expect(info.tensorInfo!.every((t) => t.ggmlType === 0)).toBe(true)
  })

  it('scales weights by fan-in and sets norms to 1', () => {
    const file = tinyModelGguf({ seed: 5 })
    const data = (name: string): Float32Array => {
      const t = file.tensors.find((x) => x.name === name)!
      return (typeof t.data === 'function' ? t.data() : t.data) as Float32Array
    }
    expect(data('blk.0.ffn_norm.weight').every((v) => v === 1)).toBe(true)
    const down = data('blk.0.ffn_down.weight') // fan-in 128
    const bound = 0.5 / Math.sqrt(128)
    expect(Math.max(...down.map(Math.abs))).toBeLessThanOrEqual(bound)
    expect(Math.max(...down.map(Math.abs))).toBeGreaterThan(bound * 0.95)
    expect(Math.abs(down.reduce((a, b) => a + b, 0) / down.length)).toBeLessThan(bound / 10)
    // The bias channel: residual dimension 0 is a constant no layer writes, read as a logit bias.
    const embd = data('token_embd.weight')
    expect(Array.from({ length: 267 }, (_, r) => embd[r * 64])).toEqual(Array(267).fill(Math.fround(0.1)))
    expect(down.subarray(0, 128).every((v) => v === 0)).toBe(true)
    expect(
      data('blk.1.attn_output.weight')
        .subarray(0, 64)
        .every((v) => v === 0),
    ).toBe(true)
    const output = data('output.weight')
    const bias = (id: number): number => output[id * 64]!
    expect([bias(65), bias(32), bias(260)]).toEqual([20, 20, 20]) // "A", space, "Ġthe"
    expect([bias(10), bias(0xc3), bias(264), bias(266)]).toEqual([-20, -20, -20, -20]) // \n, a UTF-8 lead byte, EOG
  })

  it('supports grouped-query attention and leaving the chat template out', () => {
    const header = decodeGgufHeader(encodeGguf(tinyModelGguf({ heads: 8, kvHeads: 2, chatTemplate: false })))
    expect(header.metadata['llama.attention.head_count_kv']).toEqual({ type: 'uint32', value: 2 })
    expect(header.metadata['llama.rope.dimension_count']).toEqual({ type: 'uint32', value: 8 })
    expect(header.metadata['tokenizer.chat_template']).toBeUndefined()
    expect(header.metadata['tokenizer.ggml.eos_token_id']).toEqual({ type: 'uint32', value: 264 })
    expect(header.tensors.find((t) => t.name === 'blk.0.attn_v.weight')?.dims).toEqual([64, 16])
    expect(tinyModelParameterCount({ heads: 8, kvHeads: 2 })).toBeLessThan(tinyModelParameterCount())
  })

  it('refuses sizes llama.cpp cannot run, naming the option', () => {
    const bad = (o: Parameters<typeof resolveTinyModelOptions>[0]): TinyModelOptionsError => {
      try {
        resolveTinyModelOptions(o)
      } catch (err) {
        if (err instanceof TinyModelOptionsError) return err
        throw err
      }
      throw new Error(`accepted ${JSON.stringify(o)}`)
    }
    expect(bad({ embeddingLength: 66 }).option).toBe('embeddingLength') // not a multiple of 4 heads
    expect(bad({ embeddingLength: 12, heads: 4 }).detail).toContain('must be even') // head size 3
    expect(bad({ heads: 4, kvHeads: 3 }).option).toBe('kvHeads')
    expect(bad({ layers: 0 }).detail).toBe('must be an integer from 1 to 256, not 0')
    expect(bad({ seed: -1 }).option).toBe('seed')
    expect(bad({ seed: 1.5 }).option).toBe('seed')
    expect(bad({ embeddingLength: 8192, layers: 256, feedForwardLength: 65_536 }).detail).toContain(
      'parameters',
    )
    expect(resolveTinyModelOptions({ heads: 2 })).toMatchObject({ heads: 2, kvHeads: 2, seed: 1 })
  })

  it('replaces a file atomically, or refuses to when asked, leaving no temp files', async () => {
    const sub = await mkdtemp(join(dir, 'atomic-'))
    const path = join(sub, 'm.gguf')
    const first = await writeTinyModel(path, { seed: 1 })
    await expect(writeTinyModel(path, { seed: 2 }, { overwrite: false })).rejects.toBeInstanceOf(
      TinyModelExistsError,
    )
    expect((await writeTinyModel(path, { seed: 1 })).sha256).toBe(first.sha256)
    const { readdir } = await import('node:fs/promises')
    expect(await readdir(sub)).toEqual(['m.gguf'])
  })
})

describe('the tiny model in llama.cpp (node-llama-cpp, CPU, one thread)', () => {
  let dir: string
  let llama: Llama
  let model: LlamaModel

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-tiny-llama-'))
    await writeTinyModel(join(dir, 'tiny.gguf'), { seed: 3 })
    llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never })
    model = await llama.loadModel({ modelPath: join(dir, 'tiny.gguf') })
  })
  afterAll(async () => {
    await model?.dispose()
    await llama?.dispose()
    await rm(dir, { recursive: true, force: true })
  })

  async function complete(prompt: string): Promise<string> {
    const context = await model.createContext({ threads: 1, contextSize: 256 })
    try {
      const completion = new LlamaCompletion({ contextSequence: context.getSequence() })
      return await completion.generateCompletion(prompt, { maxTokens: 32, temperature: 0 })
    } finally {
      await context.dispose()
    }
  }

  it('loads with the sizes it was written with', () => {
    expect(model.trainContextSize).toBe(4096)
    expect(model.embeddingVectorSize).toBe(64)
    expect(model.tokens.bos).toBe(264)
    expect(model.tokens.eos).toBe(266)
  })

  it('tokenizes any UTF-8 text into bytes and merges, and back', () => {
    const text = 'héllo the wörld 🙂\n\ttabs'
    const tokens = model.tokenize(text)
    expect(model.detokenize(tokens)).toBe(text)
    expect(tokens).toContain(260) // "Ġthe", the fifth merge
    expect(model.tokenize('<|im_start|>', true)).toEqual([265])
  })

  it('generates 32 tokens, the same text on every run at temperature 0', async () => {
    const first = await complete('The quick brown fox')
    const second = await complete('The quick brown fox')
    expect(first.length).toBeGreaterThanOrEqual(32) // a merge token is two or three characters
    expect(second).toBe(first)
  })

  it('writes printable ASCII up to the token limit, even when sampling', async () => {
    const context = await model.createContext({ threads: 1, contextSize: 256 })
    try {
      const completion = new LlamaCompletion({ contextSequence: context.getSequence() })
      const { response, metadata } = await completion.generateCompletionWithMeta('héllo 🙂', {
        maxTokens: 48,
        temperature: 1.5,
        seed: 1,
      })
      expect(metadata.stopReason).toBe('maxTokens')
      expect(response).toMatch(/^[\x20-\x7e]{48,}$/)
    } finally {
      await context.dispose()
    }
  })

  it('chats through its embedded ChatML template', async () => {
    const context = await model.createContext({ threads: 1, contextSize: 256 })
    try {
      // The byte-level vocabulary spends about a token per character: node-llama-cpp's default system
      // prompt alone would not fit in 256 tokens.
      const session = new LlamaChatSession({
        contextSequence: context.getSequence(),
        systemPrompt: 'Be brief.',
      })
      expect(session.chatWrapper.wrapperName).toBe('ChatML')
      const answer = await session.prompt('Hello!', { maxTokens: 16, temperature: 0 })
      expect(typeof answer).toBe('string')
      expect(session.getChatHistory().map((m) => m.type)).toEqual(['system', 'user', 'model'])
    } finally {
      await context.dispose()
    }
  })
})
