import { execFile } from 'node:child_process'
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

/** The macOS scripts' checks that come before any copying; the full install is macos.slow.test.ts. */

const repo = fileURLToPath(new URL('../../', import.meta.url))
const macos = join(repo, 'installer/macos')

function run(
  file: string,
  args: string[],
  env: NodeJS.ProcessEnv,
): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { env, timeout: 20_000 }, (err, stdout, stderr) => {
      resolve({
        code: err == null ? 0 : Number((err as { code?: number }).code ?? 1),
        output: stdout + stderr,
      })
    })
  })
}

describe('installer/macos scripts', () => {
  let root: string
  let home: string
  let fakes: string

  const envFor = (system: string): NodeJS.ProcessEnv => ({
    HOME: home,
    PATH: `${join(fakes, system)}:${process.env.PATH}`,
  })

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'garage-macos-fast-'))
    home = join(root, 'home')
    fakes = join(root, 'fakes')
    await mkdir(home)
    for (const system of ['Darwin', 'Linux']) {
      await mkdir(join(fakes, system), { recursive: true })
      await writeFile(join(fakes, system, 'uname'), `#!/bin/sh\necho ${system}\n`)
      await chmod(join(fakes, system, 'uname'), 0o755)
      // Any launchctl call before the checks would be a bug: this one fails loudly.
      await writeFile(
        join(fakes, system, 'launchctl'),
        '#!/bin/sh\necho "launchctl called: $*" >&2\nexit 99\n',
      )
      await chmod(join(fakes, system, 'launchctl'), 0o755)
    }
  })

  afterAll(async () => {
    if (root != null) await rm(root, { recursive: true, force: true })
  })

  it('pass shellcheck', async () => {
    const result = await run(
      'shellcheck',
      [join(macos, 'install.sh'), join(macos, 'uninstall.sh')],
      process.env,
    )
    expect(result.output).toBe('')
    expect(result.code).toBe(0)
  })

  it('are executable bash scripts with strict mode', async () => {
    for (const name of ['install.sh', 'uninstall.sh']) {
      const text = await readFile(join(macos, name), 'utf8')
      expect(text.startsWith('#!/usr/bin/env bash\n')).toBe(true)
      expect(text).toContain('\nset -euo pipefail\n')
      expect((await stat(join(macos, name))).mode & 0o111).toBe(0o111)
    }
  })

  it('refuse to run anywhere but macOS, before touching anything', async () => {
    for (const name of ['install.sh', 'uninstall.sh']) {
      const result = await run(join(macos, name), [], envFor('Linux'))
      expect(result.code).toBe(1)
      expect(result.output).toMatch(/is for macOS; on Linux use installer\/linux\//)
      expect(result.output).not.toContain('launchctl called')
    }
    expect(await readdir(home)).toEqual([])
  })

  it('exit 2 with the usage on a mistake, and print the usage on --help', async () => {
    const wrong = await run(join(macos, 'install.sh'), ['--bootstrap'], envFor('Darwin'))
    expect(wrong.code).toBe(2)
    expect(wrong.output).toContain('--bootstrap needs a value')
    expect(wrong.output).toContain('Usage: installer/macos/install.sh')
    const unknown = await run(join(macos, 'uninstall.sh'), ['--everything'], envFor('Darwin'))
    expect(unknown.code).toBe(2)
    expect(unknown.output).toContain('unknown option: --everything')
    const help = await run(join(macos, 'install.sh'), ['--help'], envFor('Darwin'))
    expect(help.code).toBe(0)
    expect(help.output).toContain('--no-start')
    const relative = await run(join(macos, 'install.sh'), ['--prefix', 'opt/garage'], envFor('Darwin'))
    expect(relative.code).toBe(2)
    expect(relative.output).toContain('--prefix must be an absolute path')
  })

  it('never replace or delete a folder that is not a Garage install', async () => {
    const precious = join(root, 'precious')
    await mkdir(precious)
    await writeFile(join(precious, 'thesis.tex'), 'years of work')
    const install = await run(join(macos, 'install.sh'), ['--prefix', precious], envFor('Darwin'))
    expect(install.code).toBe(1)
    expect(install.output).toContain('is not empty and not a Garage install')
    const uninstall = await run(
      join(macos, 'uninstall.sh'),
      ['--prefix', precious, '--purge'],
      envFor('Darwin'),
    )
    expect(uninstall.code).toBe(1)
    expect(uninstall.output).toContain('is not a Garage install')
    expect(await readFile(join(precious, 'thesis.tex'), 'utf8')).toBe('years of work')
    expect(install.output + uninstall.output).not.toContain('launchctl called')
  })

  it('never overwrite a garage command that is not its own launcher', async () => {
    const bin = join(root, 'bin')
    await mkdir(bin, { recursive: true })
    await writeFile(join(bin, 'garage'), '#!/bin/sh\necho another garage\n')
    const result = await run(join(macos, 'install.sh'), ['--bin-dir', bin], envFor('Darwin'))
    expect(result.code).toBe(1)
    expect(result.output).toContain("is not Garage's launcher")
    expect(await readFile(join(bin, 'garage'), 'utf8')).toContain('another garage')
  })

  it('has a plist template whose only blanks are the ones install.sh fills', async () => {
    const template = await readFile(join(macos, 'net.garage.node.plist'), 'utf8')
    const blanks = new Set(template.match(/@[A-Z_]+@/g))
    expect([...blanks].sort()).toEqual([
      '@DATA_DIR@',
      '@GARAGE_JS@',
      '@LOG_FILE@',
      '@NODE@',
      '@NODE_ARGS@',
      '@NODE_OPTIONS@',
    ])
    const script = await readFile(join(macos, 'install.sh'), 'utf8')
    for (const blank of blanks) expect(script).toContain(blank)
  })
})
