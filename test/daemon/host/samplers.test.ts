import { type ChildProcess, spawn } from 'node:child_process'
import { chmod, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { GameList } from '../../../daemon/host/games.ts'
import { NvidiaHostReader } from '../../../daemon/host/gpu.ts'
import {
  IdleTracker,
  InvalidIdleReportError,
  linuxIdleFallback,
  parseMutterIdleTime,
  parseXprintidle,
} from '../../../daemon/host/idle.ts'
import { evaluateHost, ourProcessTree } from '../../../daemon/host/policy.ts'
import {
  fullNameFromComm,
  listLinuxProcesses,
  ProcessListError,
  parseProcStat,
} from '../../../daemon/host/processes.ts'
import { createHostSampler } from '../../../daemon/host/sampler.ts'
import { settings } from './settings.ts'

const dirs: string[] = []
const children: ChildProcess[] = []
const tempDir = async (prefix: string): Promise<string> => {
  const d = await mkdtemp(join(tmpdir(), prefix))
  dirs.push(d)
  return d
}
afterAll(async () => {
  for (const c of children) c.kill('SIGKILL')
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
})

async function script(dir: string, name: string, body: string): Promise<void> {
  const path = join(dir, name)
  await writeFile(path, `#!/bin/sh\n${body}\n`)
  await chmod(path, 0o755)
}

function spawned(file: string, args: string[]): Promise<ChildProcess> {
  const child = spawn(file, args, { stdio: 'ignore' })
  children.push(child)
  return new Promise((resolve, reject) => {
    child.once('spawn', () => resolve(child))
    child.once('error', reject)
  })
}

describe('parsing /proc', () => {
  it('reads comm and ppid from stat, whatever the comm holds', () => {
    expect(parseProcStat('4242 (FortniteClient-) S 17 4242 17 0 -1 4194560 1 0')).toEqual({
      name: 'FortniteClient-',
      ppid: 17,
    })
    expect(parseProcStat('77 (a) b (c) R 1 77 77 0')).toEqual({ name: 'a) b (c', ppid: 1 })
    expect(parseProcStat('garbage')).toBeNull()
  })

  it('restores a truncated comm from argv[0] (a Windows path under Proton) or the executable', () => {
    expect(
      fullNameFromComm('Cyberpunk2077.e', 'C:\\Games\\Cyberpunk 2077\\bin\\x64\\Cyberpunk2077.exe', null),
    ).toBe('Cyberpunk2077.exe')
    expect(
      fullNameFromComm('FortniteClient-', '/tmp/x/FortniteClient-Win64-Shipping', '/usr/bin/sleep'),
    ).toBe('FortniteClient-Win64-Shipping')
    expect(fullNameFromComm('systemd-journal', 'systemd-journald', null)).toBe('systemd-journald')
    // argv[0] rewritten to something else: the comm stays.
    expect(fullNameFromComm('FortniteClient-', 'launcher', '/usr/bin/sleep')).toBe('FortniteClient-')
  })

  it('reads a fake /proc: command lines only where a rule needs them, exited processes skipped', async () => {
    const proc = await tempDir('garage-proc-')
    const add = async (pid: number, stat: string, cmdline?: string[]) => {
      await mkdir(join(proc, String(pid)))
      await writeFile(join(proc, String(pid), 'stat'), stat)
      if (cmdline != null) await writeFile(join(proc, String(pid), 'cmdline'), `${cmdline.join('\0')}\0`)
    }
    await add(1, '1 (systemd) S 0 1 1 0', ['/sbin/init'])
    await add(10, '10 (reaper) S 1 10 1 0', [
      '/home/u/.steam/ubuntu12_32/reaper',
      'SteamLaunch',
      'AppId=1091500',
    ])
    await add(11, '11 (Cyberpunk2077.e) S 10 11 1 0', ['C:\\Games\\Cyberpunk2077.exe', '-skipStartScreen'])
    await add(12, '12 (bash) S 1 12 1 0', ['bash'])
    await mkdir(join(proc, '13')) // exited between readdir and read
    await mkdir(join(proc, 'self'))
    const games = new GameList()
    const list = await listLinuxProcesses({
      procDir: proc,
      needsCommandLine: (n) => games.needsCommandLine(n),
    })
    expect(list.sort((a, b) => a.pid - b.pid)).toEqual([
      { pid: 1, name: 'systemd', ppid: 0 },
      {
        pid: 10,
        name: 'reaper',
        ppid: 1,
        commandLine: '/home/u/.steam/ubuntu12_32/reaper SteamLaunch AppId=1091500',
      },
      {
        pid: 11,
        name: 'Cyberpunk2077.exe',
        ppid: 10,
        commandLine: 'C:\\Games\\Cyberpunk2077.exe -skipStartScreen',
      },
      { pid: 12, name: 'bash', ppid: 1 },
    ])
    const verdict = evaluateHost(
      { processes: list, gpu: null, gpuApps: [], ourPids: new Set(), onBattery: null, idleSeconds: null },
      settings(),
      new Date(),
    )
    expect(verdict.reasons).toEqual(['game: Steam game (AppId=1091500)', 'game: Cyberpunk2077.exe'])
  })

  it('no /proc is a named error', async () => {
    await expect(listLinuxProcesses({ procDir: '/nonexistent-proc' })).rejects.toHaveProperty(
      'name',
      ProcessListError.name,
    )
  })
})

describe.runIf(process.platform === 'linux')('the Linux sampler on this machine', () => {
  let game: ChildProcess
  let gameDir: string
  beforeAll(async () => {
    gameDir = await tempDir('garage-game-')
    const exe = join(gameDir, 'FortniteClient-Win64-Shipping')
    await symlink('/bin/sleep', exe)
    game = await spawned(exe, ['30'])
  })
  afterAll(() => {
    game.kill('SIGKILL')
  })

  it('finds a game-named child process under its full name although comm keeps 15 chars', async () => {
    const comm = (await readFile(`/proc/${game.pid}/comm`, 'utf8')).trim()
    expect(comm).toBe('FortniteClient-')
    const started = performance.now()
    const list = await listLinuxProcesses()
    const ms = performance.now() - started
    console.log(`listLinuxProcesses: ${list.length} processes in ${ms.toFixed(1)} ms`)
    expect(list.find((p) => p.pid === game.pid)).toMatchObject({
      name: 'FortniteClient-Win64-Shipping',
      ppid: process.pid,
    })
  })

  it('a whole sample (no NVIDIA GPU) pauses for it, and the time is printed', async () => {
    const sampler = createHostSampler({
      nvidia: false,
      ourPids: () => [],
      settings: () => settings({ pauseOnBattery: true }),
      battery: async () => false,
    })
    await sampler.sample() // warm: module loading and the first battery read
    const times: number[] = []
    let input = await sampler.sample()
    for (let i = 0; i < 20; i++) {
      const started = performance.now()
      input = await sampler.sample()
      times.push(performance.now() - started)
    }
    times.sort((a, b) => a - b)
    console.log(
      `host sample on Linux: ${input.processes.length} processes, median ${times[10]!.toFixed(1)} ms, max ${times.at(-1)!.toFixed(1)} ms`,
    )
    expect(evaluateHost(input, settings(), new Date()).reasons).toEqual([
      'game: FortniteClient-Win64-Shipping',
    ])
    expect(times[10]).toBeLessThan(250)
    sampler.close()
  })

  it("counts our engine's children as ours through their parent pids", async () => {
    // The shell says ready once both children are forked: they are in /proc from then on.
    const engine = spawn('/bin/sh', ['-c', 'sleep 30 & sleep 30 & echo ready; wait'], {
      stdio: ['ignore', 'pipe', 'ignore'],
      detached: true, // its own process group, so the test ends the children with it
    })
    await new Promise<void>((resolve) => engine.stdout!.once('data', () => resolve()))
    const tree = ourProcessTree(await listLinuxProcesses(), new Set([engine.pid!]))
    process.kill(-engine.pid!, 'SIGKILL')
    expect(tree.size).toBe(3)
  })
})

describe('nvidia-smi reading', () => {
  let bin: string
  let calls: string
  beforeAll(async () => {
    bin = await tempDir('garage-fake-nvidia-')
    calls = join(bin, 'calls')
    await writeFile(
      join(bin, 'gpu.csv'),
      '0, GPU-a, NVIDIA GeForce RTX 4090, 24564, 1387, 4, 42, 31.26, 450.00, 550.120, 8.9\n1, GPU-b, NVIDIA GeForce RTX 3060, 12288, 5, 71, 39, 11.42, 170.00, 550.120, 8.6\n',
    )
    await writeFile(
      join(bin, 'apps.csv'),
      '2231, /usr/lib/xorg/Xorg, 412\n4100, /opt/blender/blender, 3120\n',
    )
    await symlink('/bin/cat', join(bin, 'cat'))
    await script(
      bin,
      'nvidia-smi',
      `echo "$1" >> '${calls}'\ncase "$*" in\n  *--query-gpu=*) cat '${bin}/gpu.csv' ;;\n  *--query-compute-apps=*) cat '${bin}/apps.csv' ;;\nesac`,
    )
  })

  it('takes the busiest and hottest GPU, lists compute apps, refreshes a stale reading behind the answer', async () => {
    let t = 0
    const reader = new NvidiaHostReader({ env: { PATH: bin }, now: () => t, maxAgeMs: 1000 })
    const first = await reader.read()
    expect(first).toEqual({
      gpu: { utilizationPct: 71, temperatureC: 42 },
      apps: [
        { pid: 2231, name: '/usr/lib/xorg/Xorg', usedMemoryMiB: 412 },
        { pid: 4100, name: '/opt/blender/blender', usedMemoryMiB: 3120 },
      ],
    })
    t = 999
    await reader.read()
    expect((await readFile(calls, 'utf8')).trim().split('\n')).toHaveLength(2)
    t = 1000
    expect(await reader.read()).toEqual(first) // answered at once; the refresh runs behind it
    await reader.refresh() // joins the refresh in flight
    expect((await readFile(calls, 'utf8')).trim().split('\n')).toHaveLength(4)
  })

  it('a sampler on an NVIDIA machine sees the foreign compute app; the daemon itself is left out', async () => {
    const sampler = createHostSampler({
      nvidia: true,
      ourPids: () => [4100],
      settings: () => settings(),
      env: { PATH: bin },
      selfPid: 2231,
    })
    const input = await sampler.sample()
    expect(input.gpuApps.map((a) => a.pid)).toEqual([4100])
    expect(input.ourPids).toEqual(new Set([4100]))
    expect(evaluateHost(input, settings(), new Date()).pause).toBe(false)
    const theirs = createHostSampler({
      nvidia: true,
      ourPids: () => [],
      settings: () => settings(),
      env: { PATH: bin },
    })
    expect(evaluateHost(await theirs.sample(), settings(), new Date()).reasons).toEqual([
      'gpu-busy: blender',
      'gpu-busy: 71% utilization',
    ])
  })

  it('nvidia-smi missing: no GPU reading, no GPU rule fires', async () => {
    const reader = new NvidiaHostReader({ env: { PATH: '/nonexistent' } })
    expect(await reader.read()).toEqual({ gpu: null, apps: [] })
  })
})

describe('battery and idle', () => {
  it('battery is read once, then served from cache and refreshed behind it', async () => {
    let t = 0
    let onBattery = false
    let reads = 0
    const sampler = createHostSampler({
      nvidia: false,
      ourPids: () => [],
      settings: () => settings({ pauseOnBattery: true }),
      battery: async () => {
        reads++
        return onBattery
      },
      now: () => t,
      batteryMaxAgeMs: 5_000,
    })
    expect((await sampler.sample()).onBattery).toBe(false)
    onBattery = true
    t = 4_999
    expect((await sampler.sample()).onBattery).toBe(false)
    expect(reads).toBe(1)
    t = 5_000
    expect((await sampler.sample()).onBattery).toBe(false) // stale answer, refresh started
    expect(reads).toBe(2)
    expect((await sampler.sample()).onBattery).toBe(true)
  })

  it('battery and idle are not read when no setting needs them', async () => {
    let reads = 0
    const sampler = createHostSampler({
      nvidia: false,
      ourPids: () => [],
      settings: () => settings(),
      battery: async () => {
        reads++
        return true
      },
      idle: new IdleTracker({
        fallback: async () => {
          reads++
          return 1
        },
      }),
    })
    const input = await sampler.sample()
    expect(input).toMatchObject({ onBattery: null, idleSeconds: null })
    expect(reads).toBe(0)
  })

  it("the tray app's report is used while fresh, then the fallback answers", async () => {
    let t = 0
    const tracker = new IdleTracker({ now: () => t, reportMaxAgeMs: 10_000, fallback: async () => 42 })
    expect(await tracker.idleSeconds()).toBe(42)
    tracker.report(700)
    t = 10_000
    expect(await tracker.idleSeconds()).toBe(700)
    t = 10_001
    expect(await tracker.idleSeconds()).toBe(42)
    expect(await new IdleTracker().idleSeconds()).toBeNull()
    expect(() => tracker.report(-1)).toThrow(InvalidIdleReportError)
    expect(() => tracker.report(Number.NaN)).toThrow(InvalidIdleReportError)
  })

  it('parses xprintidle and Mutter IdleMonitor output', () => {
    expect(parseXprintidle('123456\n')).toBe(123.456)
    expect(parseXprintidle('')).toBeNull()
    expect(parseXprintidle("couldn't open display")).toBeNull()
    expect(parseMutterIdleTime('(uint64 98000,)\n')).toBe(98)
    expect(parseMutterIdleTime('Error: GDBus.Error')).toBeNull()
  })

  it('the Linux fallback asks xprintidle on X11, then Mutter; a missing tool is not asked again', async () => {
    const bin = await tempDir('garage-fake-idle-')
    const log = join(bin, 'calls')
    await script(bin, 'xprintidle', `echo xprintidle >> '${log}'\necho 65000`)
    const x11 = linuxIdleFallback({ env: { PATH: bin, DISPLAY: ':0' } })
    expect(await x11()).toBe(65)
    const noDisplay = linuxIdleFallback({ env: { PATH: bin } })
    expect(await noDisplay()).toBeNull()
    await script(bin, 'gdbus', `echo gdbus >> '${log}'\necho '(uint64 1500,)'`)
    const wayland = linuxIdleFallback({ env: { PATH: bin, XDG_RUNTIME_DIR: '/run/user/1000' } })
    expect(await wayland()).toBe(1.5)
    expect((await readFile(log, 'utf8')).trim().split('\n')).toEqual(['xprintidle', 'gdbus'])
    const none = linuxIdleFallback({ env: { PATH: '/nonexistent', DISPLAY: ':0', XDG_RUNTIME_DIR: '/run' } })
    expect(await none()).toBeNull()
    expect(await none()).toBeNull()
  })
})
