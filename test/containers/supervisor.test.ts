import { describe, expect, it } from 'vitest'
import { ContainerSupervisor, defaultRestartPolicy, restartDelayMs } from '../../containers/supervisor.ts'
import { silentLogger } from '../../core/logger.ts'
import { FakeRuntime, nextEvent } from './fake-runtime.ts'

const policy = { baseDelayMs: 5, maxDelayMs: 40, maxCrashes: 4, windowMs: 60_000 }

describe('container supervisor', () => {
  it('backs off exponentially up to the cap', () => {
    expect([1, 2, 3, 4, 5, 10].map((n) => restartDelayMs(policy, n))).toEqual([5, 10, 20, 40, 40, 40])
    expect(restartDelayMs(defaultRestartPolicy, 1)).toBe(1_000)
    expect(restartDelayMs(defaultRestartPolicy, 20)).toBe(60_000)
  })

  it('restarts a container that exits, then gives up after maxCrashes inside the window', async () => {
    const runtime = new FakeRuntime()
    await runtime.run({ image: 'localhost/x:1', name: 'garage-x', role: 'vllm', nodePeerId: 'peer1' })
    const supervisor = new ContainerSupervisor({ runtime, container: 'c0ffee', logger: silentLogger, policy })
    const delays: number[] = []
    supervisor.addEventListener('restarting', (e) => delays.push(e.detail.delayMs))
    supervisor.start()
    for (let i = 1; i <= 3; i++) {
      const restarted = nextEvent<{ restarts: number }>(supervisor, 'restarted')
      runtime.exit(1)
      expect((await restarted).restarts).toBe(i)
      expect(supervisor.state).toBe('watching')
    }
    const gaveUp = nextEvent<{ error: Error; restarts: number }>(supervisor, 'gave-up')
    runtime.exit(139)
    const { error, restarts } = await gaveUp
    expect(error.name).toBe('ContainerCrashLoopError')
    expect(error.message).toMatch(/exited 4 times in 1 min \(last exit code 139\)/)
    expect(restarts).toBe(3)
    expect(delays).toEqual([5, 10, 20])
    expect(supervisor.state).toBe('crashed')
    expect(runtime.calls.filter((c) => c.startsWith('start'))).toHaveLength(3)
    await supervisor.stop()
  })

  it('crashes older than the window no longer count', async () => {
    let now = 0
    const runtime = new FakeRuntime()
    await runtime.run({ image: 'localhost/x:1', name: 'garage-x', role: 'vllm', nodePeerId: 'peer1' })
    const supervisor = new ContainerSupervisor({
      runtime,
      container: 'c0ffee',
      logger: silentLogger,
      policy: { ...policy, maxCrashes: 2, windowMs: 1_000 },
      now: () => now,
    })
    const windows: number[] = []
    supervisor.addEventListener('exited', (e) => windows.push(e.detail.crashesInWindow))
    supervisor.start()
    for (let i = 0; i < 4; i++) {
      const restarted = nextEvent(supervisor, 'restarted')
      runtime.exit(1)
      await restarted
      now += 1_500
    }
    expect(windows).toEqual([1, 1, 1, 1])
    expect(supervisor.state).toBe('watching')
    await supervisor.stop()
    expect(supervisor.state).toBe('stopped')
  })

  it('a stopped supervisor does not restart what it no longer watches', async () => {
    const runtime = new FakeRuntime()
    await runtime.run({ image: 'localhost/x:1', name: 'garage-x', role: 'vllm', nodePeerId: 'peer1' })
    const supervisor = new ContainerSupervisor({ runtime, container: 'c0ffee', logger: silentLogger, policy })
    supervisor.start()
    await supervisor.stop()
    runtime.exit(0)
    expect(runtime.calls.filter((c) => c.startsWith('start'))).toEqual([])
  })

  it('before arm(), an exit is reported and not restarted (a start that fails stays failed)', async () => {
    const runtime = new FakeRuntime()
    await runtime.run({ image: 'localhost/x:1', name: 'garage-x', role: 'vllm', nodePeerId: 'peer1' })
    const supervisor = new ContainerSupervisor({
      runtime,
      container: 'c0ffee',
      logger: silentLogger,
      policy,
      armed: false,
    })
    supervisor.start()
    const exited = nextEvent<{ exitCode: number }>(supervisor, 'exited')
    runtime.exit(1)
    expect((await exited).exitCode).toBe(1)
    await supervisor.stop()
    expect(runtime.calls.filter((c) => c.startsWith('start'))).toEqual([])
  })

  it('gives up when the container disappears', async () => {
    const runtime = new FakeRuntime()
    await runtime.run({ image: 'localhost/x:1', name: 'garage-x', role: 'vllm', nodePeerId: 'peer1' })
    const supervisor = new ContainerSupervisor({ runtime, container: 'c0ffee', logger: silentLogger, policy })
    supervisor.start()
    const gaveUp = nextEvent<{ error: Error }>(supervisor, 'gave-up')
    runtime.gone = true
    runtime.exit(137)
    expect((await gaveUp).error.name).toBe('ContainerGoneError')
  })
})
