import type { TypedEventTarget } from 'main-event'

/**
 * The one engine interface the daemon uses, whatever runs the model: the embedded llama.cpp server,
 * vLLM in a container, or (for multi-node models) a Ray worker feeding a vLLM elsewhere.
 */

export type EngineKindName = 'llamacpp' | 'vllm' | 'ray-worker'

export type EngineState = 'starting' | 'ready' | 'draining' | 'crashed' | 'stopped'

export interface EngineStartOptions {
  /** Catalog id or a path to a GGUF file (embedded) / a Hugging Face repo id (vLLM). */
  model: string
  /** Name the OpenAI API serves the model under (`model` in requests, `/v1/models`). */
  servedModelName?: string
  /** Context length to size the KV cache for. */
  contextLength?: number
  /** Sequences decoded at once; requests past it wait in a bounded queue. */
  parallel?: number
  /** Requests that may wait; past it the engine answers 429. */
  maxQueue?: number
  /** CPU threads (embedded). */
  threads?: number
  /** Share of GPU memory the engine may use, from the user's VRAM cap (vLLM's --gpu-memory-utilization). */
  gpuMemoryUtilization?: number
  /**
   * Tokens per second, per sequence (embedded engine): a volunteer's cap on how hard the engine works,
   * and how tests make a slower node. A positive finite number; none means as fast as it can.
   */
  maxTokensPerSecond?: number
  /** What the model serves: chat and completions (default), or embeddings. */
  task?: 'generate' | 'embed'
  signal?: AbortSignal
}

/** What the daemon needs to talk to a started engine: always loopback, always with a key. */
export interface EngineHandle {
  kind: EngineKindName
  /** e.g. http://127.0.0.1:41234 (no trailing slash); OpenAI routes are under /v1. */
  baseUrl: string
  /** Bearer key the engine requires; random per start. */
  apiKey: string
  servedModelName: string
}

/** Engine metrics under vLLM's names, whatever the engine. */
export interface EngineMetrics {
  'vllm:num_requests_running': number
  'vllm:num_requests_waiting': number
  'vllm:generation_tokens_total': number
  'vllm:prompt_tokens_total': number
  /** 0..1 */
  'vllm:kv_cache_usage_perc': number
}

export interface EngineEvents {
  starting: CustomEvent<{ kind: EngineKindName }>
  ready: CustomEvent<EngineHandle>
  crashed: CustomEvent<{ error: Error; restarts: number }>
  stopped: CustomEvent<{ kind: EngineKindName }>
}

export interface Engine extends TypedEventTarget<EngineEvents> {
  readonly kind: EngineKindName
  readonly state: EngineState
  start(options: EngineStartOptions): Promise<EngineHandle>
  /** True when the engine answers its health check now. */
  health(options?: { signal?: AbortSignal }): Promise<boolean>
  metrics(options?: { signal?: AbortSignal }): Promise<EngineMetrics>
  /** Stop taking new requests and resolve when in-flight ones are done or the grace period ends. */
  drain(options?: { graceMs?: number }): Promise<void>
  stop(): Promise<void>
}
