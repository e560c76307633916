import { type ChildProcess, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { basename } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { TypedEventEmitter } from 'main-event'
import { GarageError } from '../../../core/errors.ts'
import type {
  Engine,
  EngineEvents,
  EngineHandle,
  EngineMetrics,
  EngineStartOptions,
  EngineState,
} from '../types.ts'
import { vllmEngineMetrics } from '../vllm/metrics.ts'
import type { EmbeddedServerOptions } from './server.ts'

export class EngineStartError extends GarageError {}

export interface LlamaCppEngineInit {
  gpu?: 'auto' | false
  /** How long loading a model may take before the start fails. */
  startTimeoutMs?: number
}

const serveScript = fileURLToPath(new URL('./serve-process.ts', import.meta.url))
const stderrTailLines = 20

/**
 * The embedded engine behind the daemon's Engine interface, in a process of its own. `model` is a
 * GGUF file path. A crash of that process is an event ('crashed'), never the daemon's crash.
 */
export class LlamaCppEngine extends TypedEventEmitter<EngineEvents> implements Engine {
  readonly kind = 'llamacpp' as const
  private child: ChildProcess | null = null
  private handle: EngineHandle | null = null
  private current: EngineState = 'stopped'
  private stopping = false
  private stderrTail: string[] = []
  private readonly init: LlamaCppEngineInit

  constructor(init: LlamaCppEngineInit = {}) {
    super()
    this.init = init
  }

  get state(): EngineState {
    return this.current
  }

  /** The engine process, while it runs. */
  get pid(): number | null {
    return this.child?.pid ?? null
  }

  async start(options: EngineStartOptions): Promise<EngineHandle> {
    if (this.child != null)
      throw new EngineStartError('the embedded engine is already running', 'ENGINE_RUNNING')
    const cap = options.maxTokensPerSecond
    // Checked here, not in the engine process: a bad option is the caller's mistake, not a crash.
    if (cap != null && (typeof cap !== 'number' || !Number.isFinite(cap) || cap <= 0)) {
      throw new EngineStartError(
        `maxTokensPerSecond must be a positive finite number (tokens per second per sequence); got ${String(cap)}`,
        'ENGINE_OPTIONS_INVALID',
      )
    }
    this.current = 'starting'
    this.stopping = false
    this.stderrTail = []
    this.safeDispatchEvent('starting', { detail: { kind: this.kind } })
    const servedModelName = options.servedModelName ?? basename(options.model).replace(/\.gguf$/i, '')
    const serverOptions: EmbeddedServerOptions = {
      modelPath: options.model,
      servedModelName,
      apiKey: randomBytes(24).toString('base64url'),
      gpu: this.init.gpu ?? false,
      ...(options.parallel != null ? { parallel: options.parallel } : {}),
      ...(options.maxQueue != null ? { maxQueue: options.maxQueue } : {}),
      ...(options.threads != null ? { threads: options.threads } : {}),
      ...(options.contextLength != null ? { contextSize: options.contextLength } : {}),
      ...(cap != null ? { maxTokensPerSecond: cap } : {}),
      ...(options.task === 'embed' ? { task: 'embed' as const } : {}),
    }
    const child = spawn(process.execPath, [serveScript], {
      env: { ...process.env, GARAGE_ENGINE_OPTIONS: JSON.stringify(serverOptions) },
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      // Its own process group: Ctrl-C in the node's terminal is the node's to handle (drain, then
      // stop the engine), not the engine's; it still exits when the node goes (IPC disconnect).
      detached: process.platform !== 'win32',
    })
    this.child = child
    child.stderr?.on('data', (d: Buffer) => {
      this.stderrTail.push(
        ...d
          .toString('utf8')
          .split('\n')
          .filter((l) => l.trim() !== ''),
      )
      this.stderrTail = this.stderrTail.slice(-stderrTailLines)
    })
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
    let timer: NodeJS.Timeout | undefined
    try {
      const line = await Promise.race([
        new Promise<string>((resolve) => createInterface({ input: child.stdout! }).once('line', resolve)),
        exited.then((code) => Promise.reject(new Error(`the engine process exited with ${code}`))),
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () => reject(new Error('the model did not load in time')),
            this.init.startTimeoutMs ?? 120_000,
          )
        }),
        ...(options.signal != null
          ? [
              new Promise<never>((_, reject) =>
                options.signal!.addEventListener('abort', () => reject(new Error('start aborted')), {
                  once: true,
                }),
              ),
            ]
          : []),
      ])
      const ready = JSON.parse(line) as { url: string; apiKey: string; servedModelName: string }
      this.handle = {
        kind: this.kind,
        baseUrl: ready.url,
        apiKey: ready.apiKey,
        servedModelName: ready.servedModelName,
      }
    } catch (err) {
      child.kill('SIGKILL')
      this.child = null
      this.current = 'crashed'
      const why = this.stderrTail.length > 0 ? `\n${this.stderrTail.join('\n')}` : ''
      const error = new EngineStartError(
        `the embedded engine could not serve ${options.model}: ${(err as Error).message}${why}`,
        'ENGINE_START',
        {
          cause: err,
        },
      )
      this.safeDispatchEvent('crashed', { detail: { error, restarts: 0 } })
      throw error
    } finally {
      clearTimeout(timer)
    }
    void exited.then((code) => {
      if (this.child !== child) return
      this.child = null
      this.handle = null
      if (this.stopping) return
      this.current = 'crashed'
      const error = new GarageError(
        `the embedded engine exited with ${code}: ${this.stderrTail.slice(-3).join(' | ')}`,
        'ENGINE_CRASHED',
      )
      this.safeDispatchEvent('crashed', { detail: { error, restarts: 0 } })
    })
    this.current = 'ready'
    this.safeDispatchEvent('ready', { detail: this.handle })
    return this.handle
  }

  async health(options: { signal?: AbortSignal } = {}): Promise<boolean> {
    if (this.handle == null) return false
    try {
      const res = await fetch(`${this.handle.baseUrl}/health`, {
        signal: options.signal ?? AbortSignal.timeout(2_000),
      })
      return res.ok
    } catch {
      return false
    }
  }

  async metrics(options: { signal?: AbortSignal } = {}): Promise<EngineMetrics> {
    if (this.handle == null) throw new GarageError('the embedded engine is not running', 'ENGINE_NOT_RUNNING')
    const res = await fetch(`${this.handle.baseUrl}/metrics`, {
      signal: options.signal ?? AbortSignal.timeout(2_000),
    })
    return vllmEngineMetrics(await res.text())
  }

  async drain(options: { graceMs?: number } = {}): Promise<void> {
    const child = this.child
    if (child == null) return
    this.current = 'draining'
    await new Promise<void>((resolve) => {
      const onMessage = (m: { type?: string }): void => {
        if (m?.type !== 'drained') return
        child.off('message', onMessage)
        resolve()
      }
      child.on('message', onMessage)
      child.once('exit', () => resolve())
      child.send({ type: 'drain', graceMs: options.graceMs ?? 30_000 })
    })
  }

  async stop(): Promise<void> {
    const child = this.child
    if (child == null) return
    this.stopping = true
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
    child.kill('SIGTERM')
    const killer = setTimeout(() => child.kill('SIGKILL'), 10_000)
    await exited
    clearTimeout(killer)
    this.child = null
    this.handle = null
    this.current = 'stopped'
    this.safeDispatchEvent('stopped', { detail: { kind: this.kind } })
  }
}
