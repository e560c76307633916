import { type FSWatcher, watch } from 'node:fs'
import { controlInfoFileName } from '../../daemon/control/server.ts'
import type { TrayContext } from '../context.ts'
import type { DaemonPhase } from '../state.ts'

export interface StateSetupOptions {
  initialBackoffMs?: number
  maxBackoffMs?: number
}

/**
 * Keeps ctx.store in step with the daemon: subscribes to GET /events, then reads GET /status
 * (so no change between the two is lost); on a lost or refused connection it asks setupDaemon
 * whether a daemon is on its way, and tries again with exponential backoff (cut short when
 * control.json changes).
 */
export function setupState(ctx: TrayContext, options: StateSetupOptions = {}): void {
  const initialBackoffMs = options.initialBackoffMs ?? 250
  const maxBackoffMs = options.maxBackoffMs ?? 5_000
  let wake: (() => void) | null = null
  let woken = false
  ctx.wakeConnection = () => {
    woken = true
    wake?.()
  }

  let watcher: FSWatcher | null = null
  try {
    watcher = watch(ctx.dataDir, (_event, name) => {
      if (name == null || String(name) === controlInfoFileName) ctx.wakeConnection()
    })
    watcher.on('error', () => {})
  } catch {
    // No data dir yet: the backoff polling finds control.json when the daemon writes it.
  }

  const pause = (ms: number): Promise<void> =>
    new Promise((resolve) => {
      if (woken || ctx.signal.aborted) {
        woken = false
        resolve()
        return
      }
      const done = (): void => {
        clearTimeout(timer)
        wake = null
        woken = false
        ctx.signal.removeEventListener('abort', done)
        resolve()
      }
      const timer = setTimeout(done, ms)
      wake = done
      ctx.signal.addEventListener('abort', done, { once: true })
    })

  const loop = async (): Promise<void> => {
    let delay = initialBackoffMs
    while (!ctx.signal.aborted) {
      woken = false
      try {
        const events = ctx.client.events({
          signal: ctx.signal,
          onOpen: async () => {
            const status = await ctx.client.status({ signal: ctx.signal })
            ctx.store.update({ status, daemon: 'running', problem: null })
            delay = initialBackoffMs
          },
        })
        for await (const event of events) {
          if (event.type === 'state')
            ctx.store.update({ status: event.status, daemon: 'running', problem: null })
          else ctx.store.setTokensPerSecond(event.stats.tokensPerSecond)
        }
        ctx.log.debug('the daemon closed its event stream')
      } catch (err) {
        if (ctx.signal.aborted) break
        ctx.log.debug({ err: (err as Error).message }, 'no connection to the daemon')
      }
      if (ctx.signal.aborted) break
      const phase: DaemonPhase =
        ctx.daemon == null ? 'absent' : await ctx.daemon.phaseAfterDisconnect().catch(() => 'absent' as const)
      ctx.store.update({ status: null, daemon: phase })
      await pause(delay)
      delay = Math.min(delay * 2, maxBackoffMs)
    }
  }

  const running = loop()
  ctx.onShutdown(async () => {
    watcher?.close()
    await running
  })
}
