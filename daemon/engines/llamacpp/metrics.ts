import { Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { PoolStats } from './sequences.ts'

/** The embedded engine's /metrics, under vLLM's names so the daemon reads every engine alike. */
export interface EmbeddedEngineMetrics {
  registry: Registry
  /** Bound once: label lookups per token add up. */
  generated: { inc(n?: number): void }
  prompted: { inc(n?: number): void }
  ttft: { observe(seconds: number): void }
  itl: { observe(seconds: number): void }
}

export function embeddedEngineMetrics(
  servedModelName: string,
  pool: PoolStats,
  contextSize: number,
): EmbeddedEngineMetrics {
  const registry = new Registry()
  const labels = { model_name: servedModelName }
  const labelNames = ['model_name'] as const
  new Gauge({
    name: 'vllm:num_requests_running',
    help: 'Number of requests being generated',
    labelNames,
    registers: [registry],
    collect() {
      this.set(labels, pool.running)
    },
  })
  new Gauge({
    name: 'vllm:num_requests_waiting',
    help: 'Number of requests waiting for a sequence',
    labelNames,
    registers: [registry],
    collect() {
      this.set(labels, pool.queued)
    },
  })
  new Gauge({
    name: 'vllm:kv_cache_usage_perc',
    help: 'KV cache usage (1 = full)',
    labelNames,
    registers: [registry],
    collect() {
      this.set(labels, pool.usedTokens / contextSize)
    },
  })
  const generationTokens = new Counter({
    name: 'vllm:generation_tokens_total',
    help: 'Tokens generated',
    labelNames,
    registers: [registry],
  })
  const promptTokens = new Counter({
    name: 'vllm:prompt_tokens_total',
    help: 'Prompt tokens processed',
    labelNames,
    registers: [registry],
  })
  const ttft = new Histogram({
    name: 'vllm:time_to_first_token_seconds',
    help: 'Time to first token',
    labelNames,
    buckets: [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10],
    registers: [registry],
  })
  const itl = new Histogram({
    name: 'vllm:inter_token_latency_seconds',
    help: 'Time between tokens',
    labelNames,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1],
    registers: [registry],
  })
  const generated = generationTokens.labels(labels)
  const prompted = promptTokens.labels(labels)
  // Present from the start (0), as vLLM's are.
  generated.inc(0)
  prompted.inc(0)
  return { registry, generated, prompted, ttft: ttft.labels(labels), itl: itl.labels(labels) }
}
