import { readdirSync, readFileSync } from 'node:fs'
import { chmod, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { runTool, toolBackoffMs } from '../../core/tools.ts'
import { NvidiaHostReader } from '../../daemon/host/gpu.ts'

let dir: string
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'garage-tools-'))
})
afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

/** A bin dir holding one fake tool, `sleep`, `mkdir`, `rmdir` and `cat`; a PATH of its own. */
async function tool(name: string, body: string): Promise<{ env: NodeJS.ProcessEnv; bin: string }> {
  const bin = await mkdtemp(join(dir, 'bin-'))
  for (const t of ['sleep', 'mkdir', 'rmdir', 'cat']) await symlink(`/bin/${t}`, join(bin, t))
  await writeFile(join(bin, name), `#!/bin/sh\n${body}\n`)
  await chmod(join(bin, name), 0o755)
  return { env: { PATH: bin }, bin }
}

/** Processes whose command line holds `marker` (read from /proc: no procps needed). */
function running(marker: string): string[] {
  const found: string[] = []
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue
    try {
      if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ').includes(marker)) found.push(pid)
    } catch {
      // gone meanwhile
    }
  }
  return found
}

describe('runTool', () => {
  it('abandons a shell script that ignores SIGTERM and leaves a child holding its pipe: at the deadline, the whole group dies', async () => {
    // As recorded: the shell is what we spawn, `sleep` holds stdout; killing the shell alone left
    // our read end open until the sleeper ended (30 s), and the process could not exit before.
    const { env } = await tool('nvidia-smi', "trap '' TERM\necho started\nsleep 31.4159\necho never")
    const started = performance.now()
    const r = await runTool('nvidia-smi', ['--query-gpu=name'], { timeoutMs: 300, env })
    const tookMs = performance.now() - started
    expect(r.status).toBe('timeout')
    expect(tookMs).toBeGreaterThanOrEqual(290)
    expect(tookMs).toBeLessThan(1_300)
    // Its process group was killed: the sleeper too.
    for (let i = 0; i < 50 && running('sleep 31.4159').length > 0; i++)
      await new Promise((r) => setTimeout(r, 20))
    expect(running('sleep 31.4159')).toEqual([])
  })

  it('backs a tool off after a timeout: the next calls return at once without starting it; an answer resets it', async () => {
    const log = join(dir, 'backoff.log')
    const flag = join(dir, 'hang')
    await writeFile(flag, '')
    const { env } = await tool(
      'rocm-smi',
      `echo run >> '${log}'\nif [ -e '${flag}' ]; then sleep 27.1828; fi\necho '{}'`,
    )
    const first = await runTool('rocm-smi', [], { timeoutMs: 200, env })
    expect(first).toMatchObject({ status: 'timeout' })
    expect(first.skipped).toBeUndefined()
    const started = performance.now()
    const again = await runTool('rocm-smi', [], { timeoutMs: 200, env })
    expect(performance.now() - started).toBeLessThan(100)
    expect(again).toMatchObject({ status: 'timeout', skipped: 'backed-off' })
    expect(again.stderr).toBe('rocm-smi timed out lately; not run again yet')
    expect((await readFile(log, 'utf8')).trim().split('\n')).toEqual(['run'])
    expect(toolBackoffMs.min).toBeGreaterThanOrEqual(1_000)
    // Another tool (or the same name on another PATH) is not held back by this one.
    const other = await tool('rocm-smi', "echo '{}'")
    expect((await runTool('rocm-smi', [], { timeoutMs: 2_000, env: other.env })).status).toBe('ok')
  })

  it('keeps at most one call of a tool in flight; the others queue behind it', async () => {
    const lock = join(dir, 'lock')
    const log = join(dir, 'flight.log')
    const { env } = await tool(
      'nvidia-smi',
      `mkdir '${lock}' 2>/dev/null || echo overlap >> '${log}'\necho call >> '${log}'\nsleep 0.05\nrmdir '${lock}'\necho "$1"`,
    )
    const results = await Promise.all(
      Array.from({ length: 6 }, (_, i) => runTool('nvidia-smi', [`q${i}`], { timeoutMs: 5_000, env })),
    )
    expect(results.map((r) => r.stdout.trim())).toEqual(['q0', 'q1', 'q2', 'q3', 'q4', 'q5'])
    expect((await readFile(log, 'utf8')).trim().split('\n')).toEqual(Array(6).fill('call'))
  })

  it('concurrent: calls overlap (a container engine) and a timeout backs nothing off', async () => {
    const lock = join(dir, 'clock')
    const log = join(dir, 'concurrent.log')
    const { env } = await tool(
      'podman',
      `if mkdir '${lock}' 2>/dev/null; then sleep 0.3; rmdir '${lock}'; else echo overlap >> '${log}'; fi`,
    )
    await Promise.all(
      Array.from({ length: 3 }, () => runTool('podman', ['ps'], { timeoutMs: 5_000, env, concurrent: true })),
    )
    expect((await readFile(log, 'utf8')).trim().split('\n')).toEqual(['overlap', 'overlap'])
    const slow = await tool('podman', 'sleep 0.5')
    expect((await runTool('podman', [], { timeoutMs: 100, env: slow.env, concurrent: true })).status).toBe(
      'timeout',
    )
    expect((await runTool('podman', [], { timeoutMs: 2_000, env: slow.env, concurrent: true })).status).toBe(
      'ok',
    )
  })

  it("the node's GPU reader over a hung nvidia-smi: one process started in 3 s of reads, never two at once", async () => {
    const log = join(dir, 'sampler.log')
    const lock = join(dir, 'slock')
    const { env } = await tool(
      'nvidia-smi',
      `mkdir '${lock}' 2>/dev/null || echo overlap >> '${log}'\necho call >> '${log}'\ntrap '' TERM\nsleep 29.9792`,
    )
    const reader = new NvidiaHostReader({ env, timeoutMs: 300, maxAgeMs: 0 })
    const until = performance.now() + 3_000
    const readings = []
    // The host sampler's cadence, faster: a read every 100 ms, each refreshing behind its answer.
    while (performance.now() < until) {
      readings.push(await reader.read())
      await new Promise((r) => setTimeout(r, 100))
    }
    expect(readings.length).toBeGreaterThan(10)
    expect(readings.every((r) => r.gpu == null)).toBe(true)
    expect((await readFile(log, 'utf8')).trim().split('\n')).toEqual(['call'])
    expect(running('sleep 29.9792')).toEqual([])
  })
})
