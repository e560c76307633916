import { execFile } from 'node:child_process'
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { daemonNodeOptions } from '../../daemon/launch.ts'

/**
 * installer/macos on Linux: HOME is a temporary folder, and `uname` (says Darwin), `launchctl` and
 * `plutil` are fakes that record their argv. The copy, the launcher, the rendered agent and
 * `garage doctor` from the installed copy are all real.
 */

const repo = fileURLToPath(new URL('../../', import.meta.url))
const installScript = join(repo, 'installer/macos/install.sh')
const uninstallScript = join(repo, 'installer/macos/uninstall.sh')
const installTimeoutMs = 180_000

type PlistValue = string | number | boolean | PlistValue[] | { [key: string]: PlistValue }

class PlistParseError extends Error {
  static override name = 'PlistParseError'
}

/**
 * A strict parser for the XML plist subset launchd agents use (dict, array, string, integer,
 * true, false): the header and DOCTYPE must be Apple's, comments are skipped, anything else fails.
 */
function parsePlist(xml: string): PlistValue {
  const header =
    '<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
  if (!xml.startsWith(header)) throw new PlistParseError('missing the XML declaration or the plist DOCTYPE')
  const tokens = xml
    .slice(header.length)
    .replace(/<!--[\s\S]*?-->/g, '')
    .split(/(<[^>]*>)/)
    .map((t) => t.trim())
    .filter((t) => t !== '')
  let i = 0
  const next = (): string => {
    const t = tokens[i++]
    if (t == null) throw new PlistParseError('unexpected end of document')
    return t
  }
  const expect = (tag: string): void => {
    const t = next()
    if (t !== tag) throw new PlistParseError(`expected ${tag}, got ${t}`)
  }
  const text = (tag: string): string => {
    let t = next()
    let body = ''
    if (!t.startsWith('<')) {
      if (/[<&](?!(amp|lt|gt|quot|apos);)/.test(t)) throw new PlistParseError(`bad character data: ${t}`)
      body = t
        .replaceAll('&lt;', '<')
        .replaceAll('&gt;', '>')
        .replaceAll('&quot;', '"')
        .replaceAll('&apos;', "'")
        .replaceAll('&amp;', '&')
      t = next()
    }
    if (t !== `</${tag}>`) throw new PlistParseError(`expected </${tag}>, got ${t}`)
    return body
  }
  const value = (): PlistValue => {
    const t = next()
    if (t === '<string>') return text('string')
    if (t === '<string/>') return ''
    if (t === '<true/>') return true
    if (t === '<false/>') return false
    if (t === '<integer>') {
      const n = text('integer')
      if (!/^-?\d+$/.test(n)) throw new PlistParseError(`not an integer: ${n}`)
      return Number(n)
    }
    if (t === '<array>') {
      const items: PlistValue[] = []
      while (tokens[i] !== '</array>') items.push(value())
      i++
      return items
    }
    if (t === '<dict>') {
      const dict: Record<string, PlistValue> = {}
      while (tokens[i] !== '</dict>') {
        expect('<key>')
        const key = text('key')
        if (key in dict) throw new PlistParseError(`duplicate key ${key}`)
        dict[key] = value()
      }
      i++
      return dict
    }
    throw new PlistParseError(`unexpected ${t}`)
  }
  expect('<plist version="1.0">')
  const root = value()
  expect('</plist>')
  if (i !== tokens.length) throw new PlistParseError(`trailing content: ${tokens[i]}`)
  return root
}

interface Run {
  code: number
  stdout: string
  stderr: string
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve) => {
    execFile('bash', [file, ...args], { env, timeout: installTimeoutMs }, (err, stdout, stderr) => {
      resolve({ code: err == null ? 0 : Number((err as { code?: number }).code ?? 1), stdout, stderr })
    })
  })
}

/** Every file (not directory) under dir, relative to it. */
async function filesUnder(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => [])
  return entries
    .filter((e) => !e.isDirectory())
    .map((e) => join(e.parentPath, e.name).slice(dir.length + 1))
    .sort()
}

describe('installer/macos', () => {
  let root: string
  let home: string
  let env: NodeJS.ProcessEnv
  let uid: string

  const plistPath = (): string => join(home, 'Library/LaunchAgents/net.garage.node.plist')
  const appDir = (): string => join(home, '.local/lib/garage')
  const launcher = (): string => join(home, '.local/bin/garage')
  const dataDir = (): string => join(home, 'Library/Application Support/Garage')
  const logFile = (): string => join(home, 'Library/Logs/Garage/node.log')
  const calls = async (tool: string): Promise<string[]> =>
    (await readFile(join(root, `${tool}.log`), 'utf8').catch(() => '')).split('\n').filter((l) => l !== '')

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'garage-macos-'))
    home = join(root, 'home')
    const fakes = join(root, 'fakes')
    await mkdir(home)
    await mkdir(fakes)
    const tool = async (name: string, body: string): Promise<void> => {
      await writeFile(join(fakes, name), `#!/bin/sh\n${body}\n`)
      await chmod(join(fakes, name), 0o755)
    }
    await tool('uname', 'case "$1" in -m) echo arm64 ;; *) echo Darwin ;; esac')
    // launchctl: records argv; bootout fails like the real one when nothing is loaded.
    await tool(
      'launchctl',
      `printf '%s\\n' "$*" >> '${root}/launchctl.log'
case "$1" in
  bootstrap) touch '${root}/loaded' ;;
  bootout) [ -e '${root}/loaded' ] || { echo "Boot-out failed: 3: No such process" >&2; exit 3; }; rm -f '${root}/loaded' ;;
esac`,
    )
    await tool('plutil', `printf '%s\\n' "$*" >> '${root}/plutil.log'`)
    uid = String(process.getuid?.() ?? 0)
    env = { HOME: home, PATH: `${fakes}:${process.env.PATH}`, LANG: 'C.UTF-8', GARAGE_LOG_LEVEL: 'warn' }
  })

  afterAll(async () => {
    if (root != null) await rm(root, { recursive: true, force: true })
  })

  it(
    'installs the app, renders and bootstraps the agent, runs doctor, and uninstalls without a trace',
    async () => {
      const authority = '12D3KooWAuthorityAuthorityAuthorityAuthorityAuthority'
      const first = await run(
        installScript,
        [
          '--authority',
          authority,
          '--bootstrap',
          '/dns4/eu.example.net/tcp/4001/p2p/A&B',
          '--region',
          'eu-north',
        ],
        env,
      )
      expect(first.stderr + first.stdout).toContain('Wrote the launchd agent')
      expect(first.code).toBe(0)
      // garage doctor ran from the installed copy and said whether this machine can serve.
      expect(first.stdout).toMatch(/Checking this Mac \(garage doctor\):[\s\S]*(can serve|cannot serve)/)

      // The agent: a valid plist with what launchd needs, absolute paths into the install.
      const plist = parsePlist(await readFile(plistPath(), 'utf8')) as Record<string, PlistValue>
      expect(plist.Label).toBe('net.garage.node')
      expect(plist.ProgramArguments).toEqual([
        join(appDir(), 'node/bin/node'),
        join(appDir(), 'bin/garage.js'),
        'node',
        '--data-dir',
        dataDir(),
        '--authority',
        authority,
        '--bootstrap',
        '/dns4/eu.example.net/tcp/4001/p2p/A&B',
        '--region',
        'eu-north',
      ])
      expect(plist.RunAtLoad).toBe(true)
      expect(plist.KeepAlive).toEqual({ SuccessfulExit: false })
      expect(plist.ProcessType).toBe('Background')
      expect(plist.LowPriorityIO).toBe(true)
      expect(plist.StandardOutPath).toBe(logFile())
      expect(plist.StandardErrorPath).toBe(logFile())
      expect(plist.WorkingDirectory).toBe(dataDir())
      expect(plist.ExitTimeOut).toBe(35)
      const agentEnv = plist.EnvironmentVariables as Record<string, string>
      expect(agentEnv.GARAGE_DATA_DIR).toBe(dataDir())
      expect(agentEnv.NODE_OPTIONS).toBe(daemonNodeOptions)
      expect(agentEnv.PATH?.split(':')).toContain('/opt/homebrew/bin')
      // Every program argument that is a path exists in the install.
      for (const arg of (plist.ProgramArguments as string[]).slice(0, 2))
        await expect(stat(arg)).resolves.toBeTruthy()
      expect((await stat(dataDir())).mode & 0o777).toBe(0o700)
      await expect(stat(join(home, 'Library/Logs/Garage'))).resolves.toBeTruthy()

      expect(await calls('plutil')).toEqual([`-lint ${plistPath()}`])
      expect(await calls('launchctl')).toEqual([
        `bootout gui/${uid}/net.garage.node`,
        `enable gui/${uid}/net.garage.node`,
        `bootstrap gui/${uid} ${plistPath()}`,
      ])

      // The launcher runs the installed copy and finds the agent's data dir by itself.
      const version = await new Promise<string>((resolve, reject) =>
        execFile(launcher(), ['--version'], { env }, (err, out) =>
          err != null ? reject(err) : resolve(out),
        ),
      )
      expect(version).toMatch(/^garage \d+\.\d+\.\d+ \(node v22\./)
      const status = await new Promise<string>((resolve) =>
        execFile(launcher(), ['status'], { env }, (_err, _out, err) => resolve(err)),
      )
      expect(status).toContain(`no control.json in ${dataDir()}`)

      // A user's data survives a reinstall that changes the bootstrap node; the agent is reloaded.
      await writeFile(join(dataDir(), 'identity.key'), 'not a real key', { mode: 0o600 })
      const second = await run(
        installScript,
        ['--authority', authority, '--bootstrap', '/ip4/1.2.3.4/tcp/4001'],
        env,
      )
      expect(second.code).toBe(0)
      const args = (parsePlist(await readFile(plistPath(), 'utf8')) as Record<string, PlistValue>)
        .ProgramArguments as string[]
      expect(args.slice(5)).toEqual(['--authority', authority, '--bootstrap', '/ip4/1.2.3.4/tcp/4001'])
      expect((await calls('launchctl')).slice(3)).toEqual([
        `bootout gui/${uid}/net.garage.node`,
        `enable gui/${uid}/net.garage.node`,
        `bootstrap gui/${uid} ${plistPath()}`,
      ])
      expect(await readFile(join(dataDir(), 'identity.key'), 'utf8')).toBe('not a real key')
      await writeFile(logFile(), '{"msg":"a log line"}\n')

      // Uninstall: the agent is booted out, everything but the data and the log is gone.
      const removed = await run(uninstallScript, [], env)
      expect(removed.code).toBe(0)
      expect((await calls('launchctl')).at(-1)).toBe(`bootout gui/${uid}/net.garage.node`)
      expect(await filesUnder(home)).toEqual([
        'Library/Application Support/Garage/identity.key',
        'Library/Logs/Garage/node.log',
      ])

      // --purge: not one file left in HOME.
      const purged = await run(uninstallScript, ['--purge'], env)
      expect(purged.code).toBe(0)
      expect(await filesUnder(home)).toEqual([])
      await expect(stat(dataDir())).rejects.toThrow()
    },
    installTimeoutMs * 3,
  )

  it(
    'without an authority installs the app but writes no agent that would fail at every login',
    async () => {
      const result = await run(installScript, [], env)
      expect(result.code).toBe(0)
      expect(result.stdout).toContain('not set up to run')
      await expect(stat(plistPath())).rejects.toThrow()
      await expect(stat(join(appDir(), 'bin/garage.js'))).resolves.toBeTruthy()
      const removed = await run(uninstallScript, ['--purge'], env)
      expect(removed.code).toBe(0)
      expect(await filesUnder(home)).toEqual([])
    },
    installTimeoutMs * 2,
  )
})
