import { createHash } from 'node:crypto'
import { chmod, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { RayHead, type RayHeadInit, rayHeadTokenFile } from '../../bootstrap/head/ray-head.ts'
import { CliContainerRuntime } from '../../containers/cli.ts'
import { freeLoopbackPort } from '../../containers/ports.ts'
import { RayWorker } from '../../daemon/engines/ray/worker.ts'
import { nextEvent } from '../containers/fake-runtime.ts'
import {
  containersOf,
  inspectContainer,
  podman,
  removeContainersOf,
  requirePodman,
  standInImage,
  testPeerId,
} from '../containers/podman.ts'

/**
 * The Ray head container against real Podman. The image is the engine suites' stand-in image with
 * /usr/bin/ray replaced by a stand-in for `ray start --head ... --block`: like Ray with
 * RAY_AUTH_MODE=token it needs RAY_AUTH_TOKEN, listens on --node-ip-address:--port, and admits a node
 * only with that token (the worker stand-in's "AUTH <token> <node-ip>" line), so a real RayWorker
 * container joins it with the head's credentials().
 */
const headStandIn = `#!/bin/node
import { createServer } from 'node:net'

const [command, ...rest] = process.argv.slice(2)
const flags = new Map()
for (const a of rest) {
  const m = /^--([^=]+)(?:=(.*))?$/.exec(a)
  if (m != null) flags.set(m[1], m[2] ?? true)
}
const log = (level, msg) => process.stdout.write(new Date().toISOString() + '\\t' + level + ' scripts.py:1 -- ' + msg + '\\n')
const port = Number(flags.get('port'))
const ip = flags.get('node-ip-address')
if (command !== 'start' || flags.get('head') !== true || flags.get('block') !== true || !(port > 0) || typeof ip !== 'string') {
  process.stderr.write('usage: ray start --head --port=PORT --node-ip-address=IP --block (got ' + JSON.stringify(process.argv.slice(2)) + ')\\n')
  process.exit(2)
}
const token = process.env.RAY_AUTH_TOKEN ?? ''
if (process.env.RAY_AUTH_MODE !== 'token' || token === '') {
  log('ERROR', 'RAY_AUTH_MODE=token needs RAY_AUTH_TOKEN')
  process.exit(1)
}
log('INFO', 'args ' + JSON.stringify(rest))
const gcs = createServer((socket) => {
  socket.setEncoding('utf8')
  let text = ''
  socket.on('data', (chunk) => {
    text += chunk
    if (!text.includes('\\n')) return
    const [, presented = '', nodeIp = ''] = text.trim().split(' ')
    const ok = presented === token
    log(ok ? 'INFO' : 'WARNING', (ok ? 'admitted node ' : 'refused a bad token from ') + nodeIp)
    socket.end(ok ? 'OK\\n' : 'DENIED bad token\\n')
  })
  socket.on('error', () => undefined)
})
gcs.on('error', (err) => {
  log('ERROR', 'GCS could not listen on ' + ip + ':' + port + ': ' + err.message)
  process.exit(1)
})
gcs.listen(port, ip, () => log('INFO', 'Ray runtime started.'))
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    log('INFO', 'Ray stopped.')
    process.exit(0)
  })
}
`

const peers: string[] = []
const dirs: string[] = []
let baseImage: string
let headImage: string
let brokenImage: string

/** A `ray` that cannot start a head: it prints its usage line and exits 2, as a wrong ray would. */
const brokenRay = `#!/bin/node
process.stderr.write('usage: ray start --address=HOST:PORT --block (this ray cannot start a head)\\n')
process.exit(2)
`

/** The stand-in image with `script` as /usr/bin/ray; tagged by content, removed after the suite. */
async function headStandInImage(base: string, script = headStandIn): Promise<string> {
  const tag = `localhost/garage-test-ray-head:${createHash('sha256').update(`${base}\n${script}`).digest('hex').slice(0, 16)}`
  const dir = await mkdtemp(join(tmpdir(), 'garage-ray-head-image-'))
  try {
    await writeFile(join(dir, 'ray'), script)
    await chmod(join(dir, 'ray'), 0o755)
    await writeFile(join(dir, 'Containerfile'), `FROM ${base}\nCOPY ray /usr/bin/ray\n`)
    await podman(['build', '--pull=never', '--quiet', '--tag', tag, dir], 120_000)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
  return tag
}

beforeAll(async () => {
  await requirePodman()
  baseImage = await standInImage()
  headImage = await headStandInImage(baseImage)
  brokenImage = await headStandInImage(baseImage, brokenRay)
})

afterAll(async () => {
  await removeContainersOf(peers)
  for (const image of [headImage, brokenImage])
    if (image != null) await podman(['rmi', '--force', image]).catch(() => undefined)
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
})

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'garage-ray-head-'))
  dirs.push(dir)
  return dir
}

async function headFor(
  init: Partial<RayHeadInit> = {},
): Promise<{ head: RayHead; peer: string; dataDir: string }> {
  const peer = testPeerId()
  peers.push(peer)
  const dataDir = await tempDir()
  const head = new RayHead({
    nodePeerId: peer,
    dataDir,
    gcsPort: await freeLoopbackPort(),
    runtime: new CliContainerRuntime('podman'),
    image: headImage,
    shmSize: '64m',
    readyTimeoutMs: 30_000,
    readyPollIntervalMs: 100,
    stopGraceMs: 5_000,
    restartPolicy: { baseDelayMs: 200, maxDelayMs: 1_000 },
    ...init,
  })
  return { head, peer, dataDir }
}

describe('RayHead on Podman', () => {
  it('serves its GCS with a 0600 token a real RayWorker container joins with; restarts; stop leaves no container', async () => {
    const { head, peer, dataDir } = await headFor()
    const { container, address } = await head.start()
    expect(head.state).toBe('ready')
    expect(await head.health()).toBe(true)
    const { token } = head.credentials()
    expect(head.credentials().address).toBe(address)
    expect((await stat(join(dataDir, rayHeadTokenFile))).mode & 0o777).toBe(0o600)

    const c = await inspectContainer(container)
    expect(c.Path).toBe('ray')
    expect(c.Args).toEqual([
      'start',
      '--head',
      `--port=${address.split(':')[1]}`,
      '--node-ip-address=127.0.0.1',
      '--dashboard-host=127.0.0.1',
      '--num-gpus=0',
      '--block',
      '--disable-usage-stats',
    ])
    expect(JSON.stringify(c.Args)).not.toContain(token)
    expect(JSON.stringify(c.Config.Labels)).not.toContain(token)
    expect(c.Config.Labels).toMatchObject({
      'garage.managed': 'true',
      'garage.node': peer,
      'garage.role': 'ray-head',
    })
    expect(c.Config.Env).toEqual(expect.arrayContaining(['RAY_AUTH_MODE=token', `RAY_AUTH_TOKEN=${token}`]))
    expect(await readdir(join(dataDir, 'run'))).toEqual([])
    expect(c.HostConfig.NetworkMode).toBe('host')
    expect(c.HostConfig.Privileged).toBe(false)
    expect(c.HostConfig.SecurityOpt).toContain('no-new-privileges')

    // What an assignment hands a worker is enough to join: the worker's own stand-in presents the token.
    const workerPeer = testPeerId()
    peers.push(workerPeer)
    const worker = new RayWorker({
      nodePeerId: workerPeer,
      dataDir: await tempDir(),
      optIn: true,
      runtime: new CliContainerRuntime('podman'),
      image: baseImage,
      gpu: 'none',
      shmSize: '64m',
      readyTimeoutMs: 30_000,
      stopGraceMs: 5_000,
    })
    const credentials = head.credentials()
    await worker.start({
      assignment: {
        region: 'eu-north',
        headAddress: credentials.address,
        token: credentials.token,
        trusted: true,
        nodeIpAddress: '127.0.0.1',
      },
      numGpus: 0,
      vramMiB: 0,
    })
    expect(worker.state).toBe('ready')
    await worker.stop()
    expect(await containersOf(workerPeer)).toEqual([])

    // A killed head is restarted in the same container: same port, same token.
    const readyAgain = nextEvent(head, 'ready', 60_000)
    await podman(['kill', container])
    await readyAgain
    expect(head.state).toBe('ready')
    expect(head.credentials()).toEqual(credentials)

    await head.stop()
    expect(head.state).toBe('stopped')
    expect(await containersOf(peer)).toEqual([])
  })

  it('a ray that exits before its GCS serves: RayHeadStartError with its last words, no container left', async () => {
    const { head, peer } = await headFor({ image: brokenImage })
    const err = await head.start().catch((e: Error) => e)
    expect(err).toMatchObject({ name: 'RayHeadStartError', code: 'RAY_HEAD_EXITED' })
    expect((err as Error).message).toMatch(/code 2.*usage: ray start --address/)
    expect(head.state).toBe('crashed')
    expect(await containersOf(peer)).toEqual([])
  })
})
