import { execFile } from 'node:child_process'
import { open, readdir } from 'node:fs/promises'
import { join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'
import { describe, expect, it } from 'vitest'

const repo = fileURLToPath(new URL('../../', import.meta.url))
// Not the project's scripts: dependencies, build output, git's own hooks.
const skippedDirs = new Set(['node_modules', '.git', 'dist', 'test-artifacts'])
const shebang = /^#!\s*(?:\/usr\/bin\/env\s+)?(?:\/bin\/|\/usr\/bin\/)?(?:sh|bash|dash)\b/

async function startsWithShellShebang(path: string): Promise<boolean> {
  const file = await open(path, 'r')
  try {
    const { buffer, bytesRead } = await file.read(Buffer.alloc(64), 0, 64, 0)
    return shebang.test(buffer.subarray(0, bytesRead).toString('latin1'))
  } finally {
    await file.close()
  }
}

/** Every shell script in the repo: *.sh files and files with a sh or bash #! line. */
async function shellScripts(dir: string): Promise<string[]> {
  const found: string[] = []
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name)
    if (entry.isDirectory()) {
      if (!skippedDirs.has(entry.name)) found.push(...(await shellScripts(path)))
    } else if (entry.isFile() && (entry.name.endsWith('.sh') || (await startsWithShellShebang(path)))) {
      found.push(path)
    }
  }
  return found
}

describe('shell scripts', () => {
  it('shellcheck passes on every shell script in the repo', async () => {
    const scripts = (await shellScripts(repo)).map((p) => relative(repo, p)).sort()
    // The finder must see the scripts we know of, or an empty list would pass.
    expect(scripts).toEqual(
      expect.arrayContaining([
        '.ci/run',
        'installer/linux/build-deb.sh',
        'installer/linux/debian/postinst',
        'installer/linux/debian/postrm',
        'installer/linux/debian/prerm',
        'installer/linux/install.sh',
        'installer/linux/render-unit.sh',
        'installer/linux/uninstall.sh',
      ]),
    )
    const result = await new Promise<{ code: number; output: string }>((resolve) => {
      execFile(
        'shellcheck',
        ['--external-sources', ...scripts],
        { cwd: repo, timeout: 60_000, maxBuffer: 16 * 1024 * 1024 },
        (err, stdout, stderr) => {
          const code = err == null ? 0 : (err as { code?: number | string }).code
          if (code === 'ENOENT') {
            resolve({ code: 127, output: 'shellcheck is not installed: apt-get install shellcheck' })
            return
          }
          resolve({ code: Number(code ?? 1), output: `${stdout}${stderr}` })
        },
      )
    })
    expect(result.output, `shellcheck on ${scripts.join(' ')}`).toBe('')
    expect(result.code).toBe(0)
  })
})
