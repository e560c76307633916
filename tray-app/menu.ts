import { statusLine, type TrayView, trayStateOf } from './state.ts'

/**
 * The tray menu as plain objects, built from the view on every change. Electron's
 * Menu.buildFromTemplate takes them as they are (the fields are a subset of
 * MenuItemConstructorOptions); tests read them directly.
 */
export interface TrayMenuItem {
  id?: TrayMenuItemId
  type?: 'normal' | 'separator' | 'checkbox'
  label?: string
  enabled?: boolean
  visible?: boolean
  checked?: boolean
  click?: () => void
}

export type TrayMenuItemId =
  | 'status'
  | 'pause-hour'
  | 'pause-tomorrow'
  | 'resume'
  | 'start'
  | 'dashboard'
  | 'start-at-login'
  | 'quit'

/** What the menu's items do; setupMenu wires them to the daemon client, tests to spies. */
export interface MenuActions {
  pauseFor(minutes: number): void
  pauseUntil(until: Date): void
  resume(): void
  /** Start the node (or the installed service) when none runs. */
  start(): void
  openDashboard(): void
  setStartAtLogin(enabled: boolean): void
  quit(): void
}

export interface MenuOptions {
  /** The "Start at login" checkbox. */
  startAtLogin: boolean
  /** Whether the tray can start a node (it has a config, or a service to start). */
  canStart: boolean
  now?: Date
  locale?: string
}

/** "Pause until tomorrow" ends at this local hour. */
export const tomorrowMorningHour = 8
/** Before this local hour it is still "tonight": tomorrow morning is the coming one. */
export const nightEndsHour = 4

/**
 * When "Pause until tomorrow" ends: 08:00 local time the next day; between midnight and 04:00
 * (a gamer's late night, still "today" to them) the coming 08:00. Local calendar arithmetic, so a
 * DST change in between still lands on 08:00.
 */
export function nextMorning(now: Date, hour = tomorrowMorningHour): Date {
  const at = new Date(now.getFullYear(), now.getMonth(), now.getDate(), hour, 0, 0, 0)
  if (now.getHours() >= nightEndsHour) at.setDate(at.getDate() + 1)
  return at
}

export const pauseHourMinutes = 60

export function buildMenuTemplate(
  view: TrayView,
  options: MenuOptions,
  actions: MenuActions,
): TrayMenuItem[] {
  const state = trayStateOf(view)
  const now = options.now ?? new Date()
  const connected = view.status != null
  const canPause = connected && (state === 'serving' || state === 'starting')
  const morning = nextMorning(now)
  const morningText = morning.toLocaleTimeString(options.locale, { hour: '2-digit', minute: '2-digit' })
  return [
    { id: 'status', label: statusLine(view, now, options.locale), enabled: false },
    { type: 'separator' },
    {
      id: 'pause-hour',
      label: 'Pause for 1 hour',
      visible: state !== 'paused',
      enabled: canPause,
      click: () => actions.pauseFor(pauseHourMinutes),
    },
    {
      id: 'pause-tomorrow',
      label: `Pause until tomorrow ${morningText}`,
      visible: state !== 'paused',
      enabled: canPause,
      // Computed at click time: the menu may have been built hours earlier.
      click: () => actions.pauseUntil(nextMorning(new Date())),
    },
    {
      id: 'resume',
      label: 'Resume',
      visible: state === 'paused',
      enabled: connected,
      click: () => actions.resume(),
    },
    {
      id: 'start',
      label: 'Start Garage',
      visible: state === 'stopped' || (state === 'error' && !connected),
      enabled: options.canStart,
      click: () => actions.start(),
    },
    { type: 'separator' },
    { id: 'dashboard', label: 'Open dashboard', enabled: connected, click: () => actions.openDashboard() },
    {
      id: 'start-at-login',
      type: 'checkbox',
      label: 'Start at login',
      checked: options.startAtLogin,
      click: () => actions.setStartAtLogin(!options.startAtLogin),
    },
    { type: 'separator' },
    { id: 'quit', label: 'Quit Garage', click: () => actions.quit() },
  ]
}
