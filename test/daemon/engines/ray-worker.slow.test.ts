import { once } from 'node:events'
import { mkdtemp, readdir, rm } from 'node:fs/promises'
import { type AddressInfo, createServer, type Server } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { CliContainerRuntime } from '../../../containers/cli.ts'
import {
  type RayClusterAssignment,
  RayWorker,
  type RayWorkerInit,
} from '../../../daemon/engines/ray/worker.ts'
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
 * The Ray worker container against real Podman: the local image's /usr/bin/ray stands in for
 * `ray start --block` and presents RAY_AUTH_TOKEN to a stand-in head on 127.0.0.1.
 */

const peers: string[] = []
const dirs: string[] = []
const token = 'ray-token-3f9c1e7a5b2d4c6e8f0a'
let image: string
let head: Server
let headAddress: string
/** Every join attempt the head saw: the token presented and the node IP. */
const joins: Array<{ token: string; nodeIp: string }> = []

beforeAll(async () => {
  await requirePodman()
  image = await standInImage()
  head = createServer((socket) => {
    socket.setEncoding('utf8')
    let text = ''
    socket.on('data', (chunk: string) => {
      text += chunk
      if (!text.includes('\n')) return
      const [, presented = '', nodeIp = ''] = text.trim().split(' ')
      joins.push({ token: presented, nodeIp })
      socket.write(presented === token ? 'OK\n' : 'DENIED bad token\n')
    })
    socket.on('error', () => undefined)
  })
  head.listen(0, '127.0.0.1')
  await once(head, 'listening')
  headAddress = `127.0.0.1:${(head.address() as AddressInfo).port}`
})

afterAll(async () => {
  await removeContainersOf(peers)
  await new Promise<void>((resolve) => head?.close(() => resolve()))
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
})

async function workerFor(
  init: Partial<RayWorkerInit> = {},
): Promise<{ worker: RayWorker; peer: string; dataDir: string }> {
  const peer = testPeerId()
  peers.push(peer)
  const dataDir = await mkdtemp(join(tmpdir(), 'garage-ray-'))
  dirs.push(dataDir)
  const worker = new RayWorker({
    nodePeerId: peer,
    dataDir,
    optIn: true,
    runtime: new CliContainerRuntime('podman'),
    image,
    gpu: 'none',
    shmSize: '64m',
    readyTimeoutMs: 30_000,
    stopGraceMs: 5_000,
    restartPolicy: { baseDelayMs: 200, maxDelayMs: 1_000 },
    ...init,
  })
  return { worker, peer, dataDir }
}

const assignment = (): RayClusterAssignment => ({
  region: 'eu-north',
  headAddress,
  token,
  trusted: true,
  nodeIpAddress: '127.0.0.1',
})

describe('RayWorker on Podman', () => {
  it('joins a trusted cluster with the token from a 0600 env file; the token is in no argv or label', async () => {
    const { worker, peer, dataDir } = await workerFor()
    const ready = nextEvent(worker, 'ready', 60_000)
    const joinsBefore = joins.length
    const { container } = await worker.start({ assignment: assignment(), numGpus: 0, vramMiB: 0 })
    await ready
    expect(worker.state).toBe('ready')
    expect(await worker.health()).toBe(true)
    expect(joins.slice(joinsBefore)).toEqual([{ token, nodeIp: '127.0.0.1' }])

    const c = await inspectContainer(container)
    expect(c.Path).toBe('ray')
    expect(c.Args).toEqual([
      'start',
      `--address=${headAddress}`,
      '--block',
      '--node-ip-address=127.0.0.1',
      '--num-gpus=0',
      '--resources={"garage_region:eu-north":1,"garage_vram_mib":0}',
      '--disable-usage-stats',
    ])
    expect(JSON.stringify(c.Args)).not.toContain(token)
    expect(JSON.stringify(c.Config.Labels)).not.toContain(token)
    expect(c.Config.Labels).toMatchObject({
      'garage.managed': 'true',
      'garage.node': peer,
      'garage.role': 'ray-worker',
    })
    // The environment is where the token belongs; the env file it came from is gone.
    expect(c.Config.Env).toEqual(expect.arrayContaining(['RAY_AUTH_MODE=token', `RAY_AUTH_TOKEN=${token}`]))
    expect(await readdir(join(dataDir, 'run'))).toEqual([])
    expect(c.HostConfig.NetworkMode).toBe('host')
    expect(c.HostConfig.Privileged).toBe(false)
    expect(c.HostConfig.SecurityOpt).toContain('no-new-privileges')

    // A killed worker is restarted and joins again.
    const readyAgain = nextEvent(worker, 'ready', 60_000)
    await podman(['kill', container])
    await readyAgain
    expect(joins.slice(joinsBefore)).toHaveLength(2)

    await worker.stop()
    expect(worker.state).toBe('stopped')
    expect(await containersOf(peer)).toEqual([])
  })

  it('a head that refuses the token: RayWorkerStartError with what ray printed, no container left', async () => {
    const { worker, peer } = await workerFor()
    const err = await worker
      .start({ assignment: { ...assignment(), token: 'not-the-token' }, numGpus: 0, vramMiB: 0 })
      .catch((e: Error) => e)
    expect(err).toMatchObject({ name: 'RayWorkerStartError', code: 'RAY_EXITED' })
    expect((err as Error).message).toMatch(/the head refused this node/)
    expect(worker.state).toBe('crashed')
    expect(await containersOf(peer)).toEqual([])
  })

  it('refuses an untrusted cluster before anything runs', async () => {
    const { worker, peer } = await workerFor()
    await expect(
      worker.start({ assignment: { ...assignment(), trusted: false }, numGpus: 0, vramMiB: 0 }),
    ).rejects.toMatchObject({
      name: 'RayClusterNotTrustedError',
      code: 'RAY_CLUSTER_NOT_TRUSTED',
    })
    expect(worker.state).toBe('stopped')
    expect(await containersOf(peer)).toEqual([])
  })
})
