import { chmod, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { garage } from '../helpers/cli.ts'

describe('garage doctor on this machine (CPU only, no GPU)', () => {
  const dirs: string[] = []
  afterAll(async () => {
    await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
  })

  it('finds no GPU, offers the embedded engine, exits 0 and says vLLM needs an NVIDIA GPU', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'garage-doctor-real-'))
    dirs.push(dataDir)
    const text = await garage(['doctor', '--data-dir', dataDir])
    expect(text.code, text.stderr).toBe(0)
    expect(text.stdout).toMatch(/✓ embedded \(llama\.cpp\)\s+on cpu/)
    expect(text.stdout).toMatch(/✗ vLLM \(container\)\s+vLLM needs an NVIDIA GPU/)
    expect(text.stdout).toContain('This machine can serve.')

    const json = await garage(['doctor', '--json', '--data-dir', dataDir])
    expect(json.code).toBe(0)
    const report = JSON.parse(json.stdout)
    expect(report.schema).toBe('garage.doctor/v1')
    expect(report.canServe).toBe(true)
    expect(report.hardware.nvidia.gpus).toEqual([])
    expect(report.hardware.gpus.filter((g: { vendor: string }) => g.vendor === 'nvidia')).toEqual([])
    expect(report.hardware.llama.available).toBe(true)
    expect(report.hardware.system.disk.path).toBe(dataDir)
    expect(report.hardware.system.disk.freeMiB).toBeGreaterThan(0)
    expect(report.capability.engines.find((e: { engine: string }) => e.engine === 'vllm').reason).toBe(
      'vLLM needs an NVIDIA GPU',
    )
    expect(
      report.capability.models.some(
        (m: { fits: boolean; placement: string }) => m.fits && m.placement === 'cpu',
      ),
    ).toBe(true)
    expect(report.advice.map((a: { id: string }) => a.id)).toContain('nvidia-gpu')
  })

  it('a hung nvidia-smi (a script that ignores SIGTERM, its sleeper holding the pipe): doctor exits within its deadline plus a second', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'garage-doctor-hang-'))
    dirs.push(dataDir)
    const bin = join(dataDir, 'bin')
    await mkdir(bin)
    await symlink('/bin/sleep', join(bin, 'sleep'))
    await writeFile(join(bin, 'nvidia-smi'), "#!/bin/sh\ntrap '' TERM\nsleep 30\n")
    await chmod(join(bin, 'nvidia-smi'), 0o755)
    // The same command without the hang: what starting Node and probing the rest costs here.
    const baseStarted = performance.now()
    const base = await garage(['doctor', '--json', '--timeout', '1s', '--data-dir', dataDir], {
      PATH: join(dataDir, 'empty'),
    })
    const baseMs = performance.now() - baseStarted
    expect(base.code, base.stderr).toBe(0)
    const started = performance.now()
    const hung = await garage(['doctor', '--json', '--timeout', '1s', '--data-dir', dataDir], { PATH: bin })
    const tookMs = performance.now() - started
    expect(hung.code, hung.stderr).toBe(0)
    expect(JSON.parse(hung.stdout).hardware.nvidia).toMatchObject({ status: 'timeout' })
    // One deadline (the second nvidia-smi query is backed off, not waited for) plus a second.
    expect(tookMs - baseMs).toBeLessThan(1_000 + 1_000)
  })

  it('rejects a bad --timeout with the usage', async () => {
    const r = await garage(['doctor', '--timeout', 'soon'])
    expect(r.code).toBe(2)
    expect(r.stderr).toContain('--timeout must be a duration')
  })
})
