import { join, resolve } from 'node:path'
import { GarageError } from '../../core/errors.ts'
import { defaultDataDir } from '../../core/paths.ts'
import { formatBytes, formatGgufSummary, summarizeGgufFile } from '../../daemon/engines/llamacpp/gguf-info.ts'
import {
  defaultPullTimeoutMs,
  ModelUriError,
  modelSourceHost,
  pullGgufModel,
} from '../../daemon/engines/llamacpp/gguf-pull.ts'
import {
  TinyModelExistsError,
  type TinyModelOptions,
  TinyModelOptionsError,
  tinyModelDefaults,
  type tinyModelLimits,
  writeTinyModel,
} from '../../daemon/engines/llamacpp/tiny-model.ts'
import { type CommandContext, parseDuration, parseOptions, print, UsageError } from '../io.ts'

export const usage = `Usage:
  garage model tiny --out FILE [--seed N] [--embd N] [--layers N] [--heads N] [--kv-heads N]
                    [--ff N] [--ctx N] [--logit-scale X] [--no-chat-template] [--embedding] [--force]
  garage model pull SOURCE [--dir DIR] [--timeout D]
  garage model info FILE [--json]

  tiny   writes Garage's own tiny llama model: random weights from --seed (same options, same bytes),
         a byte-level tokenizer and a ChatML chat template. It loads in under a second and generates
         gibberish fast: for tests and demos (docs/models.md). Prints the path, size and sha256.
  pull   downloads a real GGUF model; SOURCE is hf:USER/REPO/FILE.gguf, hf:USER/REPO:QUANT or an
         https:// URL. Gives up with one line when the network is silent for --timeout.
  info   prints a GGUF file's architecture, sizes, tokenizer and chat template, before you serve it

Options (tiny):
  --out FILE          where to write the model (required; refuses an existing file unless --force)
  --seed N            PRNG seed, 0..4294967295 (default ${tinyModelDefaults.seed})
  --embd N            embedding length (default ${tinyModelDefaults.embeddingLength}; a multiple of --heads)
  --layers N          transformer blocks (default ${tinyModelDefaults.layers})
  --heads N           attention heads (default ${tinyModelDefaults.heads})
  --kv-heads N        key/value heads, dividing --heads (default: --heads)
  --ff N              feed-forward length (default ${tinyModelDefaults.feedForwardLength})
  --ctx N             context length (default ${tinyModelDefaults.contextLength})
  --no-chat-template  leave out tokenizer.chat_template (completions only)
  --logit-scale X     sharpen the next-token distribution (default 1, nearly flat; 16 peaks it like
                      a trained model's, which the integrity check needs: docs/integrity.md)
  --embedding         an embedding model (mean pooling): what /v1/embeddings serves
  --force             replace FILE if it exists
Options (pull):
  --dir DIR           where to save it (default: <data dir>/models)
  --timeout D         network silence allowed (default: ${defaultPullTimeoutMs / 1000}s)
Options (info):
  --json              the summary as JSON`

const sizeFlags: Record<string, keyof typeof tinyModelLimits> = {
  seed: 'seed',
  embd: 'embeddingLength',
  layers: 'layers',
  heads: 'heads',
  'kv-heads': 'kvHeads',
  ff: 'feedForwardLength',
  ctx: 'contextLength',
}

function parseCount(text: string, flag: string): number {
  if (!/^\d{1,10}$/.test(text))
    throw new UsageError(`--${flag} must be a whole number, not ${JSON.stringify(text)}`)
  return Number(text)
}

async function tiny(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    out: { type: 'string' },
    ...Object.fromEntries(Object.keys(sizeFlags).map((f) => [f, { type: 'string' as const }])),
    'no-chat-template': { type: 'boolean', default: false },
    embedding: { type: 'boolean', default: false },
    'logit-scale': { type: 'string' },
    force: { type: 'boolean', default: false },
  })
  const flags = values as Record<string, string | boolean | undefined>
  if (values.out == null || values.out === '') throw new UsageError('--out FILE is required')
  const options: TinyModelOptions = { chatTemplate: !values['no-chat-template'], embedding: values.embedding }
  for (const [flag, option] of Object.entries(sizeFlags)) {
    const text = flags[flag]
    if (typeof text === 'string') options[option] = parseCount(text, flag)
  }
  const scale = values['logit-scale']
  if (scale != null) {
    const x = Number(scale)
    if (!/^\d+(\.\d+)?$/.test(scale) || !(x > 0 && x <= 1000))
      throw new UsageError(
        `--logit-scale must be a number above 0 and at most 1000, not ${JSON.stringify(scale)}`,
      )
    options.logitScale = x
  }
  const out = resolve(values.out)
  let written: Awaited<ReturnType<typeof writeTinyModel>>
  try {
    written = await writeTinyModel(out, options, { overwrite: values.force, signal: ctx.shutdown })
  } catch (err) {
    if (err instanceof TinyModelOptionsError) {
      const flag = Object.keys(sizeFlags).find((f) => sizeFlags[f] === err.option) ?? err.option
      throw new UsageError(`--${flag} ${err.detail}`)
    }
    if (err instanceof TinyModelExistsError)
      throw new GarageError(`${out} already exists; pass --force to replace it`, err.code)
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT' || code === 'EACCES' || code === 'ENOSPC' || code === 'EROFS')
      throw new GarageError(`cannot write ${out}: ${code} (${(err as Error).message})`, code)
    throw err
  }
  const o = written.options
  print(ctx.stdout, written.path)
  print(ctx.stdout, `size    ${written.bytes} bytes (${formatBytes(written.bytes)})`)
  print(ctx.stdout, `sha256  ${written.sha256}`)
  print(
    ctx.stderr,
    `llama, ${written.parameters} parameters: embd ${o.embeddingLength}, ${o.layers} layers, ${o.heads} heads ` +
      `(${o.kvHeads} kv), ff ${o.feedForwardLength}, ctx ${o.contextLength}, seed ${o.seed}, ` +
      `${o.chatTemplate ? 'ChatML template' : 'no chat template'}${o.embedding ? ', mean pooling (embeddings)' : ''}`,
  )
  return 0
}

/** At most one line a second on stderr, and the last one once. */
function progressPrinter(ctx: CommandContext): (p: { downloadedBytes: number; totalBytes: number }) => void {
  let lastAt = 0
  let finished = false
  return ({ downloadedBytes, totalBytes }) => {
    const now = Date.now()
    const done = totalBytes > 0 && downloadedBytes >= totalBytes
    if (finished || (now - lastAt < 1000 && !done)) return
    lastAt = now
    finished = done
    const percent = totalBytes > 0 ? ` ${((downloadedBytes / totalBytes) * 100).toFixed(1)}%` : ''
    print(ctx.stderr, `downloading${percent} (${formatBytes(downloadedBytes)} of ${formatBytes(totalBytes)})`)
  }
}

async function pull(argv: string[], ctx: CommandContext): Promise<number> {
  const { values, positionals } = parseOptions(
    argv,
    { dir: { type: 'string' }, timeout: { type: 'string', default: `${defaultPullTimeoutMs / 1000}s` } },
    true,
  )
  const source = positionals[0]
  if (source == null || positionals.length > 1)
    throw new UsageError('pull takes one source: hf:USER/REPO/FILE.gguf or an https:// URL')
  const timeoutMs = parseDuration(values.timeout, '--timeout')
  if (timeoutMs < 1) throw new UsageError('--timeout must be more than 0')
  try {
    modelSourceHost(source, ctx.env)
  } catch (err) {
    if (err instanceof ModelUriError) throw new UsageError(err.message)
    throw err
  }
  const dir = resolve(values.dir ?? join(defaultDataDir(ctx.env), 'models'))
  print(ctx.stderr, `pulling ${source} into ${dir}`)
  const pulled = await pullGgufModel(source, {
    dir,
    timeoutMs,
    signal: ctx.shutdown,
    env: ctx.env,
    onProgress: progressPrinter(ctx),
  })
  print(ctx.stdout, pulled.path)
  print(ctx.stderr, `${formatBytes(pulled.bytes)}, architecture ${pulled.architecture ?? 'unknown'}`)
  print(ctx.stderr, `inspect it with: garage model info ${pulled.path}`)
  return 0
}

async function info(argv: string[], ctx: CommandContext): Promise<number> {
  const { values, positionals } = parseOptions(argv, { json: { type: 'boolean', default: false } }, true)
  const file = positionals[0]
  if (file == null || positionals.length > 1) throw new UsageError('info takes one GGUF file')
  const summary = await summarizeGgufFile(resolve(file))
  print(ctx.stdout, values.json ? JSON.stringify(summary, null, 2) : formatGgufSummary(summary))
  return 0
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const [sub, ...rest] = argv
  switch (sub) {
    case 'tiny':
      return tiny(rest, ctx)
    case 'pull':
      return pull(rest, ctx)
    case 'info':
      return info(rest, ctx)
    default:
      throw new UsageError(sub == null ? 'missing subcommand' : `unknown subcommand ${JSON.stringify(sub)}`)
  }
}
