import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { beforeAll, describe, expect, it } from 'vitest'
import { commands } from '../../cli/main.ts'

/**
 * The user docs name commands and flags; each must exist in that command's usage text, so the docs
 * cannot drift from the CLI. Commands are read from code (fenced blocks and `inline code`), where
 * `garage <command> [subcommand] --flag...` runs until a shell separator or comment. The
 * installer scripts' flags are checked against their --help the same way.
 */

const repo = fileURLToPath(new URL('../../', import.meta.url))
const docs = ['docs/install.md', 'docs/coordinator.md', 'docs/api.md']

interface Invocation {
  doc: string
  command: string
  flags: string[]
  text: string
}

/** The code in a Markdown file: fenced blocks (with `\` continuations joined) and inline spans. */
function codeSegments(markdown: string): string[] {
  const segments: string[] = []
  const fenced = /^```[^\n]*\n([\s\S]*?)^```/gm
  for (const m of markdown.matchAll(fenced))
    segments.push(...(m[1] as string).replace(/\\\n\s*/g, ' ').split('\n'))
  const prose = markdown.replace(fenced, '')
  for (const m of prose.matchAll(/`([^`\n]+)`/g)) segments.push(m[1] as string)
  return segments
}

// Where a command's own arguments end in a line of shell.
const separators = new Set(['|', '||', '&&', ';', '#', '>', '2>&1', ')'])
// The service units' settings in garage.env are argument lists of these commands.
const envArgs: Record<string, string> = {
  GARAGE_NODE_ARGS: 'node',
  GARAGE_BOOTSTRAP_ARGS: 'bootstrap',
  GARAGE_FEDERATION_ARGS: 'federation',
}

function invocations(doc: string, markdown: string): Invocation[] {
  const found: Invocation[] = []
  for (const segment of codeSegments(markdown)) {
    const tokens = segment
      .replace(/\\\|/g, '|')
      .split(/\s+/)
      .filter((t) => t !== '')
    for (let i = 0; i < tokens.length; i++) {
      const token = tokens[i] as string
      let command: string | undefined
      let start = i + 1
      const env = /^(GARAGE_[A-Z]+_ARGS)=(.*)$/.exec(token)
      if (env != null && envArgs[env[1] as string] != null) {
        command = envArgs[env[1] as string]
        tokens[i] = env[2] as string
        start = i
      } else if (
        /(^|[/\\"&(])garage(\.cmd)?"?$/.test(token) &&
        tokens[i + 1] != null &&
        tokens[i + 1] !== 'garage' &&
        // `createuser -P garage && ...`: a database role named garage, not the command.
        !/^-[A-Za-z]$/.test(tokens[i - 1] ?? '')
      ) {
        command = (tokens[i + 1] as string).replace(/[`"'),.]+$/, '')
        start = i + 2
      }
      if (command == null) continue
      const flags: string[] = []
      for (let j = start; j < tokens.length; j++) {
        const t = (tokens[j] as string).replace(/^[[(]+/, '')
        if (separators.has(t) || t.startsWith('#')) break
        const flag = /^(--[a-z][a-z0-9-]*)/.exec(t)?.[1]
        if (flag != null) flags.push(flag)
      }
      found.push({ doc, command, flags, text: segment.trim() })
    }
  }
  return found
}

/** The flags a usage text documents: --name followed by something that is not a letter. */
function usageFlags(usage: string): Set<string> {
  return new Set([...usage.matchAll(/(--[a-z][a-z0-9-]*)(?![a-z0-9-])/g)].map((m) => m[1] as string))
}

describe('the user docs agree with the CLI', () => {
  let all: Invocation[]
  const usages = new Map<string, Set<string>>()

  beforeAll(async () => {
    all = []
    for (const doc of docs) all.push(...invocations(doc, await readFile(join(repo, doc), 'utf8')))
    for (const [name, spec] of Object.entries(commands))
      usages.set(name, usageFlags((await spec.load()).usage))
  })

  it('find plenty of garage commands in the docs', () => {
    for (const doc of docs) expect(all.filter((i) => i.doc === doc).length, doc).toBeGreaterThan(0)
    expect(all.length).toBeGreaterThan(40)
    const used = new Set(all.map((i) => i.command))
    for (const c of ['authority', 'bootstrap', 'federation', 'keys', 'id', 'doctor', 'pause', 'status'])
      expect(used, c).toContain(c)
  })

  it('name only commands that exist', () => {
    const unknown = all.filter((i) => !usages.has(i.command) && i.command !== '--version')
    expect(unknown.map((i) => `${i.doc}: ${i.text}`)).toEqual([])
  })

  it("give each command only flags from that command's usage", () => {
    const wrong = all.flatMap((i) =>
      i.command === '--version'
        ? []
        : i.flags
            .filter((f) => f !== '--help' && !(usages.get(i.command)?.has(f) ?? false))
            .map((f) => `${i.doc}: garage ${i.command} ${f} in: ${i.text}`),
    )
    expect(wrong).toEqual([])
  })

  it('catch a flag that does not exist (the check is not blind)', () => {
    const broken = invocations(
      'x.md',
      '```sh\ngarage node --authority A --vram-limit 8000 # a comment --nope\n```\n',
    )
    expect(broken).toEqual([
      { doc: 'x.md', command: 'node', flags: ['--authority', '--vram-limit'], text: expect.any(String) },
    ])
    expect(usages.get('node')?.has('--vram-limit')).toBe(false)
    const env = invocations('x.md', '`GARAGE_FEDERATION_ARGS=--authority A --http 127.0.0.1:8080`')
    expect(env.map((i) => [i.command, i.flags])).toEqual([['federation', ['--authority', '--http']]])
  })

  it('give the installer scripts only flags from their --help', async () => {
    const scripts = [
      'installer/linux/install.sh',
      'installer/linux/uninstall.sh',
      'installer/macos/install.sh',
      'installer/macos/uninstall.sh',
    ]
    const wrong: string[] = []
    for (const doc of docs) {
      const markdown = await readFile(join(repo, doc), 'utf8')
      for (const segment of codeSegments(markdown)) {
        for (const script of scripts) {
          const name = script.split('/').slice(-2).join('/')
          const at = segment.indexOf(name)
          if (at < 0) continue
          const help = await readFile(join(repo, script), 'utf8')
          const rest = segment.slice(at + name.length).split(/\s[|;#]|&&/)[0] as string
          for (const flag of rest.match(/--[a-z][a-z0-9-]*/g) ?? [])
            if (!usageFlags(help).has(flag)) wrong.push(`${doc}: ${name} ${flag}`)
        }
      }
    }
    expect(wrong).toEqual([])
  })

  it('write no flag that neither a garage command, an installer script nor the named tool has', async () => {
    const known = new Set<string>()
    for (const flags of usages.values()) for (const f of flags) known.add(f)
    for (const script of [
      'installer/linux/install.sh',
      'installer/linux/uninstall.sh',
      'installer/macos/install.sh',
      'installer/macos/uninstall.sh',
    ])
      for (const f of usageFlags(await readFile(join(repo, script), 'utf8'))) known.add(f)
    // Other programs the docs tell people to run, with the flags they use.
    const otherTools: Record<string, string[]> = {
      systemctl: ['--user', '--now'],
      journalctl: ['--user'],
      'electron-builder': ['--config', '--win', '--mac', '--linux'],
      wsl: ['--install', '--status'],
      winget: ['--id'],
      launchctl: [],
      vllm: ['--runner', '--distributed-executor-backend'],
      kubectl: ['--from-file', '--from-literal', '--dry-run'],
    }
    for (const flags of Object.values(otherTools)) for (const f of flags) known.add(f)
    const unknown: string[] = []
    for (const doc of docs)
      for (const segment of codeSegments(await readFile(join(repo, doc), 'utf8')))
        for (const flag of segment.match(/(?<![\w-])--[a-z][a-z0-9-]*/g) ?? [])
          if (!known.has(flag)) unknown.push(`${doc}: ${flag} in: ${segment.trim()}`)
    expect(unknown).toEqual([])
  })

  it('link only to files that exist', async () => {
    const missing: string[] = []
    for (const doc of docs) {
      const markdown = await readFile(join(repo, doc), 'utf8')
      for (const m of markdown.matchAll(/\]\(([^)#\s]+)(#[^)]*)?\)/g)) {
        const target = m[1] as string
        if (/^[a-z]+:/.test(target)) continue
        if (!existsSync(join(repo, dirname(doc), target))) missing.push(`${doc}: ${target}`)
      }
    }
    expect(missing).toEqual([])
  })
})
