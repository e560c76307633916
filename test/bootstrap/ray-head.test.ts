import { once } from 'node:events'
import { chmod, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { createServer, type Server } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import {
  defaultRayGcsPort,
  RayHead,
  rayHeadAddress,
  rayHeadContainerSpec,
  rayHeadTokenFile,
} from '../../bootstrap/head/ray-head.ts'
import { buildRunArgs } from '../../containers/argv.ts'
import { rayImage } from '../../containers/images.ts'
import { freeLoopbackPort } from '../../containers/ports.ts'
import type { ContainerSpec } from '../../containers/types.ts'
import { FakeRuntime } from '../containers/fake-runtime.ts'

const peer = '12D3KooWRHB6gqzSZSmC8V2JoUf8y5ZwpgCJmrEw6T8fXkgG7Xbe'
const dirs: string[] = []
afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
})

async function dataDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'garage-ray-head-'))
  dirs.push(dir)
  return dir
}

// Flags of `podman run` / `docker run` (docs.podman.io podman-run(1), docs.docker.com "docker container run").
const runFlags = new Set([
  '--detach',
  '--name',
  '--pull=never',
  '--label',
  '--network',
  '--shm-size',
  '--security-opt',
  '--env-file',
  '--log-driver',
  '--log-opt',
  '--entrypoint',
])
// `ray start` options (docs.ray.io, "Cluster Management CLI", ray start).
const rayStartFlags = new Set([
  '--head',
  '--port',
  '--node-ip-address',
  '--dashboard-host',
  '--num-gpus',
  '--block',
  '--disable-usage-stats',
])

const input = {
  image: rayImage,
  name: 'garage-ray-head-0a1b2c3d4e',
  nodePeerId: peer,
  nodeIpAddress: '10.8.0.1',
  gcsPort: 6379,
  envFile: '/var/lib/garage/run/Zm9vYmFy.env',
  shmSize: '2g',
}

const rayArgs = [
  'start',
  '--head',
  '--port=6379',
  '--node-ip-address=10.8.0.1',
  '--dashboard-host=127.0.0.1',
  '--num-gpus=0',
  '--block',
  '--disable-usage-stats',
]

function runOptions(argv: string[]): string[] {
  return argv.slice(1, argv.indexOf(rayImage))
}

describe('Ray head argv', () => {
  it('Podman: ray start --head on the host network, token only through the env file', () => {
    expect(buildRunArgs('podman', rayHeadContainerSpec(input))).toEqual([
      'run',
      '--detach',
      '--name',
      'garage-ray-head-0a1b2c3d4e',
      '--pull=never',
      '--label',
      'garage.managed=true',
      '--label',
      `garage.node=${peer}`,
      '--label',
      'garage.role=ray-head',
      '--network',
      'host',
      '--shm-size',
      '2g',
      '--security-opt',
      'no-new-privileges',
      '--env-file',
      '/var/lib/garage/run/Zm9vYmFy.env',
      '--log-driver',
      'k8s-file',
      '--log-opt',
      'max-size=20mb',
      '--entrypoint',
      'ray',
      'docker.io/rayproject/ray:2.58.0-py312-gpu',
      ...rayArgs,
    ])
  })

  it('Docker: the same, with the local log driver', () => {
    expect(buildRunArgs('docker', rayHeadContainerSpec(input))).toEqual([
      'run',
      '--detach',
      '--name',
      'garage-ray-head-0a1b2c3d4e',
      '--pull=never',
      '--label',
      'garage.managed=true',
      '--label',
      `garage.node=${peer}`,
      '--label',
      'garage.role=ray-head',
      '--network',
      'host',
      '--shm-size',
      '2g',
      '--security-opt',
      'no-new-privileges',
      '--env-file',
      '/var/lib/garage/run/Zm9vYmFy.env',
      '--log-driver',
      'local',
      '--entrypoint',
      'ray',
      'docker.io/rayproject/ray:2.58.0-py312-gpu',
      ...rayArgs,
    ])
  })

  it('uses only documented run and `ray start` flags, no GPU, no privileges, the dashboard on loopback', () => {
    for (const runtime of ['podman', 'docker'] as const) {
      const argv = buildRunArgs(runtime, rayHeadContainerSpec(input))
      expect(runOptions(argv).filter((a) => a.startsWith('--') && !runFlags.has(a))).toEqual([])
      const command = argv.slice(argv.indexOf(rayImage) + 1)
      expect(command[0]).toBe('start')
      expect(command.slice(1).filter((a) => !rayStartFlags.has(a.split('=')[0]!))).toEqual([])
      expect(command).toContain('--dashboard-host=127.0.0.1')
      for (const flag of ['--privileged', '--device', '--gpus', '--publish', '--volume'])
        expect(argv).not.toContain(flag)
    }
  })

  it('refuses an address workers cannot dial and a port out of range', () => {
    for (const bad of [
      { nodeIpAddress: 'eu-north.example.net' },
      { nodeIpAddress: '0.0.0.0' },
      { gcsPort: 0 },
    ])
      expect(() => rayHeadContainerSpec({ ...input, ...bad })).toThrow(RangeError)
    expect(() => new RayHead({ nodePeerId: peer, dataDir: '/x', nodeIpAddress: '::' })).toThrow(RangeError)
    expect(rayHeadAddress('fd00::1', defaultRayGcsPort)).toBe('[fd00::1]:6379')
  })
})

/** FakeRuntime whose "container" opens the GCS port when it runs and closes it when it stops. */
class GcsRuntime extends FakeRuntime {
  private gcs: Server | null = null
  readonly port: number

  constructor(port: number) {
    super()
    this.port = port
  }

  override async run(spec: ContainerSpec): Promise<string> {
    const id = await super.run(spec)
    this.gcs = createServer((socket) => socket.end())
    this.gcs.listen(this.port, '127.0.0.1')
    await once(this.gcs, 'listening')
    return id
  }

  override async stop(id: string): Promise<void> {
    await super.stop(id)
    await new Promise<void>((resolve) => (this.gcs == null ? resolve() : this.gcs.close(() => resolve())))
    this.gcs = null
  }
}

describe('RayHead', () => {
  it('keeps a 0600 token across restarts, hands it over in a 0600 env file and credentials(), never in argv', async () => {
    const dir = await dataDir()
    const port = await freeLoopbackPort()
    const tokens: string[] = []
    for (let restart = 0; restart < 2; restart++) {
      const runtime = new GcsRuntime(port)
      const head = new RayHead({ nodePeerId: peer, dataDir: dir, gcsPort: port, runtime })
      expect(() => head.credentials()).toThrow(expect.objectContaining({ code: 'RAY_HEAD_NOT_RUNNING' }))
      const ready = await head.start()
      expect(ready.address).toBe(`127.0.0.1:${port}`)
      expect(head.state).toBe('ready')

      const token = (await readFile(join(dir, rayHeadTokenFile), 'utf8')).trim()
      expect((await stat(join(dir, rayHeadTokenFile))).mode & 0o777).toBe(0o600)
      // 32 random bytes, base64url.
      expect(token).toMatch(/^[A-Za-z0-9_-]{43}$/)
      expect(head.credentials()).toEqual({ address: `127.0.0.1:${port}`, token, image: rayImage })
      tokens.push(token)

      const [run] = runtime.runs
      expect(run?.envFile).toEqual({ mode: 0o600, text: `RAY_AUTH_MODE=token\nRAY_AUTH_TOKEN=${token}\n` })
      expect(run?.argv.join(' ')).not.toContain(token)
      expect(JSON.stringify(run?.spec.labels ?? {})).not.toContain(token)
      expect(run?.argv).toContain(`--port=${port}`)
      // The container holds its environment: the env file is gone.
      expect(await readdir(join(dir, 'run'))).toEqual([])

      await head.stop()
      expect(head.state).toBe('stopped')
      expect(runtime.calls.slice(-2)).toEqual(['stop c0ffee', 'remove c0ffee'])
      expect(() => head.credentials()).toThrow(expect.objectContaining({ code: 'RAY_HEAD_NOT_RUNNING' }))
    }
    expect(tokens[1]).toBe(tokens[0])
  })

  it('refuses a token file other users can read', async () => {
    const dir = await dataDir()
    const file = join(dir, rayHeadTokenFile)
    await writeFile(file, 'a-token-that-is-long-enough-to-use\n')
    await chmod(file, 0o644)
    const runtime = new GcsRuntime(await freeLoopbackPort())
    const head = new RayHead({ nodePeerId: peer, dataDir: dir, gcsPort: runtime.port, runtime })
    await expect(head.start()).rejects.toMatchObject({ name: 'SecretFilePermissionsError' })
    expect(runtime.runs).toHaveLength(0)
  })

  it('refuses to start when something else already holds the GCS port', async () => {
    const taken = createServer()
    taken.listen(0, '127.0.0.1')
    await once(taken, 'listening')
    const port = (taken.address() as { port: number }).port
    try {
      const runtime = new FakeRuntime()
      const head = new RayHead({ nodePeerId: peer, dataDir: await dataDir(), gcsPort: port, runtime })
      await expect(head.start()).rejects.toMatchObject({
        name: 'RayHeadStartError',
        code: 'RAY_HEAD_PORT_IN_USE',
      })
      expect(head.state).toBe('crashed')
      expect(runtime.runs).toHaveLength(0)
    } finally {
      taken.close()
    }
  })
})
