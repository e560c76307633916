/**
 * The messages a node and its regional head exchange: the capability report a node signs to join,
 * the assignment the head answers with, and the telemetry the node sends every few seconds.
 * Wire encoding: canonical CBOR (mesh/cbor.ts). docs/region.md describes them.
 */

export type NodeServingState = 'starting' | 'serving' | 'paused' | 'draining'

export interface GpuSummary {
  vendor: 'nvidia' | 'amd' | 'intel' | 'apple' | 'other'
  name: string
  vramMiB: number
}

/** What a node tells the head about itself when it joins; signed by the node's libp2p key. */
export interface CapabilityReport {
  v: 1
  /** The node's PeerId; must equal the connection's remote peer. */
  peerId: string
  /** The region the node chose (the head refuses reports for another region). */
  region: string
  daemonVersion: string
  /** Milliseconds since the epoch; the head refuses reports older than a few minutes (replays). */
  issuedAt: number
  hardware: {
    gpus: GpuSummary[]
    ramMiB: number
    cpuCores: number
  }
  /** Engines this node can run now. */
  engines: Array<'llamacpp' | 'vllm' | 'ray-worker'>
  /** The most GPU memory the user lets Garage use (MiB); the head assigns nothing bigger. */
  vramCapMiB: number
  /** Memory the embedded engine may use for a CPU model (MiB). */
  ramCapMiB: number
  /** Host-policy state when the report was made: 'clear' or the reason the node is paused. */
  hostPolicy: { state: 'clear' | 'paused'; reason?: string }
  /** The user opted in to joining a trusted Ray cluster. */
  rayOptIn: boolean
  /**
   * Engines this node has and tried, that failed to serve (a missing image, a failed pull, out of
   * memory, a crash loop): left out of `engines`, with why, for the head to show.
   */
  engineFailures?: EngineFailure[]
}

export interface EngineFailure {
  engine: 'llamacpp' | 'vllm'
  /** At most 128 characters. */
  reason: string
}

/** Where the engine gets its weights. */
export interface ModelSource {
  /** Embedded engine: a GGUF path on the node, `hf:<owner>/<repo>/<file>.gguf`, or `garage-tiny`. */
  gguf?: string
  /** vLLM: a Hugging Face repo id. */
  hf?: string
}

export interface RayCredentials {
  /** host:port of the region's Ray head (GCS). */
  address: string
  /** RAY_AUTH_MODE=token; handed over only inside an assignment, never in the DHT. */
  token: string
  /** The image the head runs: Ray and vLLM versions must match across the cluster. */
  image?: string
}

/** A member's place in a pipeline group: the region's Ray cluster serves one model on several GPUs. */
export interface GroupPlace {
  /** Pipeline stages of the group. */
  size: number
  /** This node's stage, from 0. */
  rank: number
}

/** The head's answer to a join: what to serve and how. */
export interface Assignment {
  v: 1
  region: string
  /** Head PeerId (the only peer allowed to open infer streams to this node). */
  head: string
  /** Name the engine serves the model under; requests name it in `model`. */
  model: string
  /** `ray`: a member of a pipeline group: no engine of its own, its GPU in the region's Ray cluster. */
  engine: 'llamacpp' | 'vllm' | 'ray'
  source: ModelSource
  engineArgs: {
    parallel?: number
    contextLength?: number
    gpuMemoryUtilization?: number
  }
  telemetryIntervalMs: number
  ray?: RayCredentials
  /** What the model serves: absent or 'generate' (chat, completions), 'embed' (/v1/embeddings). */
  task?: ModelTask
  /** With engine `ray`: the group this node is a member of. */
  group?: GroupPlace
}

export type ModelTask = 'generate' | 'embed'

export interface GpuTelemetry {
  utilizationPct: number
  temperatureC: number
  powerW: number
}

/** Sent every telemetryIntervalMs; the connection authenticates the sender. */
export interface TelemetryReport {
  v: 1
  /** Increases by one per report; the head ignores reordered ones. */
  seq: number
  state: NodeServingState
  model: string
  /** Completion tokens the node says it generated since it joined. */
  tokensTotal: number
  promptTokensTotal: number
  tokensPerSecond: number
  running: number
  waiting: number
  /** 0..1 */
  kvCacheUsage: number
  gpu?: GpuTelemetry
  /** The node's Ray worker, when its assignment gave it one: joined the cluster, or not (yet). */
  ray?: 'ready' | 'starting'
}
