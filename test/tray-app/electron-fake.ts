import { EventEmitter } from 'node:events'

/**
 * A stand-in for the `electron` module (its binary is not installed here). Test files do
 * `vi.mock('electron', () => import('./electron-fake.ts'))` and inspect these objects.
 */

export interface PreventableEvent {
  defaultPrevented: boolean
  preventDefault(): void
  url?: string
}

export function preventable(extra: { url?: string } = {}): PreventableEvent {
  return {
    ...extra,
    defaultPrevented: false,
    preventDefault() {
      this.defaultPrevented = true
    },
  }
}

interface LoginItemCall {
  openAtLogin?: boolean
  path?: string
  args?: string[]
}

class FakeApp extends EventEmitter {
  singleInstanceLock = true
  quitRequests = 0
  quitted = false
  exitCode: number | null = null
  openAtLogin = false
  readonly setLoginItemCalls: LoginItemCall[] = []
  readonly getLoginItemCalls: LoginItemCall[] = []
  readonly dock = undefined

  requestSingleInstanceLock(): boolean {
    return this.singleInstanceLock
  }

  /** Like Electron: 'before-quit' first, and a listener may prevent the quit. */
  quit(): void {
    this.quitRequests++
    const event = preventable()
    this.emit('before-quit', event)
    if (!event.defaultPrevented) this.quitted = true
  }

  exit(code = 0): void {
    this.exitCode = code
  }

  whenReady(): Promise<void> {
    return Promise.resolve()
  }

  setName(_name: string): void {}
  setAppUserModelId(_id: string): void {}

  getLoginItemSettings(options: LoginItemCall = {}): { openAtLogin: boolean } {
    this.getLoginItemCalls.push(options)
    return { openAtLogin: this.openAtLogin }
  }

  setLoginItemSettings(settings: LoginItemCall): void {
    this.setLoginItemCalls.push(settings)
    this.openAtLogin = settings.openAtLogin === true
  }

  reset(): void {
    this.removeAllListeners()
    this.singleInstanceLock = true
    this.quitRequests = 0
    this.quitted = false
    this.exitCode = null
    this.openAtLogin = false
    this.setLoginItemCalls.length = 0
    this.getLoginItemCalls.length = 0
  }
}

export const app = new FakeApp()

export interface FakeMenu {
  template: Array<Record<string, unknown>>
}

export const Menu = {
  buildFromTemplate(template: Array<Record<string, unknown>>): FakeMenu {
    return { template }
  },
}

export const nativeImage = {
  createFromPath(path: string): { path: string } {
    return { path }
  },
}

export class Tray extends EventEmitter {
  static instances: Tray[] = []
  image: { path: string }
  tooltip = ''
  menu: FakeMenu | null = null
  destroyed = false

  constructor(image: { path: string }) {
    super()
    this.image = image
    Tray.instances.push(this)
  }

  setImage(image: { path: string }): void {
    this.image = image
  }

  setToolTip(text: string): void {
    this.tooltip = text
  }

  setContextMenu(menu: FakeMenu): void {
    this.menu = menu
  }

  destroy(): void {
    this.destroyed = true
  }
}

type PermissionHandler = (contents: unknown, permission: string, callback: (granted: boolean) => void) => void
type WindowOpenHandler = (details: { url: string }) => { action: 'allow' | 'deny' }

class FakeWebContents extends EventEmitter {
  windowOpenHandler: WindowOpenHandler | null = null
  permissionHandler: PermissionHandler | null = null
  readonly session = {
    setPermissionRequestHandler: (handler: PermissionHandler): void => {
      this.permissionHandler = handler
    },
  }

  setWindowOpenHandler(handler: WindowOpenHandler): void {
    this.windowOpenHandler = handler
  }
}

export class BrowserWindow extends EventEmitter {
  static instances: BrowserWindow[] = []
  readonly options: Record<string, unknown>
  readonly webContents = new FakeWebContents()
  readonly loaded: string[] = []
  shows = 0
  focuses = 0
  destroyed = false
  minimized = false

  constructor(options: Record<string, unknown>) {
    super()
    this.options = options
    BrowserWindow.instances.push(this)
  }

  async loadURL(url: string): Promise<void> {
    this.loaded.push(url)
    this.emit('ready-to-show')
  }

  show(): void {
    this.shows++
  }

  focus(): void {
    this.focuses++
  }

  isMinimized(): boolean {
    return this.minimized
  }

  restore(): void {
    this.minimized = false
  }

  isDestroyed(): boolean {
    return this.destroyed
  }

  destroy(): void {
    this.destroyed = true
    this.emit('closed')
  }

  /** What the user closing the window does. */
  close(): void {
    this.destroy()
  }
}

export class Notification extends EventEmitter {
  static shown: Array<{ title?: string; body?: string }> = []
  static supported = true
  readonly options: { title?: string; body?: string }

  static isSupported(): boolean {
    return Notification.supported
  }

  constructor(options: { title?: string; body?: string }) {
    super()
    this.options = options
  }

  show(): void {
    Notification.shown.push(this.options)
  }
}

export const powerMonitor = {
  idleSeconds: 0,
  getSystemIdleTime(): number {
    return powerMonitor.idleSeconds
  },
}

export const shell = {
  opened: [] as string[],
  async openExternal(url: string): Promise<void> {
    shell.opened.push(url)
  },
}

export const dialog = {
  showErrorBox(_title: string, _content: string): void {},
}

/** Fresh fakes for the next test. */
export function resetElectron(): void {
  app.reset()
  Tray.instances = []
  BrowserWindow.instances = []
  Notification.shown = []
  Notification.supported = true
  powerMonitor.idleSeconds = 0
  shell.opened = []
}
