import type { Libp2p, PeerInfo } from '@libp2p/interface'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { backOffEmptyWalks, emptyWalkBackoffMs } from '../../mesh/node.ts'

/** A peer router whose queries find `results[i]` peers on the i-th call. */
function router(results: number[]): { routing: Libp2p['peerRouting']; calls: number[] } {
  const calls: number[] = []
  const routing = {
    async *getClosestPeers(): AsyncGenerator<PeerInfo> {
      calls.push(Date.now())
      const n = results[calls.length - 1] ?? 0
      for (let i = 0; i < n; i++) yield { id: {}, multiaddrs: [] } as unknown as PeerInfo
    },
  } as unknown as Libp2p['peerRouting']
  return { routing, calls }
}

async function drain(routing: Libp2p['peerRouting'], signal?: AbortSignal): Promise<number> {
  let n = 0
  for await (const _ of routing.getClosestPeers(new Uint8Array(32), signal != null ? { signal } : {})) n++
  return n
}

describe('backOffEmptyWalks', () => {
  afterEach(() => {
    vi.useRealTimers()
  })

  it('pauses after a query that found nobody, doubling, and not after one that found peers', async () => {
    vi.useFakeTimers({ now: 0 })
    const { routing, calls } = router([0, 0, 2, 0])
    backOffEmptyWalks(routing)
    expect(await drain(routing)).toBe(0)
    const second = drain(routing)
    await vi.advanceTimersByTimeAsync(emptyWalkBackoffMs.min)
    expect(await second).toBe(0)
    const third = drain(routing)
    await vi.advanceTimersByTimeAsync(emptyWalkBackoffMs.min * 2)
    expect(await third).toBe(2)
    // A query that found peers resets the pause: the next one starts at once.
    expect(await drain(routing)).toBe(0)
    expect(calls).toEqual([0, emptyWalkBackoffMs.min, emptyWalkBackoffMs.min * 3, emptyWalkBackoffMs.min * 3])
  })

  it('gives up the pause when the caller aborts', async () => {
    vi.useFakeTimers({ now: 0 })
    const { routing, calls } = router([0, 0])
    backOffEmptyWalks(routing)
    await drain(routing)
    const controller = new AbortController()
    const paused = drain(routing, controller.signal)
    controller.abort(new Error('stopped'))
    await expect(paused).rejects.toThrow('stopped')
    expect(calls).toHaveLength(1)
  })
})
