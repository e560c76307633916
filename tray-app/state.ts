import type { NodeStatus } from '../daemon/control/types.ts'

/** What the tray shows: one icon, one status line, one set of menu items per state. */
export const TrayState = Object.freeze({
  starting: 'starting',
  serving: 'serving',
  paused: 'paused',
  error: 'error',
  stopped: 'stopped',
} as const)
export type TrayState = (typeof TrayState)[keyof typeof TrayState]

export const trayStates: readonly TrayState[] = Object.freeze(Object.values(TrayState))

/**
 * What the tray knows about the daemon process while it has no status from it:
 * 'searching' (looking for one), 'starting' (spawned, or the service is coming up; also after a
 * lost connection while the process lives), 'running' (connected), 'absent' (none runs).
 */
export type DaemonPhase = 'searching' | 'starting' | 'running' | 'absent'

export interface TrayView {
  /** The daemon's last status; null while not connected. */
  status: NodeStatus | null
  daemon: DaemonPhase
  /** A failure on the tray's side (not set up, the node it started crashed); shown as 'error'. */
  problem: string | null
  /** From the 1 Hz `stats` events (and each status). */
  tokensPerSecond: number
}

export const initialView: TrayView = Object.freeze({
  status: null,
  daemon: 'searching',
  problem: null,
  tokensPerSecond: 0,
})

/** The daemon's seven states folded into the tray's five. */
export function trayStateFromStatus(status: NodeStatus): TrayState {
  switch (status.state) {
    case 'starting':
      return TrayState.starting
    case 'serving':
      return TrayState.serving
    case 'paused':
      return TrayState.paused
    case 'error':
      return TrayState.error
    // draining only happens on the way to a stop: the node takes no new work.
    case 'draining':
    case 'stopping':
    case 'stopped':
      return TrayState.stopped
  }
}

export function trayStateOf(view: TrayView): TrayState {
  if (view.problem != null) return TrayState.error
  if (view.status != null) return trayStateFromStatus(view.status)
  return view.daemon === 'absent' ? TrayState.stopped : TrayState.starting
}

/** The game named in a pause reason ('game: X.exe', possibly among others joined by ', '). */
export function gameOf(reason: string | null | undefined): string | null {
  for (const part of (reason ?? '').split(', ')) {
    const m = /^game:\s*(.+)$/.exec(part.trim())
    if (m != null) return m[1] as string
  }
  return null
}

function timeText(at: Date, now: Date, locale?: string): string {
  const time = at.toLocaleTimeString(locale, { hour: '2-digit', minute: '2-digit' })
  const day = (d: Date): number => new Date(d.getFullYear(), d.getMonth(), d.getDate()).getTime()
  const days = Math.round((day(at) - day(now)) / 86_400_000)
  if (days === 0) return time
  if (days === 1) return `tomorrow ${time}`
  return `${at.toLocaleDateString(locale, { weekday: 'short', day: 'numeric', month: 'short' })} ${time}`
}

const maxStatusLineChars = 64

function clip(text: string): string {
  return text.length <= maxStatusLineChars ? text : `${text.slice(0, maxStatusLineChars - 1)}…`
}

/** The first (disabled) menu line. */
export function statusLine(view: TrayView, now = new Date(), locale?: string): string {
  const s = view.status
  switch (trayStateOf(view)) {
    case 'error':
      return clip(`Error: ${view.problem ?? s?.reason ?? 'see the dashboard'}`)
    case 'serving':
      return clip(
        `Serving${s?.model != null ? ` ${s.model}` : ''}${s?.region != null ? ` in ${s.region}` : ''}`,
      )
    case 'paused': {
      const game = gameOf(s?.reason)
      if (game != null) return clip(`Paused: ${game} is running`)
      if (s?.pausedUntil != null)
        return clip(`Paused until ${timeText(new Date(s.pausedUntil), now, locale)}`)
      return clip(`Paused: ${s?.reason ?? 'by you'}`)
    }
    case 'starting':
      if (s != null) return 'Starting: joining a region…'
      if (view.daemon === 'searching') return 'Looking for the Garage node…'
      if (view.daemon === 'running') return 'Reconnecting to the Garage node…'
      return 'Starting the Garage node…'
    case 'stopped':
      if (s?.state === 'draining' || s?.state === 'stopping') return 'Stopping: finishing requests…'
      return 'Garage is not running'
  }
}

const stateWords: Record<TrayState, string> = {
  starting: 'starting',
  serving: 'serving',
  paused: 'paused',
  error: 'error',
  stopped: 'not running',
}

/** The icon's tooltip: state and speed. */
export function tooltip(view: TrayView): string {
  const state = trayStateOf(view)
  const speed = state === 'serving' ? `, ${view.tokensPerSecond.toFixed(1)} tok/s` : ''
  const game = state === 'paused' ? gameOf(view.status?.reason) : null
  return `Garage: ${stateWords[state]}${speed}${game != null ? ` (${game})` : ''}`
}

export interface TrayNotice {
  title: string
  body: string
}

/**
 * The changes worth a desktop notification: the node paused for a game (the gamer should know
 * the GPU is theirs), and an error. Not the user's own pauses, not serving, not every change.
 */
export function noticeFor(prev: TrayView, next: TrayView): TrayNotice | null {
  const before = trayStateOf(prev)
  const after = trayStateOf(next)
  if (after === 'paused') {
    const game = gameOf(next.status?.reason)
    if (game != null && (before !== 'paused' || gameOf(prev.status?.reason) !== game))
      return {
        title: 'Garage paused for your game',
        body: `${game} is running: Garage stopped serving and freed the GPU. It resumes when the game closes.`,
      }
    return null
  }
  if (after === 'error' && before !== 'error')
    return {
      title: 'Garage has a problem',
      body: next.problem ?? next.status?.reason ?? 'Open the dashboard from the tray menu for details.',
    }
  return null
}

export type TrayChange = 'state' | 'stats'
export type TrayListener = (view: TrayView, prev: TrayView, change: TrayChange) => void

/** The one place the tray's view lives; setupX modules subscribe to it. */
export class TrayStore {
  private current: TrayView = initialView
  private readonly listeners = new Set<TrayListener>()
  private readonly onListenerError: (err: unknown) => void

  constructor(onListenerError: (err: unknown) => void = () => {}) {
    this.onListenerError = onListenerError
  }

  get view(): TrayView {
    return this.current
  }

  get state(): TrayState {
    return trayStateOf(this.current)
  }

  /** A new status, daemon phase or problem: listeners hear 'state'. */
  update(patch: Partial<Omit<TrayView, 'tokensPerSecond'>>): void {
    const prev = this.current
    const next: TrayView = Object.freeze({
      ...prev,
      ...patch,
      tokensPerSecond: patch.status != null ? patch.status.tokensPerSecond : prev.tokensPerSecond,
    })
    if (
      next.status === prev.status &&
      next.daemon === prev.daemon &&
      next.problem === prev.problem &&
      next.tokensPerSecond === prev.tokensPerSecond
    )
      return
    this.current = next
    this.emit(next, prev, 'state')
  }

  /** The 1 Hz numbers: listeners hear 'stats' (tooltip only; the menu is not rebuilt). */
  setTokensPerSecond(tokensPerSecond: number): void {
    const prev = this.current
    if (prev.tokensPerSecond === tokensPerSecond) return
    this.current = Object.freeze({ ...prev, tokensPerSecond })
    this.emit(this.current, prev, 'stats')
  }

  subscribe(listener: TrayListener): () => void {
    this.listeners.add(listener)
    return () => this.listeners.delete(listener)
  }

  private emit(view: TrayView, prev: TrayView, change: TrayChange): void {
    for (const listener of [...this.listeners]) {
      try {
        listener(view, prev, change)
      } catch (err) {
        // One broken listener (a destroyed tray) must not stop the others.
        this.onListenerError(err)
      }
    }
  }
}
