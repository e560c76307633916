import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client'
import { errorCodesOf } from '../core/errors.ts'
import type { RegionDirectory } from './regions.ts'

/** The federation's /metrics. */
export interface FederationMetrics {
  registry: Registry
  requests: Counter<'model' | 'region' | 'status'>
  ttft: Histogram<'model' | 'region'>
  e2e: Histogram<'model' | 'region'>
  tokens: Counter<'model' | 'kind'>
  rateLimited: Counter<'reason'>
  failovers: Counter<'reason'>
  /** Requests answered with an error before their first byte, by error code (see errorCodeLabel). */
  errors: Counter<'code'>
  /** Answered requests by API key name (see keyLabel). */
  keyRequests: Counter<'key' | 'status'>
  /** Billed tokens by API key name and kind (see keyLabel). */
  keyTokens: Counter<'key' | 'kind'>
  /**
   * The `key` label for a key's name: the first maxKeyLabels names each get their own, later ones
   * share "other", so a federation with many keys cannot grow /metrics without bound.
   */
  keyLabel(name: string): string
  /** Streamed answers in progress. */
  activeStreams: { value: number }
}

/** Key names with series of their own in the per-key metrics; the rest are counted as "other". */
export const maxKeyLabels = 200
export const otherKeyLabel = 'other'

/**
 * The `code` label for an error's code: the API's codes Garage defines (core/errors.ts), "other" for any
 * other (a code passed on from a head is not trusted to be one of them), "none" for no code.
 */
export function errorCodeLabel(code: string): string {
  if (code === '') return 'none'
  return apiErrorCodes.has(code) ? code : 'other'
}

const apiErrorCodes = errorCodesOf('openai')

export function federationMetrics(directory: RegionDirectory): FederationMetrics {
  const metrics = new Registry()
  collectDefaultMetrics({ register: metrics, prefix: 'garage_federation_' })
  const activeStreams = { value: 0 }
  new Gauge({
    name: 'garage_federation_active_streams',
    help: 'Streamed answers in progress',
    registers: [metrics],
    collect() {
      this.set(activeStreams.value)
    },
  })
  new Gauge({
    name: 'garage_federation_regions',
    help: 'Regions known, by reachability',
    labelNames: ['reachable'] as const,
    registers: [metrics],
    collect() {
      this.reset()
      const all = directory.regions()
      this.set({ reachable: 'true' }, all.filter((r) => r.reachable).length)
      this.set({ reachable: 'false' }, all.filter((r) => !r.reachable).length)
    },
  })
  const labelledKeys = new Set<string>()
  return {
    registry: metrics,
    activeStreams,
    keyLabel(name) {
      if (labelledKeys.has(name)) return name
      if (labelledKeys.size >= maxKeyLabels) return otherKeyLabel
      labelledKeys.add(name)
      return name
    },
    errors: new Counter({
      name: 'garage_federation_errors_total',
      help: 'Requests answered with an error before their first byte, by error code (docs/errors.md; "other" for a code Garage does not define)',
      labelNames: ['code'] as const,
      registers: [metrics],
    }),
    keyRequests: new Counter({
      name: 'garage_federation_key_requests_total',
      help: `Requests answered, by API key name (${maxKeyLabels} names at most, the rest "${otherKeyLabel}") and HTTP status`,
      labelNames: ['key', 'status'] as const,
      registers: [metrics],
    }),
    keyTokens: new Counter({
      name: 'garage_federation_key_tokens_total',
      help: `Tokens billed, by API key name (${maxKeyLabels} names at most, the rest "${otherKeyLabel}") and kind (prompt, completion)`,
      labelNames: ['key', 'kind'] as const,
      registers: [metrics],
    }),
    requests: new Counter({
      name: 'garage_federation_requests_total',
      help: 'Requests answered, by model, region and HTTP status',
      labelNames: ['model', 'region', 'status'] as const,
      registers: [metrics],
    }),
    ttft: new Histogram({
      name: 'garage_federation_time_to_first_byte_seconds',
      help: 'From the request reaching the gateway to the first byte of its answer',
      labelNames: ['model', 'region'] as const,
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers: [metrics],
    }),
    e2e: new Histogram({
      name: 'garage_federation_request_duration_seconds',
      help: 'Whole request, end to end',
      labelNames: ['model', 'region'] as const,
      buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
      registers: [metrics],
    }),
    tokens: new Counter({
      name: 'garage_federation_tokens_total',
      help: 'Tokens billed, by model and kind (prompt, completion)',
      labelNames: ['model', 'kind'] as const,
      registers: [metrics],
    }),
    rateLimited: new Counter({
      name: 'garage_federation_rate_limited_total',
      help: 'Requests refused by a per-key limit, by which limit',
      labelNames: ['reason'] as const,
      registers: [metrics],
    }),
    failovers: new Counter({
      name: 'garage_federation_failovers_total',
      help: 'Requests moved to another region before their first byte, by reason',
      labelNames: ['reason'] as const,
      registers: [metrics],
    }),
  }
}
