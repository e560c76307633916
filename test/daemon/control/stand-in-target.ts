import { TypedEventEmitter } from 'main-event'
import { defaultSettings } from '../../../daemon/control/settings.ts'
import type { ControlEvents, ControlTarget, NodeSettings, NodeStatus } from '../../../daemon/control/types.ts'

/** A ControlTarget with no mesh and no engine: tests drive its events and read what it was asked. */
export class StandInTarget extends TypedEventEmitter<ControlEvents> implements ControlTarget {
  current: NodeStatus = {
    state: 'serving',
    reason: null,
    pausedUntil: null,
    peerId: '12D3KooWStandInPeer',
    region: 'eu-north',
    head: '12D3KooWStandInHead',
    model: 'garage-tiny',
    engine: { kind: 'llamacpp', url: 'http://127.0.0.1:9999', detail: null, failed: [] },
    gpu: { name: 'NVIDIA GeForce RTX 4070', vramMiB: 12_282, utilizationPct: 40, temperatureC: 61 },
    tokensPerSecond: 0,
    tokensToday: 1_200,
    creditsToday: 1_100,
    integrity: null,
    uptimeSeconds: 3_725,
  }
  currentSettings: NodeSettings
  readonly pauseCalls: Array<{ minutes?: number; until?: Date; reason?: string }> = []
  resumeCalls = 0
  readonly idleReports: number[] = []
  readonly logLines: string[] = []
  private readonly saveSettings: ((s: NodeSettings) => Promise<void>) | undefined

  constructor(init: { settings?: NodeSettings; saveSettings?: (s: NodeSettings) => Promise<void> } = {}) {
    super()
    this.currentSettings = init.settings ?? defaultSettings()
    this.saveSettings = init.saveSettings
  }

  status(): NodeStatus {
    return structuredClone(this.current)
  }

  async pause(options: { minutes?: number; until?: Date; reason?: string }): Promise<void> {
    this.pauseCalls.push(options)
    const until =
      options.until ?? (options.minutes != null ? new Date(Date.now() + options.minutes * 60_000) : null)
    this.setState({ state: 'paused', reason: 'paused by you', pausedUntil: until?.toISOString() ?? null })
  }

  async resume(): Promise<void> {
    this.resumeCalls++
    this.setState({ state: 'serving', reason: null, pausedUntil: null })
  }

  settings(): NodeSettings {
    return structuredClone(this.currentSettings)
  }

  async updateSettings(patch: Partial<NodeSettings>): Promise<NodeSettings> {
    this.currentSettings = { ...this.currentSettings, ...patch }
    await this.saveSettings?.(this.currentSettings)
    return this.settings()
  }

  logs(lines: number): string[] {
    return this.logLines.slice(-lines)
  }

  reportIdle(seconds: number): void {
    this.idleReports.push(seconds)
  }

  /** Appends a pino-shaped line. */
  log(msg: string, fields: Record<string, unknown> = {}): void {
    this.logLines.push(JSON.stringify({ level: 30, time: Date.now(), name: 'garage', msg, ...fields }))
  }

  setState(change: Partial<NodeStatus>): void {
    this.current = { ...this.current, ...change }
    this.safeDispatchEvent('state', { detail: this.status() })
  }

  emitStats(tokensPerSecond: number, at = new Date()): void {
    this.current.tokensPerSecond = tokensPerSecond
    this.current.tokensToday += Math.round(tokensPerSecond)
    this.current.creditsToday += Math.round(tokensPerSecond)
    this.safeDispatchEvent('stats', {
      detail: {
        tokensPerSecond,
        tokensToday: this.current.tokensToday,
        creditsToday: this.current.creditsToday,
        at: at.toISOString(),
      },
    })
  }
}
