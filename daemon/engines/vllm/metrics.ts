import { GarageError } from '../../../core/errors.ts'
import type { EngineMetrics } from '../types.ts'

export class VllmMetricsError extends GarageError {}

export interface PrometheusSample {
  labels: Record<string, string>
  value: number
}

const sampleLine = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$/
const labelPair = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g

function parseValue(text: string): number {
  if (text === '+Inf' || text === 'Inf') return Number.POSITIVE_INFINITY
  if (text === '-Inf') return Number.NEGATIVE_INFINITY
  return Number(text)
}

/** Prometheus text exposition (0.0.4) → samples by metric name; comments and junk lines are skipped. */
export function parsePrometheusText(text: string): Map<string, PrometheusSample[]> {
  const out = new Map<string, PrometheusSample[]>()
  for (const raw of text.split('\n')) {
    const line = raw.trim()
    if (line === '' || line.startsWith('#')) continue
    const m = sampleLine.exec(line)
    if (m == null) continue
    const labels: Record<string, string> = {}
    for (const pair of (m[3] ?? '').matchAll(labelPair)) {
      labels[pair[1]!] = pair[2]!.replace(/\\(["\\n])/g, (_, c: string) => (c === 'n' ? '\n' : c))
    }
    const value = parseValue(m[4]!)
    if (Number.isNaN(value)) continue
    const list = out.get(m[1]!) ?? []
    list.push({ labels, value })
    out.set(m[1]!, list)
  }
  return out
}

const sum = (samples: PrometheusSample[] | undefined): number | null =>
  samples == null || samples.length === 0 ? null : samples.reduce((s, x) => s + x.value, 0)
const mean = (samples: PrometheusSample[] | undefined): number | null =>
  samples == null || samples.length === 0 ? null : samples.reduce((s, x) => s + x.value, 0) / samples.length

/**
 * vLLM's /metrics → EngineMetrics. Counts add up over the engine's label sets (one per data-parallel
 * engine); KV-cache usage is a per-engine share, so it is averaged. `vllm:kv_cache_usage_perc` is the
 * current name; engines before 0.10 only export `vllm:gpu_cache_usage_perc`, since removed.
 */
export function vllmEngineMetrics(text: string): EngineMetrics {
  const samples = parsePrometheusText(text)
  const running = sum(samples.get('vllm:num_requests_running'))
  const waiting = sum(samples.get('vllm:num_requests_waiting'))
  if (running == null && waiting == null) {
    throw new VllmMetricsError('the engine exposes no vllm:* request metrics', 'VLLM_METRICS_MISSING')
  }
  const kv =
    mean(samples.get('vllm:kv_cache_usage_perc')) ?? mean(samples.get('vllm:gpu_cache_usage_perc')) ?? 0
  return {
    'vllm:num_requests_running': running ?? 0,
    'vllm:num_requests_waiting': waiting ?? 0,
    'vllm:generation_tokens_total': sum(samples.get('vllm:generation_tokens_total')) ?? 0,
    'vllm:prompt_tokens_total': sum(samples.get('vllm:prompt_tokens_total')) ?? 0,
    'vllm:kv_cache_usage_perc': Math.min(1, Math.max(0, kv)),
  }
}
