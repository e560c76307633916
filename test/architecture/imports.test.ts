import { execFileSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { describe, expect, it } from 'vitest'
import { allowedImports, importViolations, readSources, relativeImports } from './imports.ts'

const root = fileURLToPath(new URL('../../', import.meta.url))

describe('import directions (docs/architecture.md)', () => {
  it('no shared folder imports a role, no role imports another, only cli/ and tray-app/ compose', async () => {
    const tracked = execFileSync('git', ['ls-files', '--cached', '--others', '--exclude-standard'], {
      cwd: root,
      encoding: 'utf8',
    })
      .split('\n')
      .filter((p) => p !== '')
    const files = await readSources(root, tracked)
    expect(files.size).toBeGreaterThan(150)
    expect(importViolations(files)).toEqual([])
  })

  it('fails on a planted violation, whatever form the import takes', () => {
    const planted = new Map([
      ['mesh/planted.ts', "import { NodeDaemon } from '../daemon/node-daemon.ts'\n"],
      ['core/planted.ts', "export { ApiKeyStore } from '../federation/keys.ts'\n"],
      ['daemon/planted.ts', "const m = await import('../bootstrap/head/head.ts')\n"],
      ['federation/planted.ts', "import type { NodeStatus } from '../daemon/control/types.ts'\n"],
      ['tray-app/planted.ts', "import { run } from '../cli/main.ts'\n"],
      ['openai/fine.ts', "import { apiError } from '../core/errors.ts'\nimport x from 'node:fs'\n"],
    ])
    expect(importViolations(planted)).toEqual([
      { file: 'mesh/planted.ts', imports: 'daemon/node-daemon.ts', rule: 'mesh may not import daemon' },
      { file: 'core/planted.ts', imports: 'federation/keys.ts', rule: 'core may not import federation' },
      {
        file: 'daemon/planted.ts',
        imports: 'bootstrap/head/head.ts',
        rule: 'daemon may not import bootstrap',
      },
      {
        file: 'federation/planted.ts',
        imports: 'daemon/control/types.ts',
        rule: 'federation may not import daemon',
      },
      { file: 'tray-app/planted.ts', imports: 'cli/main.ts', rule: 'tray-app may not import cli' },
    ])
  })

  it('reads every kind of import', () => {
    expect(
      relativeImports(
        "import a from './a.ts'\nimport type { B } from '../b.ts'\nexport * from './c.ts'\nawait import('./d.ts')\nimport 'e'\n",
      ),
    ).toEqual(['./a.ts', '../b.ts', './c.ts', './d.ts'])
  })

  it('the shared folders form no cycle', () => {
    const shared = ['core', 'containers', 'mesh', 'routing', 'openai']
    const seen = new Set<string>()
    const visit = (folder: string, path: string[]): void => {
      expect(path, `cycle through ${folder}`).not.toContain(folder)
      if (seen.has(folder)) return
      for (const next of allowedImports[folder] ?? []) visit(next, [...path, folder])
      seen.add(folder)
    }
    for (const folder of shared) visit(folder, [])
  })
})
