import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { beforeAll, describe, expect, it } from 'vitest'

/**
 * installer/windows/check-prereqs.ps1 cannot run here (no PowerShell on Debian): these checks read
 * it as text. They keep its numbers equal to daemon/hardware's, make sure every problem it can
 * report has a fix, that only an unsupported Windows stops a node, and that Windows PowerShell 5.1
 * can read it (ASCII: 5.1 reads a file without a BOM in the ANSI code page).
 */

const repo = fileURLToPath(new URL('../../', import.meta.url))
const scriptFile = join(repo, 'installer/windows/check-prereqs.ps1')

interface AdviceEntry {
  problem: string
  fix: string[]
  limits: string[]
}

/** The $Advice table: 'id' = @{ Problem = '...'; Fix = @('...', ...); Limits = @('...') }. */
function adviceTable(script: string): Map<string, AdviceEntry> {
  const body = /\n\$Advice = @\{\n([\s\S]*?)\n\}\n/.exec(script)?.[1]
  if (body == null) throw new Error('no $Advice table')
  const strings = (text: string): string[] =>
    [...text.matchAll(/'((?:[^']|'')*)'|"([^"]*)"/g)].map((m) => (m[1] ?? m[2] ?? '').replaceAll("''", "'"))
  const table = new Map<string, AdviceEntry>()
  for (const m of body.matchAll(/^ {2}'([a-z0-9-]+)'\s*= @\{\n([\s\S]*?)\n {2}\}/gm)) {
    const entry = m[2] as string
    const field = (name: string): string => new RegExp(`^\\s*${name}\\s*= (.*)$`, 'm').exec(entry)?.[1] ?? ''
    table.set(m[1] as string, {
      problem: strings(field('Problem'))[0] ?? '',
      fix: strings(field('Fix')),
      limits: strings(field('Limits')),
    })
  }
  return table
}

/**
 * Brackets balance, read the way PowerShell reads them: comments, '...' strings, "..." strings
 * (with `-escapes and $( ) subexpressions, which hold code again) and here-strings are followed.
 * Returns null, or what is wrong and where.
 */
function unbalancedBrackets(script: string): string | null {
  const pairs: Record<string, string> = { ')': '(', '}': '{', ']': '[' }
  let i = 0
  const where = (): string => `line ${script.slice(0, i).split('\n').length}`
  // Code until the ")" that closes a $( ... ) when `inSubexpression`, else to the end.
  const code = (inSubexpression: boolean): string | null => {
    const stack: string[] = []
    while (i < script.length) {
      const c = script[i] as string
      const two = script.slice(i, i + 2)
      if (two === '<#') {
        const end = script.indexOf('#>', i + 2)
        if (end < 0) return `unclosed <# at ${where()}`
        i = end + 2
      } else if (c === '#') {
        while (i < script.length && script[i] !== '\n') i++
      } else if (two === "@'" || two === '@"') {
        const end = script.indexOf(`\n${two[1]}@`, i + 2)
        if (end < 0) return `unclosed here-string at ${where()}`
        i = end + 3
      } else if (c === "'") {
        i++
        while (i < script.length && !(script[i] === "'" && script[i + 1] !== "'"))
          i += script[i] === "'" ? 2 : 1
        if (i >= script.length) return 'unclosed single-quoted string'
        i++
      } else if (c === '"') {
        i++
        for (;;) {
          if (i >= script.length) return 'unclosed double-quoted string'
          const d = script[i] as string
          if (d === '`') i += 2
          else if (script.slice(i, i + 2) === '""') i += 2
          else if (d === '"') break
          else if (script.slice(i, i + 2) === '$(') {
            i += 2
            const inner = code(true)
            if (inner != null) return inner
          } else i++
        }
        i++
      } else if (c === '`') {
        i += 2
      } else if ('({['.includes(c)) {
        stack.push(c)
        i++
      } else if (c in pairs) {
        if (inSubexpression && c === ')' && stack.length === 0) {
          i++
          return null
        }
        if (stack.pop() !== pairs[c]) return `unmatched ${c} at ${where()}`
        i++
      } else i++
    }
    if (inSubexpression) return 'unclosed $( subexpression'
    return stack.length === 0 ? null : `${stack.length} unclosed bracket(s)`
  }
  return code(false)
}

describe('installer/windows/check-prereqs.ps1', () => {
  let script: string
  let advice: Map<string, AdviceEntry>
  let adviceTs: string

  beforeAll(async () => {
    script = await readFile(scriptFile, 'latin1')
    advice = adviceTable(script)
    adviceTs = await readFile(join(repo, 'daemon/hardware/advice.ts'), 'utf8')
  })

  it('is ASCII, so Windows PowerShell 5.1 reads it right without a BOM', () => {
    expect(script).toMatch(/^[\x20-\x7e\r\n]*$/)
  })

  it('asks for the NVIDIA driver and free disk that garage doctor asks for', () => {
    const driver = /NVIDIA driver package \((\d+) or newer\)/.exec(adviceTs)?.[1]
    expect(driver).toBeDefined()
    expect(script).toContain(`\n$MinNvidiaDriverMajor = ${driver}\n`)
    const diskMiB = /const minFreeDiskMiB = (\d+) \* 1024\n/.exec(adviceTs)?.[1]
    expect(diskMiB).toBeDefined()
    expect(script).toContain(`\n$MinFreeDiskGiB = ${diskMiB}\n`)
  })

  it('gives every problem it can report a message, a fix and what it limits', () => {
    expect(advice.size).toBeGreaterThanOrEqual(10)
    for (const [id, entry] of advice) {
      expect(entry.problem.length, id).toBeGreaterThan(20)
      expect(entry.fix.length, id).toBeGreaterThan(0)
      for (const step of entry.fix) expect(step.length, id).toBeGreaterThan(10)
      expect(entry.limits.length, id).toBeGreaterThan(0)
    }
    // Every id a check reports is in the table, and every entry is reported by some check.
    const used = new Set(
      [...script.matchAll(/Add-Check '[a-z0-9-]+' '\w+' [^\n]*? '([a-z0-9-]+)'\s*(?:;|\}|$)/gm)].map(
        (m) => m[1],
      ),
    )
    expect([...used].filter((id) => id != null && !advice.has(id))).toEqual([])
    expect([...advice.keys()].filter((id) => !used.has(id))).toEqual([])
  })

  it('checks the driver, WSL2, Podman or Docker Desktop and virtualization with the real tools', () => {
    expect(script).toContain("'--query-gpu=driver_version,name', '--format=csv,noheader'")
    expect(script).toContain("Find-SystemTool 'nvidia-smi.exe'")
    expect(script).toContain("@('--list', '--verbose')")
    expect(script).toContain("@('--status')")
    expect(script).toContain("File = 'podman.exe'; Args = @('version')")
    expect(script).toContain("File = 'docker.exe'; Args = @('version'")
    expect(script).toContain('VirtualizationFirmwareEnabled')
    expect(script).toContain('HypervisorPresent')
    // Each missing piece names the exact command that fixes it.
    expect(advice.get('wsl-missing')?.fix.join(' ')).toContain('wsl --install')
    expect(advice.get('containers-missing')?.fix.join(' ')).toContain('winget install -e --id RedHat.Podman')
    expect(advice.get('containers-missing')?.fix.join(' ')).toContain(
      'winget install -e --id Docker.DockerDesktop',
    )
    expect(advice.get('container-engine-stopped')?.fix.join(' ')).toContain('podman machine start')
    expect(advice.get('nvidia-driver-old')?.problem).toContain('older than $MinNvidiaDriverMajor')
  })

  it('stops a node only for an unsupported Windows: GPU, WSL2 and containers only limit engines', () => {
    const blockers = [...script.matchAll(/Add-Check '([a-z0-9-]+)' 'blocker'/g)].map((m) => m[1])
    expect(new Set(blockers)).toEqual(new Set(['windows']))
    for (const [id, entry] of advice) {
      if (id.startsWith('windows-')) expect(entry.limits.join()).toContain('no engine can run')
      else expect(entry.limits.join(), id).not.toContain('no engine')
    }
    expect(script).toContain('$canServe = $blockers.Count -eq 0')
    expect(script).toMatch(/if \(\$canServe\) \{ exit 0 \} else \{ exit 1 \}\n$/)
  })

  it('has a -Json switch that prints one document with a schema name', () => {
    expect(script).toContain('param([switch]$Json)')
    expect(script).toContain("schema = 'garage.prereqs/v1'")
    expect(script).toContain('ConvertTo-Json -InputObject $doc')
  })

  it('is well-formed enough to parse: brackets balance and every function it calls is defined', () => {
    expect(unbalancedBrackets(script)).toBeNull()
    // The reader is not blind: one brace less, or a string left open, is caught.
    expect(
      unbalancedBrackets(script.replace('catch { return $null }', 'catch { return $null')),
    ).not.toBeNull()
    expect(unbalancedBrackets(script.replace("'nvidia-smi failed'", "'nvidia-smi failed"))).not.toBeNull()
    const defined = new Set([...script.matchAll(/^function ([\w-]+)/gm)].map((m) => m[1]))
    const called = [...script.matchAll(/\b((?:Add|Invoke|Find|Test)-[A-Z][\w]*)\b/g)].map((m) => m[1])
    const builtins = new Set(['Test-Path'])
    expect(called.filter((c) => c != null && !defined.has(c) && !builtins.has(c))).toEqual([])
  })
})
