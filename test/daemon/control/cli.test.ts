import { spawn } from 'node:child_process'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type ControlServer, startControlServer } from '../../../daemon/control/server.ts'
import { loadSettings, saveSettings } from '../../../daemon/control/settings.ts'
import { garage, garageBin } from '../../helpers/cli.ts'
import { StandInTarget } from './stand-in-target.ts'

describe('garage status, pause, resume, settings, logs', () => {
  let dir: string
  let dataDir: string
  let server: ControlServer
  let target: StandInTarget
  const g = (...args: string[]) => garage([...args, '--data-dir', dataDir])

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-control-cli-'))
    dataDir = join(dir, 'node')
    target = new StandInTarget({
      settings: await loadSettings(dataDir),
      saveSettings: (s) => saveSettings(dataDir, s),
    })
    server = await startControlServer(target, { dataDir })
  })
  afterAll(async () => {
    await server?.close()
    await rm(dir, { recursive: true, force: true })
  })

  it('status prints the state, model, GPU, region and today; --json the API status', async () => {
    const human = await g('status')
    expect(human.code).toBe(0)
    expect(human.stdout).toMatch(/^state {4}serving$/m)
    expect(human.stdout).toMatch(/^model {4}garage-tiny$/m)
    expect(human.stdout).toContain('NVIDIA GeForce RTX 4070, 12282 MiB, 40% busy, 61 °C')
    expect(human.stdout).toContain('eu-north (head 12D3KooWStandInHead)')
    expect(human.stdout).toContain('1200 tokens, 1100 credits')
    const json = await g('status', '--json')
    expect(JSON.parse(json.stdout)).toEqual(target.status())
  })

  it('status tells the gamer when the head quarantined the node, and why', async () => {
    expect((await g('status')).stdout).not.toContain('checks')
    const reason =
      "3 of 5 checked answers were unlikely under garage-tiny (last: 20 of 24 tokens outside the verifier's top 5)"
    target.current.integrity = { state: 'quarantined', reason }
    try {
      const human = await g('status')
      expect(human.stdout).toContain(
        `checks   QUARANTINED by the head: ${reason}. No traffic, credits held back`,
      )
      expect(JSON.parse((await g('status', '--json')).stdout).integrity).toEqual({
        state: 'quarantined',
        reason,
      })
    } finally {
      target.current.integrity = null
    }
  })

  it('pause takes --minutes or --until; resume lifts it', async () => {
    const paused = await g('pause', '--minutes', '30')
    expect(paused.code).toBe(0)
    expect(paused.stdout).toMatch(/^paused \(paused by you, until .+\)\n$/)
    expect(target.pauseCalls.at(-1)).toEqual({ minutes: 30 })
    const until = new Date(Date.now() + 3 * 3_600_000)
    expect((await g('pause', '--until', until.toISOString())).code).toBe(0)
    expect(target.pauseCalls.at(-1)?.until?.getTime()).toBe(until.getTime())
    const plain = await g('pause')
    expect(plain.code).toBe(0)
    expect(plain.stderr).toContain('until you run garage resume')
    expect(target.pauseCalls.at(-1)).toEqual({})
    const both = await g('pause', '--minutes', '5', '--until', '18:00')
    expect(both.code).toBe(2)
    expect(both.stderr).toContain('not both')
    expect((await g('pause', '--minutes', 'ten')).code).toBe(2)
    expect((await g('pause', '--until', 'soonish')).code).toBe(2)
    const resumed = await g('resume')
    expect(resumed.code).toBe(0)
    expect(resumed.stdout.trim()).toBe('serving')
    expect(target.current.state).toBe('serving')
  })

  it('settings get shows them; set parses lists, schedules, numbers, booleans and null', async () => {
    const get = await g('settings', 'get')
    expect(get.code).toBe(0)
    expect(get.stdout).toMatch(/^games +none$/m)
    expect(get.stdout).toMatch(/^schedule +always$/m)
    const set = await g(
      'settings',
      'set',
      'games=FortniteClient-Win64-Shipping.exe,cs2.exe',
      'schedule=mon-fri 18-23; sat,sun 10-24',
      'vram-cap-mib=8192',
      'maxGpuTemperatureC=83',
      'pauseOnBattery=off',
      'idleOnlyMinutes=null',
    )
    expect(set.code, set.stderr).toBe(0)
    expect(set.stdout).toMatch(/^schedule +mon-fri 18-23; sun,sat 10-24$/m)
    expect(target.settings()).toMatchObject({
      games: ['FortniteClient-Win64-Shipping.exe', 'cs2.exe'],
      schedule: [
        { days: [1, 2, 3, 4, 5], startHour: 18, endHour: 23 },
        { days: [0, 6], startHour: 10, endHour: 24 },
      ],
      vramCapMiB: 8192,
      maxGpuTemperatureC: 83,
      pauseOnBattery: false,
      idleOnlyMinutes: null,
    })
    expect(await loadSettings(dataDir)).toEqual(target.settings())
    expect(JSON.parse((await g('settings', 'get', '--json')).stdout)).toEqual(target.settings())

    const refused = await g('settings', 'set', 'vramCapMiB=5')
    expect(refused.code).toBe(1)
    expect(refused.stderr).toMatch(/^garage settings: vramCapMiB must be a whole number of MiB from 256/)
    expect(target.settings().vramCapMiB).toBe(8192)
    const unknown = await g('settings', 'set', 'colour=red')
    expect(unknown.code).toBe(2)
    expect(unknown.stderr).toContain('unknown setting "colour"')
    expect((await g('settings', 'set', 'pauseOnBattery=maybe')).code).toBe(2)
    expect((await g('settings')).code).toBe(2)
  })

  it('logs prints the last lines, readable or as JSON', async () => {
    target.log('engine ready', { component: 'daemon:engine', model: 'garage-tiny' })
    target.log('joined region', { region: 'eu-north' })
    const two = await g('logs', '--lines', '2')
    expect(two.code).toBe(0)
    const lines = two.stdout.trim().split('\n')
    expect(lines).toHaveLength(2)
    expect(lines[0]).toMatch(/INFO +daemon:engine +engine ready model=garage-tiny$/)
    expect(lines[1]).toMatch(/INFO +joined region region=eu-north$/)
    const raw = await g('logs', '--lines', '1', '--json')
    expect(JSON.parse(raw.stdout)).toMatchObject({ msg: 'joined region' })
    expect((await g('logs', '--lines', '5000')).code).toBe(2)
  })

  it('logs --follow prints new lines as they come and stops on SIGTERM', async () => {
    target.log('before follow')
    const child = spawn(
      process.execPath,
      [garageBin, 'logs', '--follow', '--lines', '1', '--data-dir', dataDir],
      {
        env: { ...process.env, GARAGE_LOG_LEVEL: 'warn' },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    )
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
    try {
      const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]()
      expect((await lines.next()).value).toContain('before follow')
      target.log('while following')
      expect((await lines.next()).value).toContain('while following')
      target.log('one more')
      target.log('and another')
      expect((await lines.next()).value).toContain('one more')
      expect((await lines.next()).value).toContain('and another')
      child.kill('SIGTERM')
      expect(await exited).toBe(0)
    } finally {
      if (child.exitCode == null) child.kill('SIGKILL')
    }
  })

  it('says in one line when no daemon runs, or its token cannot be read (exit 1)', async () => {
    const empty = join(dir, 'empty')
    for (const command of [['status'], ['pause'], ['resume'], ['settings', 'get'], ['logs']]) {
      const res = await garage([...command, '--data-dir', empty])
      expect(res.code, command.join(' ')).toBe(1)
      expect(res.stderr).toBe(
        `garage ${command[0]}: no daemon running (no control.json in ${empty}); start it with garage node\n`,
      )
    }
    const stale = join(dir, 'stale')
    await mkdir(stale)
    const dead = spawn(process.execPath, ['-e', ''])
    const deadPid = await new Promise<number>((resolve) => dead.once('exit', () => resolve(dead.pid!)))
    await writeFile(join(stale, 'control.json'), JSON.stringify({ url: server.url, pid: deadPid }))
    const gone = await garage(['status', '--data-dir', stale])
    expect(gone.code).toBe(1)
    expect(gone.stderr).toContain(`names pid ${deadPid}, which has exited); start it with garage node`)
    await writeFile(join(stale, 'control.json'), JSON.stringify({ url: server.url, pid: process.pid }))
    const noToken = await garage(['status', '--data-dir', stale])
    expect(noToken.code).toBe(1)
    expect(noToken.stderr).toBe(
      `garage status: cannot read the control token ${join(stale, 'control.token')}: the file is missing; restart the daemon to make a new one\n`,
    )
    await writeFile(join(stale, 'control.token'), 'not-the-token-at-all-000000\n', { mode: 0o600 })
    const wrong = await garage(['status', '--data-dir', stale])
    expect(wrong.code).toBe(1)
    expect(wrong.stderr).toContain('does not match')
    expect(wrong.stderr.trim().split('\n')).toHaveLength(1)
  })
})
