import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { afterAll, describe, expect, it } from 'vitest'
import { garage, garageBin } from '../helpers/cli.ts'

/** A port nothing listens on: taken from the kernel, then released. */
async function closedPort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  await new Promise<void>((resolve) => server.close(() => resolve()))
  return port
}

describe('garage node whose region cannot be reached at start', () => {
  const dirs: string[] = []
  let child: ChildProcess | null = null
  afterAll(async () => {
    child?.kill('SIGKILL')
    await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
  })

  it('does not exit: it waits, says why (stderr and garage status), tries again, and Ctrl-C ends it with 0', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'garage-node-waits-'))
    dirs.push(dir)
    const authority = (await garage(['authority', 'init', '--dir', join(dir, 'authority')])).stdout.trim()
    const headId = peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString()
    const dataDir = join(dir, 'node')
    child = spawn(
      process.execPath,
      [
        garageBin,
        'node',
        ...['--authority', authority],
        ...['--bootstrap', `/ip4/127.0.0.1/tcp/${await closedPort()}/p2p/${headId}`],
        ...['--allow-private', '--no-host-policies', '--data-dir', dataDir],
      ],
      { env: { ...process.env, GARAGE_LOG_LEVEL: 'error' }, stdio: ['ignore', 'pipe', 'pipe'] },
    )
    let stderr = ''
    const exited = new Promise<number | null>((resolve) => child!.once('exit', (code) => resolve(code)))
    const waiting = new Promise<string>((resolve, reject) => {
      child!.stderr!.on('data', (d: Buffer) => {
        stderr += d.toString()
        const line = /^waiting: .*$/m.exec(stderr)
        if (line != null) resolve(line[0])
      })
      void exited.then((code) => reject(new Error(`garage node exited with ${code}: ${stderr}`)))
    })
    const line = await waiting
    expect(line).toMatch(/^waiting: no valid regional head: .*; trying again in 1 s$/)
    const status = await garage(['status', '--json', '--data-dir', dataDir])
    expect(status.code, status.stderr).toBe(0)
    expect(JSON.parse(status.stdout)).toMatchObject({
      state: 'starting',
      reason: expect.stringMatching(/no valid regional head.*trying again in/),
    })
    const stopping = performance.now()
    child.kill('SIGINT')
    expect(await exited).toBe(0)
    expect(performance.now() - stopping).toBeLessThan(5_000)
  }, 90_000)
})
