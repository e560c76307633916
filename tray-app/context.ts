import type { Tray } from 'electron'
import type { Logger } from '../core/logger.ts'
import type { ControlEndpoint, ControlEvent } from '../daemon/control/client.ts'
import type { NodeStatus } from '../daemon/control/types.ts'
import type { DaemonPhase, TrayNotice } from './state.ts'
import { TrayStore } from './state.ts'

/** What the tray needs of the control API (daemon/control/client.ts); tests pass a stand-in. */
export interface TrayControlClient {
  endpoint(): Promise<ControlEndpoint>
  status(options?: { signal?: AbortSignal }): Promise<NodeStatus>
  /** `/events` as a stream; `onOpen` runs once the daemon accepted the subscription. */
  events(options: { signal: AbortSignal; onOpen?: () => Promise<void> }): AsyncIterable<ControlEvent>
  pause(options: { minutes?: number; until?: Date }, opts?: { signal?: AbortSignal }): Promise<unknown>
  resume(opts?: { signal?: AbortSignal }): Promise<unknown>
  reportIdle(seconds: number, opts?: { signal?: AbortSignal }): Promise<void>
}

/** How the tray found or started the daemon. */
export type DaemonMode = 'attached' | 'service' | 'child' | 'none'

/** What setupDaemon hands the other modules. */
export interface DaemonHandle {
  readonly mode: DaemonMode
  /** Start a node (the child, or the installed service) when none runs. */
  start(): Promise<void>
  /** After a lost connection: is a daemon on its way ('starting') or gone ('absent')? */
  phaseAfterDisconnect(): Promise<DaemonPhase>
  /** Stops the child this tray started; never the service or a daemon it attached to. */
  stop(): Promise<void>
}

/** "Start at login" on this platform. */
export interface AutoLaunch {
  isEnabled(): Promise<boolean>
  setEnabled(enabled: boolean): Promise<void>
}

/**
 * The one object the setupX modules share (as ipfs-desktop does): settings and the store at
 * creation, then each module fills in what it provides (daemon, tray, openDashboard, ...).
 */
export interface TrayContext {
  readonly dataDir: string
  readonly platform: NodeJS.Platform
  readonly env: NodeJS.ProcessEnv
  readonly log: Logger
  readonly store: TrayStore
  readonly client: TrayControlClient
  /** Aborted when the app quits: loops and timers stop on it. */
  readonly signal: AbortSignal
  daemon: DaemonHandle | null
  autoLaunch: AutoLaunch | null
  /** Cached "Start at login" state, for the menu checkbox. */
  startAtLogin: boolean
  tray: Tray | null
  /** Opens (or shows and focuses) the dashboard window; false when there is no daemon to show. */
  openDashboard(): Promise<boolean>
  rebuildMenu(): void
  /** A desktop notification (setupNotifications); before it, a log line. */
  notify(notice: TrayNotice): void
  /** Cut a reconnect wait short (control.json changed, a node was started). */
  wakeConnection(): void
  /** Runs at quit, last registered first. */
  onShutdown(fn: () => Promise<void> | void): void
  /** Aborts `signal` and runs the shutdown hooks; idempotent. */
  shutdown(): Promise<void>
}

export interface TrayContextInit {
  dataDir: string
  log: Logger
  client: TrayControlClient
  platform?: NodeJS.Platform
  env?: NodeJS.ProcessEnv
}

export function createTrayContext(init: TrayContextInit): TrayContext {
  const controller = new AbortController()
  const hooks: Array<() => Promise<void> | void> = []
  let stopping: Promise<void> | null = null
  const log = init.log.child({ component: 'tray' })
  const ctx: TrayContext = {
    dataDir: init.dataDir,
    platform: init.platform ?? process.platform,
    env: init.env ?? process.env,
    log,
    store: new TrayStore((err) => log.error({ err: (err as Error).message }, 'tray listener failed')),
    client: init.client,
    signal: controller.signal,
    daemon: null,
    autoLaunch: null,
    startAtLogin: false,
    tray: null,
    openDashboard: async () => false,
    rebuildMenu: () => {},
    notify: (notice) => log.info(notice, 'notice'),
    wakeConnection: () => {},
    onShutdown(fn) {
      hooks.push(fn)
    },
    shutdown() {
      stopping ??= (async () => {
        controller.abort()
        for (const fn of hooks.reverse()) {
          try {
            await fn()
          } catch (err) {
            log.error({ err: (err as Error).message }, 'shutdown step failed')
          }
        }
      })()
      return stopping
    },
  }
  return ctx
}
