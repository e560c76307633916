import { basename } from 'node:path'
import { TypedEventEmitter } from 'main-event'
import { GarageError } from '../../../mesh/errors.ts'
import type {
  Engine,
  EngineEvents,
  EngineHandle,
  EngineMetrics,
  EngineStartOptions,
  EngineState,
} from '../types.ts'
import { type EmbeddedServer, startEmbeddedServer } from './server.ts'

export class EngineStartError extends GarageError {}

export interface LlamaCppEngineInit {
  gpu?: 'auto' | false
}

/** The embedded engine behind the daemon's Engine interface. `model` is a GGUF file path. */
export class LlamaCppEngine extends TypedEventEmitter<EngineEvents> implements Engine {
  readonly kind = 'llamacpp' as const
  private server: EmbeddedServer | null = null
  private current: EngineState = 'stopped'
  private readonly init: LlamaCppEngineInit

  constructor(init: LlamaCppEngineInit = {}) {
    super()
    this.init = init
  }

  get state(): EngineState {
    return this.current
  }

  async start(options: EngineStartOptions): Promise<EngineHandle> {
    if (this.server != null)
      throw new EngineStartError('the embedded engine is already running', 'ENGINE_RUNNING')
    this.current = 'starting'
    this.safeDispatchEvent('starting', { detail: { kind: this.kind } })
    const servedModelName = options.servedModelName ?? basename(options.model).replace(/\.gguf$/i, '')
    try {
      this.server = await startEmbeddedServer({
        modelPath: options.model,
        servedModelName,
        ...(options.parallel != null ? { parallel: options.parallel } : {}),
        ...(options.maxQueue != null ? { maxQueue: options.maxQueue } : {}),
        ...(options.threads != null ? { threads: options.threads } : {}),
        ...(options.contextLength != null ? { contextSize: options.contextLength } : {}),
        gpu: this.init.gpu ?? false,
      })
    } catch (err) {
      this.current = 'crashed'
      const error = new EngineStartError(
        `the embedded engine could not load ${options.model}: ${(err as Error).message}`,
        'ENGINE_START',
        { cause: err },
      )
      this.safeDispatchEvent('crashed', { detail: { error, restarts: 0 } })
      throw error
    }
    const handle: EngineHandle = {
      kind: this.kind,
      baseUrl: this.server.url,
      apiKey: this.server.apiKey,
      servedModelName,
    }
    this.current = 'ready'
    this.safeDispatchEvent('ready', { detail: handle })
    return handle
  }

  async health(options: { signal?: AbortSignal } = {}): Promise<boolean> {
    if (this.server == null) return false
    try {
      const res = await fetch(`${this.server.url}/health`, {
        signal: options.signal ?? AbortSignal.timeout(2_000),
      })
      return res.ok
    } catch {
      return false
    }
  }

  async metrics(): Promise<EngineMetrics> {
    const out: EngineMetrics = {
      'vllm:num_requests_running': 0,
      'vllm:num_requests_waiting': 0,
      'vllm:generation_tokens_total': 0,
      'vllm:prompt_tokens_total': 0,
      'vllm:kv_cache_usage_perc': 0,
    }
    if (this.server == null) return out
    for (const metric of await this.server.registry.getMetricsAsJSON()) {
      if (metric.name in out) {
        out[metric.name as keyof EngineMetrics] = metric.values.reduce((sum, v) => sum + v.value, 0)
      }
    }
    return out
  }

  async drain(options: { graceMs?: number } = {}): Promise<void> {
    if (this.server == null) return
    this.current = 'draining'
    await this.server.drain(options.graceMs)
  }

  async stop(): Promise<void> {
    const server = this.server
    this.server = null
    if (server == null) return
    await server.close()
    this.current = 'stopped'
    this.safeDispatchEvent('stopped', { detail: { kind: this.kind } })
  }
}
