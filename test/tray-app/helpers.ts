import { silentLogger } from '../../core/logger.ts'
import type { ControlEndpoint, ControlEvent } from '../../daemon/control/client.ts'
import type { NodeStatus } from '../../daemon/control/types.ts'
import type { TrayControlClient } from '../../tray-app/context.ts'
import { createTrayContext, type TrayContext, type TrayContextInit } from '../../tray-app/context.ts'

export function statusOf(state: NodeStatus['state'], patch: Partial<NodeStatus> = {}): NodeStatus {
  return {
    state,
    reason: null,
    pausedUntil: null,
    peerId: '12D3KooWStandIn',
    region: 'eu-north',
    head: '12D3KooWHead',
    model: 'garage-tiny',
    engine: { kind: 'llamacpp', url: 'http://127.0.0.1:5001', detail: null, failed: [] },
    gpu: null,
    tokensPerSecond: 0,
    tokensToday: 0,
    creditsToday: 0,
    integrity: null,
    uptimeSeconds: 1,
    ...patch,
  }
}

/** A daemon client that records what the tray asks of it. */
export class StandInClient implements TrayControlClient {
  readonly calls: Array<{ method: string; args: unknown[] }> = []
  endpointValue: ControlEndpoint | null = { url: 'http://127.0.0.1:7777', token: 'tok-1', pid: null }
  statusValue: NodeStatus = statusOf('serving')
  idleError: Error | null = null

  async endpoint(): Promise<ControlEndpoint> {
    if (this.endpointValue == null) throw new Error('no daemon')
    return this.endpointValue
  }

  async status(): Promise<NodeStatus> {
    this.calls.push({ method: 'status', args: [] })
    return this.statusValue
  }

  async *events(options: { signal: AbortSignal }): AsyncIterable<ControlEvent> {
    await new Promise<void>((resolve) => options.signal.addEventListener('abort', () => resolve()))
  }

  async pause(options: { minutes?: number; until?: Date }): Promise<void> {
    this.calls.push({ method: 'pause', args: [options] })
  }

  async resume(): Promise<void> {
    this.calls.push({ method: 'resume', args: [] })
  }

  async reportIdle(seconds: number): Promise<void> {
    this.calls.push({ method: 'reportIdle', args: [seconds] })
    if (this.idleError != null) throw this.idleError
  }
}

export function testContext(init: Partial<TrayContextInit> = {}): TrayContext {
  return createTrayContext({
    dataDir: '/nonexistent/garage-test',
    log: silentLogger,
    client: new StandInClient(),
    platform: 'linux',
    env: {},
    ...init,
  })
}

/** Resolves when `predicate` holds after a store change (no sleeps: it listens). */
export function waitForView(
  ctx: TrayContext,
  predicate: (ctx: TrayContext) => boolean,
  timeoutMs = 10_000,
): Promise<void> {
  if (predicate(ctx)) return Promise.resolve()
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off()
      reject(new Error(`timed out; view is ${JSON.stringify(ctx.store.view)}`))
    }, timeoutMs)
    const off = ctx.store.subscribe(() => {
      if (!predicate(ctx)) return
      clearTimeout(timer)
      off()
      resolve()
    })
  })
}
