import { readFile } from 'node:fs/promises'
import { dirname, join, normalize, relative, sep } from 'node:path'
import ts from 'typescript'

/**
 * Which top-level folder may import which: shared folders never import a role folder, role folders
 * never import each other, and only the composition roots (cli/, tray-app/) reach into roles.
 * docs/architecture.md draws the same picture. Folders not listed (test/, bench/, installer/) may
 * import anything.
 */
export const allowedImports: Readonly<Record<string, readonly string[]>> = {
  // shared
  core: [],
  containers: ['core'],
  mesh: ['core'],
  routing: ['core', 'mesh'],
  openai: ['core', 'mesh'],
  // roles
  daemon: ['core', 'containers', 'mesh', 'routing', 'openai'],
  bootstrap: ['core', 'containers', 'mesh', 'routing', 'openai'],
  federation: ['core', 'containers', 'mesh', 'routing', 'openai'],
  // composition
  cli: ['core', 'containers', 'mesh', 'routing', 'openai', 'daemon', 'bootstrap', 'federation'],
  'tray-app': ['core', 'containers', 'mesh', 'routing', 'openai', 'daemon'],
  bin: ['cli'],
}

export interface ImportViolation {
  file: string
  imports: string
  /** e.g. "mesh may not import daemon" */
  rule: string
}

/** Relative import specifiers of a source text: static, dynamic, type-only and re-exports. */
export function relativeImports(source: string): string[] {
  const info = ts.preProcessFile(source, true, true)
  return info.importedFiles.map((f) => f.fileName).filter((name) => name.startsWith('.'))
}

function topFolder(path: string): string {
  return path.split(/[\\/]/)[0]!
}

/**
 * The imports in `files` (repo-relative path → source) that cross folders against allowedImports.
 * Resolved paths that leave the repo are ignored.
 */
export function importViolations(
  files: ReadonlyMap<string, string>,
  rules: Readonly<Record<string, readonly string[]>> = allowedImports,
): ImportViolation[] {
  const out: ImportViolation[] = []
  for (const [file, source] of files) {
    const from = topFolder(file)
    const allowed = rules[from]
    if (allowed == null) continue
    for (const spec of relativeImports(source)) {
      const target = normalize(join(dirname(file), spec))
      if (target.startsWith('..')) continue
      const to = topFolder(target)
      if (to === from || !(to in rules) || allowed.includes(to)) continue
      out.push({ file, imports: target.split(sep).join('/'), rule: `${from} may not import ${to}` })
    }
  }
  return out
}

/** Reads the files git tracks (and new ones it would track) under `root`. */
export async function readSources(root: string, paths: string[]): Promise<Map<string, string>> {
  const files = new Map<string, string>()
  for (const path of paths) {
    if (!/\.(c|m)?(t|j)s$/.test(path)) continue
    files.set(relative(root, join(root, path)), await readFile(join(root, path), 'utf8'))
  }
  return files
}
