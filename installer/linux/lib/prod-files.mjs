// Lists what install.sh copies: Garage's runtime code and the production dependencies that
// `npm ls --omit=dev` would name, read from package-lock.json alone so no npm is needed (the bundled
// Node runs this). Prints NUL-terminated paths relative to the source tree, directories before
// their contents, for `tar --null --no-recursion -T -`.
//
// Usage: node prod-files.mjs SOURCE_DIR [--no-gpu-backends]
import { readdirSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'

const codeDirs = [
  'bin',
  'cli',
  'core',
  'containers',
  'mesh',
  'routing',
  'openai',
  'bootstrap',
  'daemon',
  'federation',
]
// node-llama-cpp's prebuilt llama.cpp back-ends: the plain one is the CPU build, the others GPU builds.
const llamaScope = 'node_modules/@node-llama-cpp/'
// node-llama-cpp names its 32-bit ARM packages after the machine, not Node's `arm`.
const llamaArch = process.arch === 'arm' ? 'armv7l' : process.arch

const [source, ...flags] = process.argv.slice(2)
if (source == null || flags.some((f) => f !== '--no-gpu-backends')) {
  process.stderr.write('usage: prod-files.mjs SOURCE_DIR [--no-gpu-backends]\n')
  process.exit(2)
}
const withGpuBackends = !flags.includes('--no-gpu-backends')

/** npm's os/cpu fields: a list of allowed values, or of `!value` exclusions. */
function allows(list, value) {
  if (!Array.isArray(list) || list.length === 0) return true
  const excluded = list.filter((v) => v.startsWith('!')).map((v) => v.slice(1))
  const allowed = list.filter((v) => !v.startsWith('!'))
  return !excluded.includes(value) && (allowed.length === 0 || allowed.includes(value))
}

function wanted(path, entry) {
  if (entry.dev === true) return false
  if (!allows(entry.os, process.platform) || !allows(entry.cpu, process.arch)) return false
  if (path.startsWith(llamaScope)) {
    const name = path.slice(llamaScope.length)
    if (name === `linux-${llamaArch}`) return true
    return withGpuBackends && name.startsWith(`linux-${llamaArch}-`)
  }
  return true
}

function exists(path) {
  try {
    return statSync(join(source, path)).isDirectory()
  } catch {
    return false
  }
}

// Packages' development files: their tools' dotfiles, type declarations and source maps. Nothing
// reads them at run time, except TypeScript its own lib.*.d.ts. Leaving them out saves 6,000 files
// and 60 MB.
const devFile =
  /^\.(npmignore|gitignore|gitattributes|gitmodules|eslintrc(\..*)?|eslintignore|prettierrc(\..*)?|editorconfig|travis\.yml)$|\.(d\.[cm]?ts|map)$/

const out = []
const walkedDirs = new Set()
/** A directory and everything in it, except nested node_modules: those are packages of their own. */
function walk(path, keep = () => true) {
  out.push(path)
  walkedDirs.add(path)
  for (const entry of readdirSync(join(source, path), { withFileTypes: true })) {
    const child = `${path}/${entry.name}`
    if (entry.isDirectory()) {
      if (entry.name !== 'node_modules') walk(child, keep)
    } else if (keep(entry.name)) out.push(child)
  }
}
const runtimeFile = (name) => !devFile.test(name)

const lock = JSON.parse(readFileSync(join(source, 'package-lock.json'), 'utf8'))
out.push('package.json')
for (const dir of codeDirs) walk(dir)
const packages = Object.entries(lock.packages ?? {})
  .filter(([path, entry]) => path.startsWith('node_modules/') && wanted(path, entry))
  // Optional packages for other platforms are in the lock file but were never installed.
  .filter(([path]) => exists(path))
  .map(([path]) => path)
  .sort()
// Parents of scoped and nested packages (node_modules, node_modules/@scope) come first.
const parents = new Set()
for (const path of packages) {
  const parts = path.split('/')
  for (let i = 1; i < parts.length; i++) {
    const parent = parts.slice(0, i).join('/')
    if (!packages.includes(parent)) parents.add(parent)
  }
}
for (const parent of [...parents].sort()) {
  out.push(parent)
  walkedDirs.add(parent)
}
for (const path of packages) walk(path, path === 'node_modules/typescript' ? undefined : runtimeFile)
// Directories that held only what was left out stay out too.
const filled = new Set()
for (const path of out) {
  if (walkedDirs.has(path)) continue
  for (let i = path.lastIndexOf('/'); i > 0; i = path.lastIndexOf('/', i - 1)) filled.add(path.slice(0, i))
}
const kept = out.filter((p) => !walkedDirs.has(p) || filled.has(p))
process.stdout.write(kept.map((p) => `${p}\0`).join(''))
