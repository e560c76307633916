import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  listWindowsProcesses,
  ProcessListError,
  parseFastlist,
  windowsProcessLister,
} from '../../../daemon/host/processes.ts'

describe("Windows' process list: fastlist (ps-list's Toolhelp snapshot), not WMI", () => {
  let dir: string
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-fastlist-'))
  })
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  async function fake(name: string, body: string): Promise<string> {
    const path = join(dir, name)
    await writeFile(path, `#!/bin/sh\n${body}\n`)
    await chmod(path, 0o755)
    return path
  }

  it('parses its pid, ppid and name lines (CRLF, names with spaces), skipping what is not one', () => {
    expect(
      parseFastlist(
        '0\t0\t[System Process]\r\n4\t0\tSystem\r\n7712\t5520\tFortniteClient-Win64-Shipping.exe\r\n8120\t7712\tLethal Company.exe\r\n\r\nnot a line\r\n',
      ),
    ).toEqual([
      { pid: 0, ppid: 0, name: '[System Process]' },
      { pid: 4, ppid: 0, name: 'System' },
      { pid: 7712, ppid: 5520, name: 'FortniteClient-Win64-Shipping.exe' },
      { pid: 8120, ppid: 7712, name: 'Lethal Company.exe' },
    ])
  })

  it('uses the build ps-list ships for the CPU, and none where it has none (arm64: systeminformation)', () => {
    expect(windowsProcessLister('x64')).toMatch(/node_modules\/ps-list\/vendor\/fastlist-0\.3\.0-x64\.exe$/)
    expect(windowsProcessLister('ia32')).toMatch(/fastlist-0\.3\.0-x86\.exe$/)
    expect(windowsProcessLister('arm64')).toBeNull()
  })

  it('runs it with a deadline: a lister that hangs is a clear error within it, not a stuck sampler', async () => {
    const lister = await fake('fastlist-hangs.exe', "trap '' TERM\nsleep 20")
    const started = performance.now()
    await expect(listWindowsProcesses({ lister })).rejects.toThrow(
      new ProcessListError(
        'cannot list processes: fastlist-hangs.exe did not answer in time',
        'PROCESS_LIST',
      ),
    )
    expect(performance.now() - started).toBeLessThan(4_500)
  })

  it('lists what the lister prints', async () => {
    const lister = await fake('fastlist.exe', "printf '1\\t0\\tinit\\r\\n42\\t1\\tgame.exe\\r\\n'")
    expect(await listWindowsProcesses({ lister })).toEqual([
      { pid: 1, ppid: 0, name: 'init' },
      { pid: 42, ppid: 1, name: 'game.exe' },
    ])
  })

  it('without a lister for this CPU, falls back to systeminformation (which finds this process)', async () => {
    const list = await listWindowsProcesses({ lister: null })
    expect(list.some((p) => p.pid === process.pid)).toBe(true)
  })
})
