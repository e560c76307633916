import { mkdtemp, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { execa } from 'execa'
import OpenAI from 'openai'
import { pino } from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { CliContainerRuntime } from '../../../containers/cli.ts'
import type { EngineHandle } from '../../../daemon/engines/types.ts'
import { VllmEngine, type VllmEngineInit } from '../../../daemon/engines/vllm/engine.ts'
import { nextEvent } from '../../containers/fake-runtime.ts'
import {
  containersOf,
  inspectContainer,
  podman,
  removeContainersOf,
  requirePodman,
  standInImage,
  testPeerId,
} from '../../containers/podman.ts'

/**
 * VllmEngine against real Podman, with a local image whose entrypoint speaks vLLM's HTTP API and
 * metrics (test/fixtures/vllm/vllm-stand-in.mjs). The argv is the one built for the real image; only
 * the image and `gpu: 'none'` differ.
 */

const here = dirname(fileURLToPath(import.meta.url))
const peers: string[] = []
const dirs: string[] = []
let image: string
let runtime: CliContainerRuntime

/** Log records of the engine's child loggers, to check the container's lines reach pino. */
const records: Array<Record<string, unknown>> = []
const recordWaiters = new Set<() => void>()
const logger = pino(
  { level: 'debug' },
  {
    write: (line: string) => {
      records.push(JSON.parse(line))
      for (const w of recordWaiters) w()
    },
  },
)

/** The first log record matching `test`, as soon as it is written. */
function logRecord(
  test: (r: Record<string, unknown>) => boolean,
  timeoutMs = 10_000,
): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const check = (): void => {
      const found = records.find(test)
      if (found == null) return
      recordWaiters.delete(check)
      clearTimeout(timer)
      resolve(found)
    }
    const timer = setTimeout(() => {
      recordWaiters.delete(check)
      reject(new Error(`no such log record within ${timeoutMs} ms`))
    }, timeoutMs)
    recordWaiters.add(check)
    check()
  })
}

async function engineFor(
  init: Partial<VllmEngineInit> = {},
): Promise<{ engine: VllmEngine; peer: string; dataDir: string }> {
  const peer = testPeerId()
  peers.push(peer)
  const dataDir = await mkdtemp(join(tmpdir(), 'garage-vllm-'))
  dirs.push(dataDir)
  const engine = new VllmEngine({
    nodePeerId: peer,
    dataDir,
    runtime,
    image,
    gpu: 'none',
    shmSize: '64m',
    healthIntervalMs: 100,
    healthTimeoutMs: 60_000,
    stopGraceMs: 5_000,
    restartPolicy: { baseDelayMs: 200, maxDelayMs: 2_000, maxCrashes: 5, windowMs: 10 * 60_000 },
    logger,
    ...init,
  })
  return { engine, peer, dataDir }
}

beforeAll(async () => {
  await requirePodman()
  runtime = new CliContainerRuntime('podman')
  const started = Date.now()
  image = await standInImage()
  console.info(`stand-in image ${image} ready in ${Date.now() - started} ms`)
})

afterAll(async () => {
  await removeContainersOf(peers)
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
})

describe('VllmEngine on Podman', () => {
  let engine: VllmEngine
  let peer: string
  let dataDir: string
  let handle: EngineHandle

  it('starts, waits for /health, binds 127.0.0.1 only, labels and hardens the container', async () => {
    ;({ engine, peer, dataDir } = await engineFor())
    const ready = nextEvent<EngineHandle>(engine, 'ready', 60_000)
    handle = await engine.start({
      model: 'garage/stand-in-1b',
      servedModelName: 'stand-in',
      gpuMemoryUtilization: 0.5,
    })
    expect(await ready).toEqual(handle)
    expect(engine.state).toBe('ready')
    expect(handle).toMatchObject({ kind: 'vllm', servedModelName: 'stand-in' })
    expect(handle.baseUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
    expect(handle.apiKey).toMatch(/^[A-Za-z0-9_-]{43}$/)
    expect(await engine.health()).toBe(true)

    const c = await inspectContainer(engine.container!.name)
    expect(c.Config.Labels).toMatchObject({
      'garage.managed': 'true',
      'garage.node': peer,
      'garage.role': 'vllm',
    })
    expect(c.HostConfig.PortBindings['8000/tcp']).toEqual([
      { HostIp: '127.0.0.1', HostPort: handle.baseUrl.split(':')[2] },
    ])
    expect(c.HostConfig.Privileged).toBe(false)
    expect(c.HostConfig.SecurityOpt).toContain('no-new-privileges')
    expect(c.HostConfig.IpcMode).not.toBe('host')
    expect(c.HostConfig.ShmSize).toBe(64 * 1024 * 1024)
    expect(c.Args).toEqual(
      expect.arrayContaining(['--gpu-memory-utilization', '0.5', '--served-model-name', 'stand-in']),
    )
    // The key is in the container's environment (readable by its user and root), not its command line.
    expect(JSON.stringify(c.Args)).not.toContain(handle.apiKey)
    expect(JSON.stringify(c.Config.Labels)).not.toContain(handle.apiKey)
    expect(c.Config.Env).toContain(`VLLM_API_KEY=${handle.apiKey}`)
    expect(await readdir(join(dataDir, 'run'))).toEqual([])

    // The container's own lines reached the engine's child logger, at the level they were written.
    const line = await logRecord((r) => String(r.msg).includes('Starting vLLM API server'))
    expect(line).toMatchObject({
      component: 'daemon:engine',
      engine: 'vllm',
      container: engine.container!.name,
      level: 30,
    })
  })

  it('serves chat completions with the key, JSON and SSE, through the official OpenAI client; 401 without', async () => {
    const client = new OpenAI({ baseURL: `${handle.baseUrl}/v1`, apiKey: handle.apiKey, maxRetries: 0 })
    expect((await client.models.list()).data.map((m) => m.id)).toEqual(['stand-in'])
    const reply = await client.chat.completions.create({
      model: 'stand-in',
      messages: [{ role: 'user', content: 'hello there' }],
    })
    expect(reply.choices[0]?.message.content).toBe('stand-in stand-in says: hello there')
    expect(reply.usage).toMatchObject({ prompt_tokens: 2, completion_tokens: 5 })

    const stream = await client.chat.completions.create({
      model: 'stand-in',
      messages: [{ role: 'user', content: 'stream me' }],
      stream: true,
      stream_options: { include_usage: true },
    })
    let text = ''
    let finish: string | null | undefined
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? ''
      finish = chunk.choices[0]?.finish_reason ?? finish
    }
    expect(text).toBe('stand-in stand-in says: stream me')
    expect(finish).toBe('stop')

    const noKey = await fetch(`${handle.baseUrl}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'stand-in', messages: [{ role: 'user', content: 'hi' }] }),
    })
    expect(noKey.status).toBe(401)
    const wrongKey = await fetch(`${handle.baseUrl}/v1/models`, { headers: { authorization: 'Bearer nope' } })
    expect(wrongKey.status).toBe(401)
  })

  it('scrapes /metrics into EngineMetrics', async () => {
    const m = await engine.metrics()
    expect(m).toEqual({
      'vllm:num_requests_running': 0,
      'vllm:num_requests_waiting': 0,
      'vllm:prompt_tokens_total': 4,
      'vllm:generation_tokens_total': 10,
      'vllm:kv_cache_usage_perc': 0,
    })
  })

  it('podman kill: the supervisor restarts it with backoff and it serves again with the same handle', async () => {
    const exited = nextEvent<{ exitCode: number | null }>(engine, 'exited', 30_000)
    const restarting = nextEvent<{ delayMs: number; attempt: number }>(engine, 'restarting', 30_000)
    const readyAgain = nextEvent<EngineHandle>(engine, 'ready', 60_000)
    const startedAt = Date.now()
    await podman(['kill', engine.container!.name])
    expect(await exited).toMatchObject({ exitCode: 137, crashesInWindow: 1 })
    expect(await restarting).toEqual({ delayMs: 200, attempt: 1 })
    expect(await readyAgain).toEqual(handle)
    console.info(`killed → serving again in ${Date.now() - startedAt} ms`)
    expect(engine.state).toBe('ready')
    const client = new OpenAI({ baseURL: `${handle.baseUrl}/v1`, apiKey: handle.apiKey, maxRetries: 0 })
    const reply = await client.chat.completions.create({
      model: 'stand-in',
      messages: [{ role: 'user', content: 'back?' }],
    })
    expect(reply.choices[0]?.message.content).toBe('stand-in stand-in says: back?')
    expect((await inspectContainer(engine.container!.name)).State.Status).toBe('running')
  })

  it('drain resolves once the in-flight request is done', async () => {
    const client = new OpenAI({ baseURL: `${handle.baseUrl}/v1`, apiKey: handle.apiKey, maxRetries: 0 })
    let answeredAt = 0
    const slow = client.chat.completions
      .create({ model: 'stand-in', messages: [{ role: 'user', content: '/sleep 1500' }] })
      .then((r) => {
        answeredAt = Date.now()
        return r
      })
    // Wait until vLLM counts it as running, then drain.
    const deadline = Date.now() + 10_000
    while ((await engine.metrics())['vllm:num_requests_running'] === 0) {
      if (Date.now() > deadline) throw new Error('the slow request never showed as running')
      await new Promise((r) => setImmediate(r))
    }
    await engine.drain({ graceMs: 30_000 })
    const drainedAt = Date.now()
    expect(engine.state).toBe('draining')
    await slow
    expect(answeredAt).toBeGreaterThan(0)
    expect(answeredAt).toBeLessThanOrEqual(drainedAt)
  })

  it('stop() leaves no container behind', async () => {
    const stopped = nextEvent(engine, 'stopped', 30_000)
    await engine.stop()
    await stopped
    expect(engine.state).toBe('stopped')
    expect(await engine.health()).toBe(false)
    expect(await containersOf(peer)).toEqual([])
  })
})

describe('VllmEngine failures on Podman', () => {
  it('an engine that dies while loading: a VllmStartError with its last words, no container left', async () => {
    const { engine, peer } = await engineFor()
    const crashed = nextEvent<{ error: Error }>(engine, 'crashed', 60_000)
    const err = await engine.start({ model: 'garage/exit-at-start' }).catch((e: Error) => e)
    expect(err).toMatchObject({ name: 'VllmStartError', code: 'VLLM_EXITED' })
    expect((err as Error).message).toMatch(/exited \(code 1\) before it was healthy.*CUDA out of memory/)
    expect((await crashed).error).toBe(err)
    expect(engine.state).toBe('crashed')
    expect(await containersOf(peer)).toEqual([])
  })

  it('stop() while it loads: start rejects, a stopped event, no container left', async () => {
    const { engine, peer } = await engineFor()
    const stopped = nextEvent(engine, 'stopped', 30_000)
    const starting = engine.start({ model: 'garage/hang-at-start' }).catch((e: Error) => e)
    await logRecord(
      (r) => String(r.msg).includes('stand-in hangs here') && r.container === engine.container?.name,
    )
    expect(engine.state).toBe('starting')
    await engine.stop()
    expect(await starting).toMatchObject({ name: 'VllmStartError', code: 'ENGINE_STOPPED' })
    await stopped
    expect(engine.state).toBe('stopped')
    expect(await containersOf(peer)).toEqual([])
  })

  it('a crash loop: restarts with growing delays, then gives up with state crashed', async () => {
    const { engine, peer } = await engineFor({
      restartPolicy: { baseDelayMs: 100, maxDelayMs: 1_000, maxCrashes: 3, windowMs: 10 * 60_000 },
    })
    const delays: number[] = []
    engine.addEventListener('restarting', (e) => delays.push(e.detail.delayMs))
    await engine.start({ model: 'garage/crash-after-ready' })
    const crashed = await nextEvent<{ error: Error; restarts: number }>(engine, 'crashed', 60_000)
    expect(crashed.error.name).toBe('ContainerCrashLoopError')
    expect(crashed.restarts).toBe(2)
    expect(delays).toEqual([100, 200])
    expect(engine.state).toBe('crashed')
    await engine.stop()
    expect(await containersOf(peer)).toEqual([])
  })

  it('orphans: a daemon killed with SIGKILL leaves its container; the next one removes it', async () => {
    const peer = testPeerId()
    peers.push(peer)
    const dataDir = await mkdtemp(join(tmpdir(), 'garage-vllm-'))
    dirs.push(dataDir)
    const child = execa(
      process.execPath,
      [
        join(here, '../../fixtures/vllm/crashing-daemon.ts'),
        JSON.stringify({ nodePeerId: peer, dataDir, image }),
      ],
      { reject: false, stdin: 'ignore', buffer: false, stderr: 'inherit' },
    )
    const lines = createInterface({ input: child.stdout! })
    const [first] = (await Promise.race([
      new Promise((resolve) => lines.once('line', (l) => resolve([l]))),
      child.then((r) => {
        throw new Error(`the daemon exited before it started vLLM (exit ${r.exitCode})`)
      }),
    ])) as [string]
    const started = JSON.parse(first) as EngineHandle & { container: { name: string } }
    expect(await fetch(`${started.baseUrl}/health`).then((r) => r.status)).toBe(200)

    child.kill('SIGKILL')
    await child
    // The container outlives the daemon that started it.
    expect(await containersOf(peer)).toHaveLength(1)

    const next = new CliContainerRuntime('podman')
    expect(await next.removeOrphans(peer)).toEqual([started.container.name])
    expect(await containersOf(peer)).toEqual([])
  })
})
