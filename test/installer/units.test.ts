import { execFile } from 'node:child_process'
import { chmod, copyFile, mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { commands } from '../../cli/main.ts'
import { defaultDrainGraceMs } from '../../daemon/node-daemon.ts'

const linuxDir = fileURLToPath(new URL('../../installer/linux/', import.meta.url))
const renderUnit = join(linuxDir, 'render-unit.sh')
const kinds = ['user', 'system'] as const

interface Run {
  code: number
  stdout: string
  stderr: string
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<Run> {
  return new Promise((resolve) => {
    execFile(file, args, { env, timeout: 30_000 }, (err, stdout, stderr) => {
      resolve({ code: err == null ? 0 : Number((err as { code?: number }).code ?? 1), stdout, stderr })
    })
  })
}

/** systemd's `KEY=VALUE` lines of one unit, every value of each key. */
function directives(unit: string): Map<string, string[]> {
  const map = new Map<string, string[]>()
  for (const line of unit.split('\n')) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line)
    if (m == null) continue
    map.set(m[1] as string, [...(map.get(m[1] as string) ?? []), m[2] as string])
  }
  return map
}

describe('systemd units rendered as install.sh and build-deb.sh render them', () => {
  let root: string
  let launcher: string
  let dataDir: string
  let configFile: string
  let templates: string[]
  // Each kind's rendered units: file name → text.
  const rendered = { user: new Map<string, string>(), system: new Map<string, string>() }
  // systemd-analyze verify runs `man garage(1)` for Documentation= and needs the ExecStart binary.
  let verifyEnv: NodeJS.ProcessEnv

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'garage-units-'))
    launcher = join(root, 'bin', 'garage')
    dataDir = join(root, 'data')
    configFile = join(root, 'etc', 'garage.env')
    await Promise.all(
      ['bin', 'data', 'etc', 'man/man1', 'run', 'user', 'system'].map((d) =>
        mkdir(join(root, d), { recursive: true }),
      ),
    )
    await writeFile(launcher, '#!/bin/sh\nexit 0\n')
    await chmod(launcher, 0o755)
    await writeFile(configFile, 'GARAGE_NODE_ARGS=\n')
    await copyFile(join(linuxDir, 'garage.1'), join(root, 'man/man1/garage.1'))
    verifyEnv = { ...process.env, MANPATH: join(root, 'man'), XDG_RUNTIME_DIR: join(root, 'run') }
    templates = (await readdir(join(linuxDir, 'units'))).filter((f) => f.endsWith('.service.in'))
    for (const kind of kinds) {
      for (const template of templates) {
        const args = ['--kind', kind, '--launcher', launcher, '--data-dir', dataDir, '--config', configFile]
        const r = await run(renderUnit, [...args, join(linuxDir, 'units', template)])
        expect(r.code, r.stderr).toBe(0)
        const name = template.replace(/\.in$/, '')
        await writeFile(join(root, kind, name), r.stdout)
        rendered[kind].set(name, r.stdout)
      }
    }
  })
  afterAll(async () => {
    await rm(root, { recursive: true, force: true })
  })

  it('has the node, bootstrap and federation units, each running a real garage command', () => {
    expect(templates.sort()).toEqual([
      'garage-bootstrap.service.in',
      'garage-federation.service.in',
      'garage-node.service.in',
    ])
    for (const kind of kinds) {
      for (const [name, unit] of rendered[kind]) {
        const command = name.replace(/^garage-|\.service$/g, '')
        expect(Object.keys(commands)).toContain(command)
        expect(directives(unit).get('ExecStart')).toEqual([
          `${launcher} ${command} $GARAGE_${command.toUpperCase()}_ARGS`,
        ])
        expect(unit).not.toMatch(/@[A-Za-z_]+@/)
      }
    }
  })

  it.each(kinds)('systemd-analyze %s verify accepts every unit, without a warning', async (kind) => {
    const dir = join(root, kind)
    const files = [...rendered[kind].keys()].map((name) => join(dir, name))
    const r = await run(
      'systemd-analyze',
      [...(kind === 'user' ? ['--user'] : []), 'verify', ...files],
      verifyEnv,
    )
    expect(r.code, r.stderr).toBe(0)
    // verify exits 0 on unknown keys and bad values: it only warns, so a warning is a failure here.
    expect(`${r.stdout}${r.stderr}`).toBe('')
  })

  it('systemd-analyze verify fails a unit whose garage command does not exist (the check above is real)', async () => {
    const broken = join(root, 'broken.service')
    const r = await run(renderUnit, [
      '--kind',
      'system',
      '--launcher',
      join(root, 'bin', 'missing'),
      '--data-dir',
      dataDir,
      '--config',
      configFile,
      join(linuxDir, 'units', 'garage-node.service.in'),
    ])
    await writeFile(broken, r.stdout)
    const verify = await run('systemd-analyze', ['verify', broken], verifyEnv)
    expect(verify.code).not.toBe(0)
    expect(verify.stderr).toContain('is not executable')
  })

  it.each(kinds)('hardens every %s unit and lets it write only the data dir', (kind) => {
    for (const unit of rendered[kind].values()) {
      const d = directives(unit)
      expect(d.get('NoNewPrivileges')).toEqual(['yes'])
      expect(d.get('ProtectSystem')).toEqual(['strict'])
      expect(d.get('ReadWritePaths')).toEqual([dataDir])
      expect(d.get('PrivateTmp')).toEqual(['yes'])
      expect(d.get('Restart')).toEqual(['on-failure'])
      expect(d.get('RestartPreventExitStatus')).toEqual(['2'])
      expect(d.get('KillSignal')).toEqual(['SIGTERM'])
      expect(d.get('EnvironmentFile')).toEqual([`-${configFile}`])
      expect(d.get('Environment')).toContain(`GARAGE_DATA_DIR=${dataDir}`)
      if (kind === 'system') {
        expect(d.get('User')).toEqual(['garage'])
        expect(d.get('ProtectHome')).toEqual(['yes'])
        expect(d.get('WantedBy')).toEqual(['multi-user.target'])
      } else {
        expect(d.has('User')).toBe(false)
        expect(d.get('WantedBy')).toEqual(['default.target'])
      }
    }
  })

  it('stops the node only after its drain grace, by signalling the daemon alone', () => {
    for (const kind of kinds) {
      const d = directives(rendered[kind].get('garage-node.service') as string)
      expect(Number(d.get('TimeoutStopSec')?.[0]) * 1000).toBeGreaterThan(defaultDrainGraceMs)
      // The engine and containers are the daemon's to stop while it drains.
      expect(d.get('KillMode')).toEqual(['mixed'])
    }
  })

  it('keeps what rootless Podman and GPUs need open in the node and bootstrap units', () => {
    for (const kind of kinds) {
      for (const name of ['garage-node.service', 'garage-bootstrap.service']) {
        const d = directives(rendered[kind].get(name) as string)
        for (const off of [
          'PrivateDevices',
          'DeviceAllow',
          'ProtectClock',
          'RestrictNamespaces',
          'RestrictSUIDSGID',
        ])
          expect(d.has(off), `${kind} ${name} ${off}`).toBe(false)
        if (kind === 'user') {
          // In a user unit Podman's user namespace cannot be made under NoNewPrivileges: the user's
          // Podman service runs the containers.
          expect(d.get('Environment')).toContain('CONTAINER_HOST=unix://%t/podman/podman.sock')
          expect(d.get('Wants')).toContain('podman.socket')
        } else {
          expect(d.get('Environment')).toContain(`HOME=${dataDir}`)
          expect(d.get('RuntimeDirectory')?.length).toBe(1)
        }
      }
    }
  })

  it('refuses a path that a unit file would split or expand', async () => {
    for (const bad of [join(root, 'with space'), join(root, '50%'), 'relative/garage']) {
      const r = await run(renderUnit, [
        '--kind',
        'user',
        '--launcher',
        bad,
        '--data-dir',
        dataDir,
        '--config',
        configFile,
        join(linuxDir, 'units', 'garage-node.service.in'),
      ])
      expect(r.code).toBe(2)
      expect(r.stderr).toContain('must be absolute')
    }
  })
})
