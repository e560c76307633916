import { mkdir, stat } from 'node:fs/promises'
import { GarageError } from '../../../core/errors.ts'

/** How long the network may stay silent (header read, URL resolution, no new bytes) before a pull gives up. */
export const defaultPullTimeoutMs = 15_000

/** Not something a model can be pulled from. */
export class ModelUriError extends GarageError {
  constructor(uri: string) {
    super(
      `${JSON.stringify(uri)} is not a model source: use hf:USER/REPO/FILE.gguf, hf:USER/REPO:QUANT or an https:// URL`,
      'MODEL_URI',
    )
  }
}

/** The network failed, timed out, or answered with something that is not a GGUF model. */
export class ModelPullError extends GarageError {
  constructor(message: string, options?: ErrorOptions) {
    super(message, 'MODEL_PULL', options)
  }
}

export interface PullProgress {
  downloadedBytes: number
  totalBytes: number
}

export interface PullGgufModelOptions {
  /** Where the file is saved (created if missing). */
  dir: string
  /** See defaultPullTimeoutMs. */
  timeoutMs?: number
  signal?: AbortSignal
  onProgress?: (progress: PullProgress) => void
  /** For the hf: endpoint in messages; node-llama-cpp itself reads process.env. */
  env?: NodeJS.ProcessEnv
}

export interface PulledModel {
  path: string
  bytes: number
  architecture: string | null
}

/**
 * The host a model source is fetched from, for messages; throws ModelUriError. hf: URIs go to
 * $MODEL_ENDPOINT or $HF_ENDPOINT when set, as node-llama-cpp (and llama.cpp) resolve them.
 */
export function modelSourceHost(uri: string, env: NodeJS.ProcessEnv = process.env): string {
  const host = (url: string | undefined): string | null => {
    if (url == null || !/^https?:\/\//.test(url)) return null
    try {
      return new URL(url).host
    } catch {
      return null
    }
  }
  if (/^hf:[\w.-]+\/[\w.-]+([/:#].*)?$/.test(uri))
    return host(env.MODEL_ENDPOINT) ?? host(env.HF_ENDPOINT) ?? 'huggingface.co'
  const h = host(uri)
  if (h == null) throw new ModelUriError(uri)
  return h
}

const httpAdvice: Record<string, string> = {
  '401': 'the model is gated or private: accept its terms on the website and set HF_TOKEN',
  '403': 'the model is gated or private: accept its terms on the website and set HF_TOKEN',
  '404': 'check the user, repository and file name',
  '429': 'rate limited: try again later',
}

/** One line naming what failed, where, and what to do. */
function failure(err: unknown, host: string, timeoutMs: number, what: string): ModelPullError {
  if (err instanceof ModelPullError) return err
  const e = err as (Error & { code?: string; cause?: { code?: string; message?: string } }) | undefined
  const code = e?.cause?.code ?? e?.code
  const detail = e?.cause?.message ?? e?.message ?? String(err)
  const options = { cause: err }
  if (e?.name === 'TimeoutError' || code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'ETIMEDOUT')
    return new ModelPullError(
      `no answer from ${host} within ${timeoutMs / 1000}s (${what}); check the network`,
      options,
    )
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN')
    return new ModelPullError(
      `cannot reach ${host}: its name does not resolve (${code}); is this machine online?`,
      options,
    )
  if (code === 'ECONNREFUSED' || code === 'ECONNRESET' || code === 'ENETUNREACH' || code === 'EHOSTUNREACH')
    return new ModelPullError(`cannot reach ${host}: ${code} (${what})`, options)
  if (/Invalid GGUF magic/i.test(detail))
    return new ModelPullError(`${host} did not send a GGUF file: ${detail}`, options)
  const status = /\b([45]\d\d)\b ?([\w ]*)$/.exec(detail)
  if (status != null) {
    const advice = httpAdvice[status[1] as string]
    return new ModelPullError(
      `${host} answered ${status[1]}${status[2] ? ` ${status[2].trim()}` : ''} (${what})${advice ? `: ${advice}` : ''}`,
      options,
    )
  }
  return new ModelPullError(
    `${what} from ${host} failed: ${code != null ? `${code} ` : ''}${detail}`,
    options,
  )
}

/** Resolves with the promise, or rejects with `onTimeout()` after `ms`; a late result is handed to `late`. */
function withDeadline<T>(
  promise: Promise<T>,
  ms: number,
  onTimeout: () => Error,
  late: (v: T) => void,
): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  let timedOut = false
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      timedOut = true
      reject(onTimeout())
    }, ms)
  })
  promise.then((v) => timedOut && late(v)).catch(() => {})
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer))
}

/**
 * Downloads a GGUF model with node-llama-cpp's downloader (parallel connections, split files).
 * Every network step has a deadline: offline, it fails in well under `timeoutMs` with one
 * ModelPullError line instead of the downloader's minutes of retries.
 */
export async function pullGgufModel(uri: string, options: PullGgufModelOptions): Promise<PulledModel> {
  const host = modelSourceHost(uri, options.env)
  const timeoutMs = options.timeoutMs ?? defaultPullTimeoutMs
  const signals = (extra: AbortSignal): AbortSignal =>
    options.signal == null ? extra : AbortSignal.any([extra, options.signal])
  const { readGgufFileInfo, createModelDownloader } = await import('node-llama-cpp')

  // The header first, under one deadline: proves the host answers and serves a GGUF before gigabytes move.
  const info = await readGgufFileInfo(uri, {
    sourceType: 'network',
    readTensorInfo: false,
    logWarnings: false,
    fetchRetryOptions: { retries: 1, minTimeout: 500, maxTimeout: 500 },
    signal: signals(AbortSignal.timeout(timeoutMs)),
  }).catch((err: unknown) => {
    if (options.signal?.aborted) throw new ModelPullError('pull cancelled')
    throw failure(err, host, timeoutMs, 'reading the model header')
  })

  await mkdir(options.dir, { recursive: true })
  const onProgress = options.onProgress
  const downloader = await withDeadline(
    createModelDownloader({
      modelUri: uri,
      dirPath: options.dir,
      skipExisting: true,
      ...(onProgress != null
        ? { onProgress: (s) => onProgress({ downloadedBytes: s.downloadedSize, totalBytes: s.totalSize }) }
        : {}),
    }),
    timeoutMs,
    () =>
      new ModelPullError(
        `no answer from ${host} within ${timeoutMs / 1000}s (starting the download); check the network`,
      ),
    (late) => void late.cancel(),
  ).catch((err: unknown) => {
    throw failure(err, host, timeoutMs, 'starting the download')
  })

  // The downloader retries for minutes; a stall watchdog turns silence into a clear failure.
  const stalled = new AbortController()
  let lastBytes = -1
  let lastChange = Date.now()
  const watchdog = setInterval(
    () => {
      const now = downloader.downloadedSize
      if (now !== lastBytes) {
        lastBytes = now
        lastChange = Date.now()
      } else if (Date.now() - lastChange >= timeoutMs)
        stalled.abort(
          new ModelPullError(
            `download stalled: no data from ${host} for ${timeoutMs / 1000}s; check the network`,
          ),
        )
    },
    Math.min(1000, timeoutMs / 4),
  )
  let path: string
  const interrupted = (): ModelPullError | null => {
    if (stalled.signal.aborted) return stalled.signal.reason as ModelPullError
    if (options.signal?.aborted) return new ModelPullError('pull cancelled')
    return null
  }
  try {
    path = await downloader.download({ signal: signals(stalled.signal) })
  } catch (err) {
    throw interrupted() ?? failure(err, host, timeoutMs, 'downloading')
  } finally {
    clearInterval(watchdog)
  }
  // A cancelled download resolves as if it had finished.
  const stopped = interrupted()
  if (stopped != null) throw stopped
  const architecture = info.metadata.general?.architecture
  return {
    path,
    bytes: (await stat(path)).size,
    architecture: architecture == null ? null : String(architecture),
  }
}
