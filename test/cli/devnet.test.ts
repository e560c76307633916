import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { type Devnet, startDevnet } from '../../cli/commands/devnet.ts'

describe('garage devnet (npm start)', () => {
  let dir: string
  let devnet: Devnet | undefined
  afterAll(async () => {
    await devnet?.stop()
    if (dir != null) await rm(dir, { recursive: true, force: true })
  })

  it('brings up two regions and nodes that join a certified region and serve through its head; writes devnet.json', async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-devnet-'))
    devnet = await startDevnet({ dataDir: dir, regions: 2, nodes: 3, port: 0 })
    const written = JSON.parse(await readFile(join(dir, 'devnet.json'), 'utf8'))
    expect(written).toEqual(devnet.info)
    expect(written.regions.map((r: { name: string }) => r.name)).toEqual(['local', 'local-2'])
    expect(written.nodes).toHaveLength(3)
    for (const n of written.nodes) {
      expect(['local', 'local-2']).toContain(n.region)
      expect(written.regions.map((r: { headPeerId: string }) => r.headPeerId)).toContain(n.head)
    }
    const health = await fetch(written.regions[0].healthUrl)
    expect(health.status).toBe(200)
    // A request through each region's head, the mesh and one of its nodes.
    for (const region of written.regions) {
      const served = written.nodes.filter((n: { region: string }) => n.region === region.name)
      if (served.length === 0) continue
      const res = await fetch(`${region.headUrl}/v1/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${region.headToken}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'garage-tiny', prompt: 'Hello', max_tokens: 4 }),
      })
      expect(res.status).toBe(200)
      expect(served.map((n: { peerId: string }) => n.peerId)).toContain(res.headers.get('x-garage-node'))
      const body = (await res.json()) as { usage: { completion_tokens: number } }
      expect(body.usage.completion_tokens).toBe(4)
    }
  })
})

describe('npm start as a process', () => {
  it.each([
    ['SIGTERM', 'the process'],
    ['SIGINT', 'its process group, as Ctrl-C in a terminal does'],
  ] as const)(
    'prints the banner, and on %s to %s stops every process it started and exits 0, logging no error',
    async (signal, _to) => {
      const { spawn, execFileSync } = await import('node:child_process')
      const { garageBin } = await import('../helpers/cli.ts')
      const data = await mkdtemp(join(tmpdir(), 'garage-devnet-proc-'))
      try {
        const child = spawn(
          process.execPath,
          [garageBin, 'devnet', '--nodes', '2', '--port', '0', '--data-dir', data],
          {
            env: { ...process.env, GARAGE_LOG_LEVEL: 'warn' },
            stdio: ['ignore', 'pipe', 'pipe'],
            // A terminal's foreground process group: Ctrl-C signals every process in it.
            detached: true,
          },
        )
        let stderr = ''
        child.stderr!.on('data', (d: Buffer) => {
          stderr += d.toString()
        })
        let stdout = ''
        await new Promise<void>((resolve, reject) => {
          child.stdout!.on('data', (d: Buffer) => {
            stdout += d.toString()
            if (stdout.includes('Ctrl-C stops the devnet')) resolve()
          })
          child.once('exit', (code) => reject(new Error(`devnet exited early with ${code}: ${stdout}`)))
        })
        expect(stdout).toContain('OpenAI base URL  http://127.0.0.1:')
        expect(stdout).toMatch(/API key {10}gk_/)
        expect(stdout).toContain('curl -s http://127.0.0.1:')
        // Its engine processes, found before it stops, must be gone after.
        const descendants = (pid: number): number[] => {
          const out = execFileSync('ps', ['-eo', 'pid=,ppid='], { encoding: 'utf8' })
          const pairs = out
            .trim()
            .split('\n')
            .map((l) => l.trim().split(/\s+/).map(Number) as [number, number])
          const found: number[] = []
          const walk = (p: number): void => {
            for (const [c, pp] of pairs)
              if (pp === p) {
                found.push(c)
                walk(c)
              }
          }
          walk(pid)
          return found
        }
        const children = descendants(child.pid!)
        expect(children.length).toBeGreaterThan(0)
        const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
        if (signal === 'SIGINT') process.kill(-child.pid!, 'SIGINT')
        else child.kill('SIGTERM')
        expect(await exited).toBe(0)
        // A deliberate stop is not a crash: the engines are stopped by their node, not by the signal.
        expect(stderr).not.toMatch(/engine crashed|"level":50/)
        const alive = children.filter((pid) => {
          try {
            process.kill(pid, 0)
            return true
          } catch {
            return false
          }
        })
        expect(alive).toEqual([])
      } finally {
        await rm(data, { recursive: true, force: true })
      }
    },
    60_000,
  )
})
