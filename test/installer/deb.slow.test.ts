import { execFile } from 'node:child_process'
import { access, mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

const repo = fileURLToPath(new URL('../../', import.meta.url))
const { version } = JSON.parse(await readFile(join(repo, 'package.json'), 'utf8')) as { version: string }
const debVersion = `${version}-1`
const buildTimeoutMs = 300_000
const units = ['garage-node.service', 'garage-bootstrap.service', 'garage-federation.service']
const isRoot = process.getuid?.() === 0
const needsRoot = 'installing a package needs root (CI runs as root)'

interface Run {
  code: number
  stdout: string
  stderr: string
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      file,
      args,
      {
        env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive', ...env },
        cwd: '/',
        timeout: buildTimeoutMs,
        maxBuffer: 256 * 1024 * 1024,
      },
      (err, stdout, stderr) => {
        resolve({ code: err == null ? 0 : Number((err as { code?: number }).code ?? 1), stdout, stderr })
      },
    )
  })
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  )
}

/** Every path under DIR (DIR included) when it exists. */
async function tree(dir: string): Promise<string[]> {
  if (!(await exists(dir))) return []
  const out = [dir]
  if ((await stat(dir)).isDirectory()) {
    for (const entry of await readdir(dir, { recursive: true })) out.push(join(dir, entry))
  }
  return out
}

/** Everything of Garage's the package could leave on this machine. */
async function footprint(): Promise<Record<string, unknown>> {
  const matching = async (dir: string, pattern: RegExp): Promise<string[]> =>
    (await tree(dir)).filter((p) => pattern.test(p))
  const paths = [
    ...(await tree('/usr/lib/garage')),
    ...(await tree('/usr/bin/garage')),
    ...(await tree('/etc/garage')),
    ...(await tree('/var/lib/garage')),
    ...(await tree('/usr/share/doc/garage')),
    ...(await tree('/usr/share/man/man1/garage.1.gz')),
    ...(await tree('/usr/share/lintian/overrides/garage')),
    ...(await matching('/lib/systemd/system', /\/garage-/)),
    // Enablement links and masks, and deb-systemd-helper's record of them.
    ...(await matching('/etc/systemd/system', /garage-/)),
    ...(await matching('/var/lib/systemd', /garage-/)),
  ].sort()
  const account = async (db: string): Promise<string[]> =>
    (await readFile(db, 'utf8')).split('\n').filter((l) => l.startsWith('garage:'))
  const status = await run('dpkg-query', ['-W', '-f', `\${db:Status-Status}`, 'garage'])
  return {
    paths,
    passwd: await account('/etc/passwd'),
    group: await account('/etc/group'),
    shadow: await account('/etc/shadow'),
    dpkg: status.code === 0 ? status.stdout : 'unknown to dpkg',
  }
}

describe('the .deb: build, inspect, lintian, install, purge', () => {
  let out: string
  let deb: string
  let before: Record<string, unknown>
  let installedHere = false
  let scratch: string

  beforeAll(async () => {
    // Built, unpacked by lintian and installed from memory where /dev/shm exists: on a busy disk that
    // takes a third less time.
    scratch = (await exists('/dev/shm')) ? '/dev/shm' : tmpdir()
    out = await mkdtemp(join(scratch, 'garage-deb-'))
    if (!isRoot) return
    const installed = await run('dpkg-query', ['-W', '-f', `\${db:Status-Status}`, 'garage'])
    if (installed.code === 0 && installed.stdout !== 'not-installed') {
      throw new Error(
        `the garage package is on this machine already (dpkg status: ${installed.stdout}); this suite ` +
          'installs and purges it, so remove it first: dpkg --purge garage',
      )
    }
    if ((await run('getent', ['passwd', 'garage'])).code === 0) {
      throw new Error(
        'a garage user exists already and purging the package would delete it: userdel garage first',
      )
    }
    before = await footprint()
  })
  afterAll(async () => {
    // Purged even when a test failed half-way.
    if (installedHere) await run('dpkg', ['--purge', 'garage'])
    if (out != null) await rm(out, { recursive: true, force: true })
  })

  it(
    'npm run package:deb builds it (CPU only, fast compression)',
    async () => {
      const r = await run(
        'bash',
        [join(repo, 'installer/linux/build-deb.sh'), '--no-gpu-backends', '--fast', '--out', out],
        { TMPDIR: out },
      )
      expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0)
      const arch = (await run('dpkg', ['--print-architecture'])).stdout.trim()
      deb = join(out, `garage_${debVersion}_${arch}.deb`)
      expect(r.stdout).toContain(`Built ${deb} (`)
      expect((await stat(deb)).size).toBeGreaterThan(10 * 1024 * 1024)
    },
    buildTimeoutMs,
  )

  it('dpkg-deb --info shows its control fields, maintainer scripts and conffile', async () => {
    const info = await run('dpkg-deb', ['--info', deb])
    expect(info.code, info.stderr).toBe(0)
    for (const member of ['control', 'md5sums', 'conffiles', 'postinst', 'prerm', 'postrm'])
      expect(info.stdout).toMatch(new RegExp(`\\s${member}\\s`))
    const field = async (name: string): Promise<string> =>
      (await run('dpkg-deb', ['--field', deb, name])).stdout.trim()
    expect(await field('Package')).toBe('garage')
    expect(await field('Version')).toBe(debVersion)
    expect(await field('Architecture')).toBe((await run('dpkg', ['--print-architecture'])).stdout.trim())
    expect(await field('Depends')).toMatch(/^adduser, libc6 \(>= [\d.]+\), .*libstdc\+\+6/)
    expect(await field('Recommends')).toBe('podman')
    expect(Number(await field('Installed-Size'))).toBeGreaterThan(100 * 1024)
    expect((await run('dpkg-deb', ['--info', deb, 'conffiles'])).stdout).toBe('/etc/garage/garage.env\n')
  })

  it('dpkg-deb --contents: the app, /usr/bin/garage, the units and the conffile, all root-owned', async () => {
    const listing = await run('dpkg-deb', ['--contents', deb])
    expect(listing.code, listing.stderr).toBe(0)
    const entries = listing.stdout
      .trim()
      .split('\n')
      .map((line) => {
        const [mode, owner, , , , ...rest] = line.split(/\s+/)
        return { mode: mode as string, owner: owner as string, path: rest.join(' ').replace(/ -> .*$/, '') }
      })
    const paths = new Set(entries.map((e) => e.path))
    for (const path of [
      './usr/bin/garage',
      './usr/lib/garage/runtime/node',
      './usr/lib/garage/app/bin/garage.js',
      './usr/lib/garage/app/package.json',
      './etc/garage/garage.env',
      './usr/share/man/man1/garage.1.gz',
      './usr/share/doc/garage/copyright',
      './usr/share/doc/garage/changelog.Debian.gz',
      ...units.map((u) => `./lib/systemd/system/${u}`),
    ])
      expect(paths, path).toContain(path)
    expect(entries.every((e) => e.owner === 'root/root')).toBe(true)
    expect([...paths].filter((p) => /^\.\/(home|tmp|root|var\/lib\/garage)\//.test(p))).toEqual([])
    // Production code and dependencies only; no GPU back-ends in this CPU-only build.
    for (const absent of [
      /^\.\/usr\/lib\/garage\/app\/(test|bench|tray-app|docs|installer)\//,
      /\/node_modules\/(vitest|@biomejs|electron|fast-check|node)\//,
      /\/@node-llama-cpp\/linux-[^/]*-(cuda|vulkan)/,
    ])
      expect([...paths].filter((p) => absent.test(p))).toEqual([])
    expect(entries.find((e) => e.path === './usr/bin/garage')?.mode).toBe('-rwxr-xr-x')
  })

  it(
    'lintian finds no error and no warning (the overrides in the package say why for the rest)',
    async () => {
      const unpacked = await mkdtemp(join(scratch, 'garage-lintian-'))
      const r = await run('lintian', ['--tag-display-limit', '0', deb], { TMPDIR: unpacked })
      await rm(unpacked, { recursive: true, force: true })
      const tags = r.stdout.split('\n').filter((l) => /^[EW]: /.test(l))
      expect(tags, r.stdout).toEqual([])
      expect(r.code, r.stderr).toBe(0)
      // Each override is explained on the comment line before it.
      const overrides = (
        await readFile(join(repo, 'installer/linux/debian/lintian-overrides'), 'utf8')
      ).split('\n')
      overrides.forEach((line, i) => {
        if (line.startsWith('garage:')) expect(overrides[i - 1], line).toMatch(/^# \S/)
      })
    },
    buildTimeoutMs,
  )

  it('dpkg -i installs it: garage runs from /usr/bin, the garage user and /var/lib/garage exist', async (ctx) => {
    if (!isRoot) {
      console.warn(`skipping dpkg -i: ${needsRoot}`)
      ctx.skip(needsRoot)
    }
    installedHere = true
    const r = await run('dpkg', ['-i', deb])
    expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0)
    expect((await run('dpkg-query', ['-W', '-f', `\${Status} \${Version}`, 'garage'])).stdout).toBe(
      `install ok installed ${debVersion}`,
    )
    const ver = await run('/usr/bin/garage', ['--version'])
    expect(ver.stdout.trim()).toBe(`garage ${version} (node ${process.version})`)
    const user = (await run('getent', ['passwd', 'garage'])).stdout.trim().split(':')
    expect(user.slice(5)).toEqual(['/var/lib/garage', '/usr/sbin/nologin'])
    const data = await stat('/var/lib/garage')
    expect(data.mode & 0o777).toBe(0o750)
    expect(data.uid).toBe(Number(user[2]))
    expect(await readFile('/etc/garage/garage.env', 'utf8')).toContain('GARAGE_DATA_DIR=/var/lib/garage\n')
    // The installed units, with the installed garage and man page.
    const verify = await run('systemd-analyze', ['verify', ...units.map((u) => `/lib/systemd/system/${u}`)])
    expect(`${verify.stdout}${verify.stderr}`).toBe('')
    // Installed, not enabled: none can run before /etc/garage/garage.env has its options.
    for (const u of units)
      expect(await exists(`/etc/systemd/system/multi-user.target.wants/${u}`)).toBe(false)
  })

  it('dpkg --purge leaves nothing behind, even after the garage user ran doctor (and rootless Podman)', async (ctx) => {
    if (!isRoot) ctx.skip(needsRoot)
    const uid = (await run('id', ['-u', 'garage'])).stdout.trim()
    const doctor = await run('runuser', ['-u', 'garage', '--', '/usr/bin/garage', 'doctor', '--json'])
    expect(JSON.parse(doctor.stdout).hardware.system.disk.path).toBe('/var/lib/garage')
    const r = await run('dpkg', ['--purge', 'garage'])
    expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0)
    installedHere = false
    expect(await footprint()).toEqual(before)
    expect((await run('find', ['/tmp', '/var/tmp', '/dev/shm', '-maxdepth', '1', '-uid', uid])).stdout).toBe(
      '',
    )
    expect((await run('pgrep', ['-u', uid])).stdout).toBe('')
  })
})
