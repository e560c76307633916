import type { Logger } from '../../core/logger.ts'
import { runTool } from '../../core/tools.ts'
import type { GpuTelemetry, NodeServingState, TelemetryReport } from '../../mesh/region-messages.ts'
import {
  type IntegrityStanding,
  type TelemetryAck,
  TelemetryReporter,
} from '../../mesh/telemetry-protocol.ts'
import type { EngineMetrics } from '../engines/types.ts'
import { nvidiaGpuArgs, parseNvidiaGpus } from '../hardware/nvidia.ts'

const gpuTelemetryTimeoutMs = 2_000

/** Sums a cumulative counter that may restart (a rejoin) into a per-UTC-day total. */
export class DailyTotal {
  private day = ''
  private today = 0
  private last = 0

  feed(cumulative: number, now = new Date()): void {
    const day = now.toISOString().slice(0, 10)
    if (day !== this.day) {
      this.day = day
      this.today = 0
    }
    this.today += cumulative >= this.last ? cumulative - this.last : cumulative
    this.last = cumulative
  }

  /** A counter that restarts from zero (a new join) must not count its first value twice. */
  restart(): void {
    this.last = 0
  }

  value(now = new Date()): number {
    return now.toISOString().slice(0, 10) === this.day ? this.today : 0
  }
}

/** A report as the daemon collects it; the sender numbers it. */
export type TelemetryBody = Omit<TelemetryReport, 'v' | 'seq'>

export interface NodeTelemetrySource {
  /** The engine's counters now; null when no engine runs (or it does not answer). */
  metrics(): Promise<EngineMetrics | null>
  /** What the head should see: the daemon's state folded into the serving states. */
  state(): NodeServingState
  model(): string
  /** nvidia-smi is there to ask. */
  nvidia(): boolean
  /** The node's Ray worker, when its assignment gave it one. */
  ray?(): 'ready' | 'starting' | null
  /** The head's integrity standing for this node changed (the gamer's status shows it). */
  integrityChanged?(): void
  /** Sends one numbered report to the head; resolves with its answer. */
  send(
    report: TelemetryReport,
    onVerified: (tokens: number, integrity: IntegrityStanding | null) => void,
  ): Promise<TelemetryAck>
}

/**
 * The node's telemetry: what the engine generated since the node joined, its rate, the GPU, and the
 * reports that carry them to the head (one per interval, and at once on a state change). Keeps the
 * day's tokens and credits for the status the gamer sees.
 */
export class NodeTelemetry {
  readonly #source: NodeTelemetrySource
  readonly #log: Logger
  #seq = 0
  /** Engine counters when this node joined: reports count tokens since the join. */
  #baseline = { generation: 0, prompt: 0 }
  #lastRate = { at: 0, tokens: 0, perSecond: 0 }
  readonly #tokensToday = new DailyTotal()
  readonly #creditsToday = new DailyTotal()
  #integrity: IntegrityStanding | null = null
  #reporter: TelemetryReporter | null = null

  constructor(source: NodeTelemetrySource, logger: Logger) {
    this.#source = source
    this.#log = logger
  }

  get tokensPerSecond(): number {
    return Math.max(0, Math.round(this.#lastRate.perSecond * 10) / 10)
  }

  tokensToday(): number {
    return this.#tokensToday.value()
  }

  /** The head's integrity standing for this node: null in good standing, else quarantined or appealing. */
  integrity(): IntegrityStanding | null {
    return this.#integrity
  }

  creditsToday(): number {
    return this.#creditsToday.value()
  }

  /** The head admitted this node (again): it numbers reports from 1 for the new entry. */
  resetSequence(): void {
    this.#seq = 0
  }

  /** After a join, with the engine up: counting starts again from the engine's counters now. */
  async joined(): Promise<void> {
    const m = await this.#source.metrics()
    this.#baseline = {
      generation: m?.['vllm:generation_tokens_total'] ?? 0,
      prompt: m?.['vllm:prompt_tokens_total'] ?? 0,
    }
    this.#lastRate = { at: performance.now(), tokens: 0, perSecond: 0 }
    // Both cumulative counts start again from zero with this join.
    this.#tokensToday.restart()
    this.#creditsToday.restart()
  }

  /** Reports every `intervalMs`; `onNotJoined` when the head no longer knows this node. */
  start(intervalMs: number, onNotJoined: () => void): void {
    if (this.#reporter != null) return
    this.#reporter = new TelemetryReporter({
      intervalMs,
      send: (report) => this.#send(report),
      collect: () => this.collect(),
      onNotJoined,
      onError: (err) => this.#log.debug({ err: err.message }, 'telemetry not delivered'),
    })
    this.#reporter.start()
  }

  stop(): void {
    this.#reporter?.stop()
    this.#reporter = null
  }

  /** Sends a report now rather than at the next tick (state changes the head must know). */
  async reportNow(): Promise<void> {
    await this.collect()
      .then((r) => this.#send(r))
      .catch((err: Error) => this.#log.debug({ err: err.message }, 'telemetry not delivered'))
  }

  async collect(): Promise<TelemetryBody> {
    const m = await this.#source.metrics()
    const tokensTotal = Math.max(0, (m?.['vllm:generation_tokens_total'] ?? 0) - this.#baseline.generation)
    if (m != null) this.#tokensToday.feed(tokensTotal)
    const now = performance.now()
    const elapsed = (now - this.#lastRate.at) / 1000
    if (elapsed >= 1) {
      this.#lastRate = {
        at: now,
        tokens: tokensTotal,
        perSecond: (tokensTotal - this.#lastRate.tokens) / elapsed,
      }
    }
    const gpu = await this.#gpu()
    const ray = this.#source.ray?.() ?? null
    return {
      state: this.#source.state(),
      model: this.#source.model(),
      tokensTotal,
      promptTokensTotal: Math.max(0, (m?.['vllm:prompt_tokens_total'] ?? 0) - this.#baseline.prompt),
      tokensPerSecond: this.tokensPerSecond,
      running: m?.['vllm:num_requests_running'] ?? 0,
      waiting: m?.['vllm:num_requests_waiting'] ?? 0,
      kvCacheUsage: Math.min(1, Math.max(0, m?.['vllm:kv_cache_usage_perc'] ?? 0)),
      ...(gpu != null ? { gpu } : {}),
      ...(ray != null ? { ray } : {}),
    }
  }

  #send(report: TelemetryBody): Promise<TelemetryAck> {
    // This count, not the reporter's: it starts again from 1 at each join, as the head expects.
    return this.#source.send({ v: 1, ...report, seq: ++this.#seq }, (tokens, integrity) => {
      this.#creditsToday.feed(tokens)
      if (integrity?.state !== this.#integrity?.state) {
        if (integrity != null)
          this.#log.warn({ integrity }, 'the head holds this node back: its answers failed integrity checks')
        else if (this.#integrity != null) this.#log.info('the head lets this node serve again')
      }
      this.#integrity = integrity
    })
  }

  /** Utilisation, temperature and power of the first NVIDIA GPU, when there is one. */
  async #gpu(): Promise<GpuTelemetry | null> {
    if (!this.#source.nvidia()) return null
    const result = await runTool('nvidia-smi', nvidiaGpuArgs, { timeoutMs: gpuTelemetryTimeoutMs })
    if (result.status !== 'ok') return null
    const gpu = parseNvidiaGpus(result.stdout)[0]
    if (gpu == null) return null
    return {
      utilizationPct: gpu.utilizationPct ?? 0,
      temperatureC: gpu.temperatureC ?? 0,
      powerW: gpu.powerDrawW ?? 0,
    }
  }
}
