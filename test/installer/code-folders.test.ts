import { readFile } from 'node:fs/promises'
import { describe, expect, it } from 'vitest'
import { allowedImports } from '../architecture/imports.ts'

const read = (path: string): Promise<string> => readFile(new URL(`../../${path}`, import.meta.url), 'utf8')

/** Every folder whose code runs on a user's machine: the import rules name them all. */
const runtimeFolders = Object.keys(allowedImports)
  .filter((f) => f !== 'tray-app')
  .sort()

describe('every installer packs every folder of runtime code', () => {
  it('the Linux installer and the .deb (prod-files.mjs)', async () => {
    const text = await read('installer/linux/lib/prod-files.mjs')
    const list = /const codeDirs = \[([^\]]*)\]/.exec(text)?.[1] ?? ''
    expect([...list.matchAll(/'([^']+)'/g)].map((m) => m[1]).sort()).toEqual(runtimeFolders)
  })

  it('the macOS installer', async () => {
    const text = await read('installer/macos/install.sh')
    const list = /for dir in ([a-z -]+); do/.exec(text)?.[1] ?? ''
    expect(list.trim().split(/\s+/).sort()).toEqual(runtimeFolders)
  })

  it("the tray app's packages (electron-builder.yml), with the tray itself", async () => {
    const text = await read('installer/electron-builder.yml')
    const globs = [...text.matchAll(/^ {2}- ([a-z-]+)\/\*\*$/gm)].map((m) => m[1]).sort()
    expect(globs).toEqual([...runtimeFolders, 'tray-app'].sort())
  })
})
