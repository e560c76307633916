import { stat } from 'node:fs/promises'
import { GarageError } from '../../../core/errors.ts'

/** What a user wants to know about a GGUF file before serving it. */
export interface GgufModelSummary {
  path: string
  fileBytes: number
  ggufVersion: number
  name: string | null
  architecture: string
  /** Whether this build of llama.cpp knows the architecture; null when its bindings do not load here. */
  supportedByLlamaCpp: boolean | null
  /** e.g. "ALL_F32", "MOSTLY_Q4_K_M". */
  fileType: string | null
  parameters: number
  contextLength: number | null
  embeddingLength: number | null
  layers: number | null
  heads: number | null
  kvHeads: number | null
  feedForwardLength: number | null
  tensors: number
  /** Tensor count per ggml type, e.g. { F32: 21 }. */
  tensorTypes: Record<string, number>
  tokenizer: {
    model: string | null
    pre: string | null
    tokens: number
    merges: number
    bos: string | null
    eos: string | null
  }
  chatTemplate: boolean
  /** The node-llama-cpp chat wrapper this file resolves to (e.g. "ChatML"), or null without a template. */
  chatWrapper: string | null
}

export class GgufReadError extends GarageError {
  constructor(message: string, options?: ErrorOptions) {
    super(message, 'GGUF_READ', options)
  }
}

function numberOrNull(v: unknown): number | null {
  return typeof v === 'number' || typeof v === 'bigint' ? Number(v) : null
}

function stringOrNull(v: unknown): string | null {
  return typeof v === 'string' ? v : null
}

/** Reads the header of a local GGUF file with node-llama-cpp (never the tensor data). */
export async function summarizeGgufFile(path: string): Promise<GgufModelSummary> {
  const fileBytes = await stat(path).then(
    (s) => {
      if (!s.isFile()) throw new GgufReadError(`${path} is not a file`)
      return s.size
    },
    (err: NodeJS.ErrnoException) => {
      throw new GgufReadError(
        err.code === 'ENOENT' ? `${path} does not exist` : `cannot read ${path}: ${err.message}`,
      )
    },
  )
  const { readGgufFileInfo, GgufInsights, GgmlType, GgufFileType, resolveChatWrapper } = await import(
    'node-llama-cpp'
  )
  const info = await readGgufFileInfo(path, { logWarnings: false, sourceType: 'filesystem' }).catch(
    (err: Error) => {
      throw new GgufReadError(`${path} is not a readable GGUF file: ${err.message}`, { cause: err })
    },
  )
  // Loads llama.cpp's bindings (not a back-end) to ask whether it knows the architecture.
  const supportedByLlamaCpp = await GgufInsights.from(info).then(
    (insights) => insights.isSupportedByLlamaCpp,
    () => null,
  )
  const general = info.metadata.general as Record<string, unknown>
  const arch = info.architectureMetadata as Record<string, unknown>
  const attention = (arch.attention ?? {}) as Record<string, unknown>
  const ggml = ((info.metadata.tokenizer as Record<string, unknown> | undefined)?.ggml ?? {}) as Record<
    string,
    unknown
  >
  const tokens = Array.isArray(ggml.tokens) ? (ggml.tokens as unknown[]) : []
  const tokenText = (id: unknown): string | null => {
    const n = numberOrNull(id)
    if (n == null) return null
    const text = tokens[n]
    return typeof text === 'string' ? `${n} ${text}` : String(n)
  }
  const tensorTypes: Record<string, number> = {}
  let parameters = 0
  for (const t of info.fullTensorInfo ?? []) {
    const name = GgmlType[t.ggmlType] ?? `type ${t.ggmlType}`
    tensorTypes[name] = (tensorTypes[name] ?? 0) + 1
    parameters += t.dimensions.reduce<number>((n, d) => n * Number(d), 1)
  }
  const fileTypeId = numberOrNull(general.file_type)
  const chatTemplate = typeof info.metadata.tokenizer?.chat_template === 'string'
  const architecture = String(general.architecture ?? 'unknown')
  const wrapper = chatTemplate
    ? resolveChatWrapper({
        fileInfo: info,
        architecture: info.metadata.general.architecture,
        warningLogs: false,
      })
    : null
  return {
    path,
    fileBytes,
    ggufVersion: info.version,
    name: stringOrNull(general.name),
    architecture,
    supportedByLlamaCpp,
    fileType: fileTypeId == null ? null : (GgufFileType[fileTypeId] ?? `type ${fileTypeId}`),
    parameters,
    contextLength: numberOrNull(arch.context_length),
    embeddingLength: numberOrNull(arch.embedding_length),
    layers: numberOrNull(arch.block_count),
    heads: numberOrNull(attention.head_count),
    kvHeads: numberOrNull(attention.head_count_kv),
    feedForwardLength: numberOrNull(arch.feed_forward_length),
    tensors: Number(info.totalTensorCount),
    tensorTypes,
    tokenizer: {
      model: stringOrNull(ggml.model),
      pre: stringOrNull(ggml.pre),
      tokens: tokens.length,
      merges: Array.isArray(ggml.merges) ? ggml.merges.length : 0,
      bos: tokenText(ggml.bos_token_id),
      eos: tokenText(ggml.eos_token_id),
    },
    chatTemplate,
    chatWrapper: wrapper?.wrapperName ?? null,
  }
}

/** 472064 → "461.0 KiB". */
export function formatBytes(n: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB']
  let v = n
  let u = 0
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024
    u++
  }
  return u === 0 ? `${n} bytes` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`
}

function humanCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`
  return String(n)
}

/** The summary as aligned lines for a terminal. */
export function formatGgufSummary(s: GgufModelSummary): string {
  const dash = (v: number | string | null): string => (v == null ? '-' : String(v))
  const rows: [string, string][] = [
    ['file', `${s.path} (${formatBytes(s.fileBytes)}, GGUF v${s.ggufVersion})`],
    ['name', dash(s.name)],
    [
      'architecture',
      `${s.architecture}${s.supportedByLlamaCpp === false ? ' (not supported by this llama.cpp build)' : ''}`,
    ],
    ['file type', dash(s.fileType)],
    ['parameters', `${humanCount(s.parameters)} (${s.parameters})`],
    ['context', dash(s.contextLength)],
    ['embedding', dash(s.embeddingLength)],
    ['layers', dash(s.layers)],
    ['heads', `${dash(s.heads)} (kv ${dash(s.kvHeads)})`],
    ['feed-forward', dash(s.feedForwardLength)],
    [
      'tensors',
      `${s.tensors} (${Object.entries(s.tensorTypes)
        .map(([t, n]) => `${t} ${n}`)
        .join(', ')})`,
    ],
    [
      'tokenizer',
      `${dash(s.tokenizer.model)}${s.tokenizer.pre != null ? ` (pre ${s.tokenizer.pre})` : ''}, ${s.tokenizer.tokens} tokens, ${s.tokenizer.merges} merges`,
    ],
    ['bos / eos', `${dash(s.tokenizer.bos)} / ${dash(s.tokenizer.eos)}`],
    [
      'chat template',
      s.chatTemplate ? `yes (${s.chatWrapper ?? 'not understood'})` : 'no (completions only, no chat)',
    ],
  ]
  const width = Math.max(...rows.map(([k]) => k.length))
  return rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`).join('\n')
}
