/** The region every bench/scale measurement uses: one model, CPU nodes, realistic messages. */
import { parseRegionPolicy, type RegionPolicy } from '../../bootstrap/head/policy.ts'
import type { CapabilityReport, TelemetryReport } from '../../mesh/region-messages.ts'

export const benchRegion = 'scale-bench'
export const benchModel = 'llama-3.1-8b-instruct'
/** Parallel sequences per node, as a consumer GPU with vLLM or llama.cpp serves them. */
export const benchSlots = 4

export function benchPolicy(): RegionPolicy {
  return parseRegionPolicy({
    region: benchRegion,
    models: [
      {
        name: benchModel,
        engine: ['llamacpp'],
        source: { gguf: 'garage-tiny' },
        replicas: 100_000,
        minVramMiB: 0,
        minRamMiB: 64,
        parallel: benchSlots,
        contextLength: 4096,
      },
    ],
    ray: { enabled: false },
  })
}

/** What a gaming PC with one NVIDIA card reports when it joins. */
export function benchReport(peerId: string, issuedAt: number): CapabilityReport {
  return {
    v: 1,
    peerId,
    region: benchRegion,
    daemonVersion: '0.1.0',
    issuedAt,
    hardware: {
      gpus: [{ vendor: 'nvidia', name: 'NVIDIA GeForce RTX 4070', vramMiB: 12_282 }],
      ramMiB: 32_768,
      cpuCores: 16,
    },
    engines: ['llamacpp'],
    vramCapMiB: 10_240,
    ramCapMiB: 8_192,
    hostPolicy: { state: 'clear' },
    rayOptIn: false,
  }
}

/** A serving node's telemetry, with the optional GPU block (the larger form). */
export function benchTelemetry(seq: number, rng: () => number = Math.random): TelemetryReport {
  return {
    v: 1,
    seq,
    state: 'serving',
    model: benchModel,
    tokensTotal: 1_000 * seq,
    promptTokensTotal: 3_000 * seq,
    tokensPerSecond: Math.round(rng() * 1200) / 10,
    running: Math.floor(rng() * (benchSlots + 1)),
    waiting: Math.floor(rng() * 3),
    kvCacheUsage: Math.round(rng() * 1000) / 1000,
    gpu: {
      utilizationPct: Math.round(rng() * 100),
      temperatureC: 55 + Math.round(rng() * 25),
      powerW: 120 + Math.round(rng() * 80),
    },
  }
}
