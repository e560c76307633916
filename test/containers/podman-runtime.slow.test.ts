import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { CliContainerRuntime, detectContainerRuntime } from '../../containers/cli.ts'
import { nodeLabelFilter } from '../../containers/labels.ts'
import { freeLoopbackPort } from '../../containers/ports.ts'
import type { ContainerSpec, PullProgress } from '../../containers/types.ts'
import { type LocalRegistry, startLocalRegistry } from './local-registry.ts'
import {
  containersOf,
  podman,
  removeContainersOf,
  requirePodman,
  standInImage,
  testPeerId,
} from './podman.ts'

/** The ContainerRuntime's Podman path, command by command, against real Podman. */

const peers: string[] = []
const dirs: string[] = []
const pulled: string[] = []
let registry: LocalRegistry
let registryEnv: Record<string, string>
let image: string

beforeAll(async () => {
  await requirePodman()
  image = await standInImage()
  registry = await startLocalRegistry()
  // The test registry speaks plain HTTP on 127.0.0.1: declare it insecure for these Podman calls only.
  const dir = await mkdtemp(join(tmpdir(), 'garage-registries-'))
  dirs.push(dir)
  const conf = join(dir, 'registries.conf')
  const location = registry.image.split('/')[0]!
  await writeFile(conf, `[[registry]]\nlocation = "${location}"\ninsecure = true\n`)
  registryEnv = { CONTAINERS_REGISTRIES_CONF: conf }
})

afterAll(async () => {
  await removeContainersOf(peers)
  for (const tag of pulled) await podman(['rmi', '--force', tag]).catch(() => undefined)
  await registry?.close()
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
})

describe('container runtime: Podman through its CLI', () => {
  it('detects Podman (the docker client here has no engine) and reports its version', async () => {
    const runtime = await detectContainerRuntime({ prefer: 'docker' })
    expect(runtime.name).toBe('podman')
    const details = await runtime.details()
    expect(details.name).toBe('podman')
    expect(typeof details.rootless).toBe('boolean')
    expect(details.version).toMatch(/^\d+\.\d+/)
  })

  it('pulls with byte progress when run under a terminal, with layer progress without one', async () => {
    for (const pullInTerminal of [true, false]) {
      const runtime = new CliContainerRuntime('podman', { pullInTerminal, env: registryEnv })
      const tag = `${registry.image}-${pullInTerminal ? 'tty' : 'plain'}`
      pulled.push(tag)
      expect(await runtime.imageExists(tag)).toBe(false)
      const reports: PullProgress[] = []
      await runtime.pull(tag, { onProgress: (p) => reports.push(p) })
      expect(await runtime.imageExists(tag)).toBe(true)
      expect(reports.at(-1)).toMatchObject({ phase: 'done', fraction: 1, layersTotal: 1, layersDone: 1 })
      expect(reports.some((r) => r.phase === 'downloading')).toBe(true)
      const withBytes = reports.filter((r) => r.bytesTotal != null)
      if (pullInTerminal) {
        // The layer's size as the bar prints it (MiB, one decimal).
        expect(withBytes.length).toBeGreaterThan(0)
        expect(withBytes.at(-1)!.bytesTotal! / registry.layerBytes).toBeCloseTo(1, 1)
      } else {
        expect(withBytes).toEqual([])
      }
    }
  })

  it('a pull that fails names the image and the reason', async () => {
    const runtime = new CliContainerRuntime('podman', { env: registryEnv, pullInTerminal: false })
    const missing = `${registry.image.split(':').slice(0, 2).join(':')}-missing:1`
    expect(missing).toMatch(/^127\.0\.0\.1:\d+\/garage-test\/pull-missing:1$/)
    pulled.push(missing)
    const err = await runtime.pull(missing).catch((e: Error) => e)
    expect(err).toMatchObject({ name: 'ImagePullError' })
    expect((err as Error).message).toContain(missing)
  })

  it('run, logs into pino, inspect, wait for a kill, start again, list by label, remove orphans', async () => {
    const runtime = new CliContainerRuntime('podman')
    const peer = testPeerId()
    peers.push(peer)
    const spec: ContainerSpec = {
      image,
      name: `garage-test-${peer.slice(-8).toLowerCase()}`,
      role: 'vllm',
      nodePeerId: peer,
      args: ['garage/runtime-test', '--port', '8000'],
      ports: [{ hostPort: await freeLoopbackPort(), containerPort: 8000 }],
      shmSize: '64m',
    }
    const id = await runtime.run(spec)
    expect(id).toMatch(/^[0-9a-f]{64}$/)

    const records: Array<Record<string, unknown>> = []
    const logger = pino({ level: 'debug' }, { write: (l: string) => records.push(JSON.parse(l)) })
    const controller = new AbortController()
    const started = new Promise<string>((resolve) => {
      const follower = runtime.followLogs(id, {
        logger,
        signal: controller.signal,
        onLine: (line) => {
          if (line.includes('Starting vLLM API server')) resolve(line)
        },
      })
      void follower.done
    })
    expect(await started).toMatch(/INFO .* Starting vLLM API server 0 on http:\/\/0\.0\.0\.0:8000/)
    expect(records.find((r) => String(r.msg).includes('Starting vLLM'))).toMatchObject({
      level: 30,
      stream: 'stdout',
    })

    const status = await runtime.inspect(id)
    expect(status).toMatchObject({ id, name: spec.name, state: 'running', running: true, exitCode: null })
    expect(status?.labels).toMatchObject(nodeLabelFilter(peer, 'vllm'))

    const exited = runtime.wait(id, { timeoutMs: 30_000 })
    await runtime.kill(id)
    expect(await exited).toBe(137)
    expect(await runtime.inspect(id)).toMatchObject({ state: 'exited', running: false, exitCode: 137 })

    await runtime.start(id)
    expect(await runtime.inspect(id)).toMatchObject({ state: 'running' })
    const listed = await runtime.list(nodeLabelFilter(peer))
    expect(listed.map((c) => c.id)).toEqual([id])

    expect(await runtime.removeOrphans(peer, { keep: [spec.name] })).toEqual([])
    expect(await runtime.removeOrphans(peer)).toEqual([spec.name])
    expect(await containersOf(peer)).toEqual([])
    expect(await runtime.inspect(id)).toBeNull()
    // Removing what is gone is not an error.
    await runtime.stop(id)
    await runtime.remove(id)
    controller.abort()
  })
})
