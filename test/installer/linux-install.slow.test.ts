import { execFile, spawn } from 'node:child_process'
import { appendFile, chmod, lstat, mkdir, mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

const repo = fileURLToPath(new URL('../../', import.meta.url)).replace(/\/$/, '')
const installSh = join(repo, 'installer/linux/install.sh')
const { version } = JSON.parse(await readFile(join(repo, 'package.json'), 'utf8')) as { version: string }
const isRoot = process.getuid?.() === 0
const installTimeoutMs = 180_000

interface Run {
  code: number
  stdout: string
  stderr: string
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      file,
      args,
      { env, cwd: '/', timeout: installTimeoutMs, maxBuffer: 64 * 1024 * 1024 },
      (err, stdout, stderr) => {
        resolve({ code: err == null ? 0 : Number((err as { code?: number }).code ?? 1), stdout, stderr })
      },
    )
  })
}

/** Runs FILE ARGS with the source tree hidden under an empty tmpfs: only the installed copy can run. */
function runWithoutRepo(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  const hide = ['sh', '-c', 'mount -t tmpfs none "$0" && exec "$@"', repo, file, ...args]
  // A private mount namespace (root), or a user namespace that maps us to root in it.
  return run('unshare', [...(isRoot ? [] : ['--user', '--map-root-user']), '--mount', ...hide], env)
}

/** Every path under DIR, relative, sorted. */
async function tree(dir: string): Promise<string[]> {
  const out: string[] = []
  async function walk(rel: string): Promise<void> {
    for (const entry of await readdir(join(dir, rel), { withFileTypes: true })) {
      const child = rel === '' ? entry.name : `${rel}/${entry.name}`
      out.push(child)
      if (entry.isDirectory()) await walk(child)
    }
  }
  await walk('')
  return out.sort()
}

/** An environment where the installer's per-user defaults land under HOME. */
function userEnv(home: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, HOME: home, GARAGE_LOG_LEVEL: 'warn' }
  for (const name of ['XDG_DATA_HOME', 'XDG_CONFIG_HOME', 'XDG_RUNTIME_DIR', 'GARAGE_DATA_DIR'])
    delete env[name]
  return env
}

describe('install.sh and uninstall.sh per user, into a temporary HOME', () => {
  let root: string
  let home: string
  let before: string[]
  let env: NodeJS.ProcessEnv
  const paths = () => ({
    prefix: join(home, '.local/lib/garage'),
    launcher: join(home, '.local/bin/garage'),
    data: join(home, '.local/share/garage'),
    config: join(home, '.config/garage/garage.env'),
    unit: join(home, '.config/systemd/user/garage-node.service'),
    man: join(home, '.local/share/man'),
  })

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'garage-install-'))
    home = join(root, 'home')
    await mkdir(home)
    env = userEnv(home)
    before = await tree(root)
  })
  afterAll(async () => {
    await rm(root, { recursive: true, force: true })
  })

  it(
    'installs the runtime, code, launcher, config and user unit, and runs the installed doctor',
    async () => {
      const p = paths()
      const r = await run('bash', [installSh, '--no-start', '--no-gpu-backends'], env)
      expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0)
      expect(r.stdout).toContain(`Installing Garage ${version} (user install) into ${p.prefix}`)
      expect(r.stdout).toContain('Not starting the services (--no-start)')
      expect(r.stdout).toMatch(/this machine can serve|this machine cannot serve yet/)

      expect((await stat(p.launcher)).mode & 0o777).toBe(0o755)
      expect((await stat(join(p.prefix, 'runtime/node'))).isFile()).toBe(true)
      expect((await stat(p.data)).mode & 0o777).toBe(0o700)
      expect(await readFile(p.config, 'utf8')).toContain(`GARAGE_DATA_DIR=${p.data}\n`)
      const unit = await readFile(p.unit, 'utf8')
      expect(unit).toContain(`ExecStart=${p.launcher} node $GARAGE_NODE_ARGS`)
      expect(unit).toContain(`ReadWritePaths=${p.data}`)
      // Production dependencies only, and node-llama-cpp's CPU build without the GPU ones.
      const modules = join(p.prefix, 'app/node_modules')
      expect((await readdir(join(modules, '@node-llama-cpp'))).sort()).toEqual([`linux-${process.arch}`])
      for (const dev of ['vitest', '@biomejs', 'electron', 'node', 'fast-check']) {
        await expect(lstat(join(modules, dev))).rejects.toThrow(/ENOENT/)
      }
      expect((await readdir(join(p.prefix, 'app'))).sort()).toEqual(
        [
          'bin',
          'bootstrap',
          'cli',
          'containers',
          'core',
          'daemon',
          'federation',
          'mesh',
          'node_modules',
          'openai',
          'package.json',
          'routing',
        ].sort(),
      )

      // The installed copy runs on its own: the source tree is hidden while it does.
      const ver = await runWithoutRepo(p.launcher, ['--version'], env)
      expect(ver.code, ver.stderr).toBe(0)
      expect(ver.stdout.trim()).toBe(`garage ${version} (node ${process.version})`)
      const doctor = await runWithoutRepo(p.launcher, ['doctor', '--json'], env)
      expect([0, 1], doctor.stderr).toContain(doctor.code)
      const report = JSON.parse(doctor.stdout)
      expect(report.schema).toBe('garage.doctor/v1')
      // The launcher points garage at the install's data dir.
      expect(report.hardware.system.disk.path).toBe(p.data)
      expect(report.hardware.llama.available).toBe(true)

      // The unit as written, with its real launcher and the installed man page.
      const runtimeDir = await mkdtemp(join(tmpdir(), 'garage-install-run-'))
      const verify = await run('systemd-analyze', ['--user', 'verify', p.unit], {
        ...env,
        MANPATH: p.man,
        XDG_RUNTIME_DIR: runtimeDir,
      })
      await rm(runtimeDir, { recursive: true, force: true })
      expect(`${verify.stdout}${verify.stderr}`).toBe('')
      expect(verify.code).toBe(0)
    },
    installTimeoutMs,
  )

  it(
    'the installed copy serves: its garage devnet answers an OpenAI request, the source tree hidden',
    async () => {
      const p = paths()
      const hide = ['sh', '-c', 'mount -t tmpfs none "$0" && exec "$@"', repo, p.launcher]
      const devnet = spawn(
        'unshare',
        [
          ...(isRoot ? [] : ['--user', '--map-root-user']),
          '--mount',
          ...hide,
          'devnet',
          '--nodes',
          '1',
          '--port',
          '0',
        ],
        { env, cwd: '/', stdio: ['ignore', 'pipe', 'pipe'] },
      )
      const exited = new Promise<number | null>((resolve) => devnet.once('exit', (code) => resolve(code)))
      let stderr = ''
      devnet.stderr.on('data', (d: Buffer) => {
        stderr += d.toString()
      })
      try {
        const banner: string[] = []
        await new Promise<void>((resolve, reject) => {
          createInterface({ input: devnet.stdout }).on('line', (line) => {
            banner.push(line)
            if (line.includes('API key')) resolve()
          })
          void exited.then((code) => reject(new Error(`devnet exited with ${code}: ${stderr}`)))
        })
        const field = (name: string): string =>
          (banner.find((l) => l.trim().startsWith(name)) ?? '').trim().split(/\s+/).at(-1) as string
        const response = await fetch(`${field('OpenAI base URL')}/chat/completions`, {
          method: 'POST',
          headers: { authorization: `Bearer ${field('API key')}`, 'content-type': 'application/json' },
          body: JSON.stringify({
            model: 'garage-tiny',
            messages: [{ role: 'user', content: 'Hi' }],
            max_tokens: 4,
          }),
        })
        expect(response.status).toBe(200)
        const body = (await response.json()) as { usage: { completion_tokens: number } }
        expect(body.usage.completion_tokens).toBeGreaterThan(0)
      } finally {
        devnet.kill('SIGTERM')
        expect(await exited).toBe(0)
      }
    },
    installTimeoutMs,
  )

  it('uninstall.sh leaves nothing outside the data dir', async () => {
    const p = paths()
    const r = await run(join(p.prefix, 'uninstall.sh'), [], env)
    expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0)
    expect(r.stdout).toContain(`its data stays in ${p.data}`)
    const data = p.data.slice(root.length + 1)
    const left = (await tree(root)).filter((path) => !before.includes(path))
    // What is new: the data dir, what is in it, and the directories it sits in.
    const outside = left.filter(
      (path) => path !== data && !path.startsWith(`${data}/`) && !data.startsWith(`${path}/`),
    )
    expect(outside).toEqual([])
    expect(left).toContain(data)
  })

  it(
    'a second install takes over the data dir; uninstall.sh --purge then leaves nothing at all',
    async () => {
      const p = paths()
      const authority = '12D3KooWTestAuthority'
      const bootstrap = '/ip4/192.0.2.1/tcp/4001/p2p/12D3KooWTestBootstrap'
      const r = await run(
        'bash',
        [installSh, '--no-start', '--no-gpu-backends', '--authority', authority, '--bootstrap', bootstrap],
        env,
      )
      expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0)
      expect(await readFile(p.config, 'utf8')).toContain(
        `GARAGE_NODE_ARGS=--authority ${authority} --bootstrap ${bootstrap}\n`,
      )
      // An edited config survives a plain uninstall; --purge removes it anyway.
      await appendFile(p.config, 'GARAGE_LOG_LEVEL=debug\n')
      const purge = await run(join(p.prefix, 'uninstall.sh'), ['--purge'], env)
      expect(purge.code, `${purge.stdout}\n${purge.stderr}`).toBe(0)
      expect(await tree(root)).toEqual(before)
    },
    installTimeoutMs,
  )

  it('refuses --system without root, and a prefix that holds something else', async () => {
    if (!isRoot) {
      const r = await run('bash', [installSh, '--system'], env)
      expect(r.code).toBe(1)
      expect(r.stderr).toContain('needs root')
    }
    const busy = join(root, 'busy')
    await mkdir(join(busy, 'something'), { recursive: true })
    const r = await run('bash', [installSh, '--no-start', '--prefix', busy], env)
    expect(r.code).toBe(1)
    expect(r.stderr).toContain(`${busy} is not empty and holds no Garage install`)
    await rm(busy, { recursive: true })
    const bad = await run('bash', [installSh, '--role', 'gamer'], env)
    expect(bad.code).toBe(2)
    expect(bad.stderr).toContain("--role must be node, bootstrap or federation, not 'gamer'")
  })
})

describe('install.sh --system: units run as the garage user', () => {
  let root: string
  let before: string[]
  let userWasThere = true
  const at = (rel: string): string => join(root, rel)
  const dirs = (): string[] => [
    '--prefix',
    at('opt/garage'),
    '--bin-dir',
    at('usr/local/bin'),
    '--data-dir',
    at('var/lib/garage'),
    '--config-dir',
    at('etc/garage'),
    '--unit-dir',
    at('etc/systemd/system'),
  ]

  beforeAll(async () => {
    if (!isRoot) return
    const user = await run('getent', ['passwd', 'garage'], process.env)
    userWasThere = user.code === 0
    if (userWasThere) {
      throw new Error(
        'a garage user exists already (the garage package, or a leftover of an earlier run): remove it ' +
          '(dpkg --purge garage, or userdel garage) first; this suite creates and removes it',
      )
    }
    root = await mkdtemp(join(tmpdir(), 'garage-install-system-'))
    // The garage user must reach the install under this root-only temporary directory.
    await chmod(root, 0o755)
    before = await tree(root)
  })
  afterAll(async () => {
    if (root == null) return
    const uninstall = at('opt/garage/uninstall.sh')
    if (!userWasThere && (await stat(uninstall).catch(() => null)) != null) {
      await run(uninstall, ['--purge'], process.env)
    }
    await rm(root, { recursive: true, force: true })
  })

  it(
    'creates the user and its data dir, installs all three units, runs doctor as garage, and purges it all',
    async (ctx) => {
      if (!isRoot) {
        const why = 'a --system install creates a user and needs root (CI runs as root)'
        console.warn(`skipping: ${why}`)
        ctx.skip(why)
      }
      const r = await run(
        'bash',
        [
          installSh,
          '--system',
          '--no-start',
          '--no-gpu-backends',
          '--role',
          'node,bootstrap,federation',
          ...dirs(),
        ],
        { ...process.env, GARAGE_LOG_LEVEL: 'warn' },
      )
      expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0)
      expect(r.stdout).toContain('Creating the system user garage')
      const user = (await run('getent', ['passwd', 'garage'], process.env)).stdout.trim().split(':')
      expect(user[5]).toBe(at('var/lib/garage'))
      expect(user[6]).toBe('/usr/sbin/nologin')
      const data = await stat(at('var/lib/garage'))
      expect(data.mode & 0o777).toBe(0o750)
      expect(data.uid).toBe(Number(user[2]))

      const units = ['garage-node.service', 'garage-bootstrap.service', 'garage-federation.service']
      const files = units.map((u) => at(`etc/systemd/system/${u}`))
      for (const file of files) expect(await readFile(file, 'utf8')).toMatch(/^User=garage$/m)
      const verify = await run('systemd-analyze', ['verify', ...files], {
        ...process.env,
        MANPATH: at('usr/local/share/man'),
      })
      expect(`${verify.stdout}${verify.stderr}`).toBe('')

      // The service user runs the installed garage.
      const ver = await run(
        'runuser',
        ['-u', 'garage', '--', at('usr/local/bin/garage'), '--version'],
        process.env,
      )
      expect(ver.stdout.trim()).toBe(`garage ${version} (node ${process.version})`)

      const purge = await run(at('opt/garage/uninstall.sh'), ['--purge'], process.env)
      expect(purge.code, `${purge.stdout}\n${purge.stderr}`).toBe(0)
      // Nothing of the user's is left running or lying in shared places (doctor ran rootless Podman).
      const owned = await run(
        'find',
        ['/tmp', '/var/tmp', '/dev/shm', '-maxdepth', '1', '-uid', user[2] as string],
        process.env,
      )
      expect(owned.stdout).toBe('')
      expect((await run('pgrep', ['-u', user[2] as string], process.env)).stdout).toBe('')
      expect((await run('getent', ['passwd', 'garage'], process.env)).code).not.toBe(0)
      expect((await run('getent', ['group', 'garage'], process.env)).code).not.toBe(0)
      expect(await tree(root)).toEqual(before)
    },
    installTimeoutMs,
  )
})
