import { TypedEventEmitter } from 'main-event'
import { type Logger, silentLogger } from '../../core/logger.ts'
import type { NodeSettings } from '../control/types.ts'
import { evaluateHost } from './policy.ts'
import type { HostInput, HostVerdict } from './types.ts'

/** A game start must pause the node within 2 s, drain included: sampling leaves most of that to the drain. */
export const defaultHostIntervalMs = 500

export interface HostPolicyState {
  paused: boolean
  /** While paused: the reasons of the last sample that fired a rule. */
  reasons: string[]
  /** When the current pause (or run) began; null before the first sample. */
  since: Date | null
  /** While paused and the host is clear: when the node resumes if it stays clear. */
  resumeAt: Date | null
  lastSampleAt: Date | null
}

export interface HostPolicyEvents {
  /** A rule fired while the node ran: sent on the very sample that saw it. */
  pause: CustomEvent<{ reasons: string[] }>
  /** The host stayed clear for settings.resumeAfterSeconds. */
  resume: CustomEvent<{ clearForMs: number; reasons: string[] }>
  /** Every evaluated sample, for dashboards and logs. */
  sample: CustomEvent<{ verdict: HostVerdict; state: HostPolicyState }>
}

export interface HostPolicyMonitorInit {
  sample: (options: { signal: AbortSignal }) => Promise<HostInput>
  settings: () => NodeSettings
  now?: () => Date
  intervalMs?: number
  logger?: Logger
}

/**
 * Samples the host every intervalMs and applies the rules with hysteresis: pause at once, resume
 * only after the host has been clear for settings.resumeAfterSeconds without a break.
 */
export class HostPolicyMonitor extends TypedEventEmitter<HostPolicyEvents> {
  private readonly sampleHost: HostPolicyMonitorInit['sample']
  private readonly settings: () => NodeSettings
  private readonly now: () => Date
  private readonly intervalMs: number
  private readonly log: Logger
  private state: HostPolicyState = {
    paused: false,
    reasons: [],
    since: null,
    resumeAt: null,
    lastSampleAt: null,
  }
  private clearSince: number | null = null
  private inFlight: Promise<HostPolicyState> | null = null
  private controller: AbortController | null = null
  private timer: NodeJS.Timeout | null = null
  private failing = false

  constructor(init: HostPolicyMonitorInit) {
    super()
    this.sampleHost = init.sample
    this.settings = init.settings
    this.now = init.now ?? (() => new Date())
    this.intervalMs = init.intervalMs ?? defaultHostIntervalMs
    this.log = (init.logger ?? silentLogger).child({ component: 'daemon:host' })
  }

  current(): HostPolicyState {
    return { ...this.state, reasons: [...this.state.reasons] }
  }

  /** Samples at once, then every intervalMs (measured start to start; never two samples at a time). */
  start(): void {
    if (this.controller != null) return
    this.controller = new AbortController()
    this.tick(this.controller.signal)
  }

  /** Stops the timer and waits for a sample in flight. */
  async stop(): Promise<void> {
    if (this.controller == null) return
    this.controller.abort()
    this.controller = null
    if (this.timer != null) clearTimeout(this.timer)
    this.timer = null
    await this.inFlight?.catch(() => {})
  }

  /** One sample and evaluation; a call while one is in flight joins it. What the timer runs. */
  check(): Promise<HostPolicyState> {
    this.inFlight ??= this.sampleAndApply().finally(() => {
      this.inFlight = null
    })
    return this.inFlight
  }

  private tick(signal: AbortSignal): void {
    const startedAt = performance.now()
    void this.check().then(() => {
      if (signal.aborted) return
      const elapsed = performance.now() - startedAt
      // A slow sampler (si.processes on Windows) still leaves the machine a breather between samples.
      const delay = Math.max(this.intervalMs / 5, this.intervalMs - elapsed)
      this.timer = setTimeout(() => this.tick(signal), delay)
      this.timer.unref()
    })
  }

  private async sampleAndApply(): Promise<HostPolicyState> {
    let input: HostInput
    try {
      input = await this.sampleHost({ signal: this.controller?.signal ?? new AbortController().signal })
    } catch (err) {
      // Neither pauses nor resumes: the next tick tries again.
      if (!this.failing) this.log.warn({ err }, 'host sample failed; retrying every tick')
      else this.log.debug({ err }, 'host sample failed again')
      this.failing = true
      return this.current()
    }
    if (this.failing) this.log.info('host sampling recovered')
    this.failing = false
    const settings = this.settings()
    const at = this.now()
    const verdict = evaluateHost(input, settings, at, { paused: this.state.paused })
    this.apply(verdict, settings, at)
    this.safeDispatchEvent('sample', { detail: { verdict, state: this.current() } })
    return this.current()
  }

  private apply(verdict: HostVerdict, settings: NodeSettings, at: Date): void {
    const t = at.getTime()
    this.state.lastSampleAt = at
    if (verdict.pause) {
      this.clearSince = null
      this.state.resumeAt = null
      this.state.reasons = verdict.reasons
      if (this.state.paused) return
      this.state.paused = true
      this.state.since = at
      this.log.info({ reasons: verdict.reasons }, 'host policy: pause')
      this.safeDispatchEvent('pause', { detail: { reasons: [...verdict.reasons] } })
      return
    }
    if (!this.state.paused) {
      this.state.since ??= at
      return
    }
    this.clearSince ??= t
    const holdMs = Math.max(0, settings.resumeAfterSeconds) * 1000
    const clearForMs = t - this.clearSince
    if (clearForMs < holdMs) {
      this.state.resumeAt = new Date(this.clearSince + holdMs)
      return
    }
    const reasons = this.state.reasons
    this.state = { paused: false, reasons: [], since: at, resumeAt: null, lastSampleAt: at }
    this.clearSince = null
    this.log.info({ clearForMs, after: reasons }, 'host policy: resume')
    this.safeDispatchEvent('resume', { detail: { clearForMs, reasons } })
  }
}
