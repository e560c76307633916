import type { TypedEventTarget } from 'main-event'

/**
 * What the local control API (and through it the CLI, the tray app and the dashboard) sees of the
 * node daemon. NodeDaemon implements it; tests pass a stand-in.
 */

export type ControlState = 'stopped' | 'starting' | 'serving' | 'paused' | 'draining' | 'stopping' | 'error'

export interface NodeStatus {
  state: ControlState
  /** Why the node is paused or in error: 'user', 'game: FortniteClient-Win64-Shipping.exe', 'schedule', ... */
  reason: string | null
  /** When a user pause ends (ISO time), if it was given a length. */
  pausedUntil: string | null
  peerId: string | null
  region: string | null
  head: string | null
  model: string | null
  engine: {
    kind: string
    url: string | null
    /** What the engine is doing besides serving: pulling its image (how far), or why it failed. */
    detail: string | null
    /** Engines that failed on this node (it serves on another one meanwhile), with why. */
    failed: Array<{ engine: string; reason: string }>
  } | null
  gpu: { name: string; vramMiB: number; utilizationPct: number | null; temperatureC: number | null } | null
  tokensPerSecond: number
  tokensToday: number
  /** Credits today: the tokens the head verified for this node today (what the ledger will credit). */
  creditsToday: number
  /**
   * The head holds this node back because its answers failed integrity checks (docs/integrity.md):
   * `quarantined` (no traffic, credits held back; restart the node to appeal) or `appeal` (the head
   * is checking a burst of its answers). null: in good standing.
   */
  integrity: { state: 'quarantined' | 'appeal'; reason: string } | null
  uptimeSeconds: number
}

/** User settings; every field validated by the control API before it reaches the daemon. */
export interface NodeSettings {
  /** Extra game or launcher process names (Windows .exe or Linux names; case-insensitive). */
  games: string[]
  /** Weekday hour windows when the node may work; empty = always. day 0 = Sunday. */
  schedule: Array<{ days: number[]; startHour: number; endHour: number }>
  /** Most GPU memory Garage may use (MiB); null = the default (90% of the GPU). */
  vramCapMiB: number | null
  /** Pause above this GPU temperature (°C); null = no cap. */
  maxGpuTemperatureC: number | null
  /** Pause on battery power. */
  pauseOnBattery: boolean
  /** Work only after this many minutes without user input; null = off. */
  idleOnlyMinutes: number | null
  /** Seconds the host must stay clear before the node resumes after an automatic pause. */
  resumeAfterSeconds: number
}

export interface ControlEvents {
  /** Every state change. */
  state: CustomEvent<NodeStatus>
  /** Once a second while running: the numbers a dashboard charts. */
  stats: CustomEvent<{ tokensPerSecond: number; tokensToday: number; creditsToday: number; at: string }>
}

export interface ControlTarget extends TypedEventTarget<ControlEvents> {
  status(): NodeStatus
  /** Pause for `minutes`, until a time, or until resumed. */
  pause(options: { minutes?: number; until?: Date; reason?: string }): Promise<void>
  resume(): Promise<void>
  settings(): NodeSettings
  /** Applies and persists validated settings; returns what is now in force. */
  updateSettings(patch: Partial<NodeSettings>): Promise<NodeSettings>
  /** The last `lines` log lines (JSON lines as pino writes them). */
  logs(lines: number): string[]
  /** Seconds since the last user input, reported by the tray app (Electron's powerMonitor). */
  reportIdle?(seconds: number): void
}
