// Gives every file under DIR the mode Debian expects from what it is: a script (#!) is executable,
// an ELF file keeps its mode, anything else is 0644. npm packages ship executable JSON and READMEs
// and scripts without the bit; build-deb.sh runs this on the staged app.
//
// Usage: node fix-modes.mjs DIR
import { chmodSync, closeSync, openSync, readdirSync, readSync, statSync } from 'node:fs'
import { join } from 'node:path'

const [dir] = process.argv.slice(2)
if (dir == null) {
  process.stderr.write('usage: fix-modes.mjs DIR\n')
  process.exit(2)
}

const head = Buffer.alloc(4)
function kind(path) {
  const fd = openSync(path, 'r')
  try {
    const n = readSync(fd, head, 0, 4, 0)
    if (n >= 2 && head[0] === 0x23 && head[1] === 0x21) return 'script'
    if (n === 4 && head.toString('latin1') === '\x7fELF') return 'elf'
    return 'data'
  } finally {
    closeSync(fd)
  }
}

let changed = 0
function walk(path) {
  for (const entry of readdirSync(path, { withFileTypes: true })) {
    const child = join(path, entry.name)
    if (entry.isDirectory()) walk(child)
    else if (entry.isFile()) {
      const what = kind(child)
      if (what === 'elf') continue
      const mode = what === 'script' ? 0o755 : 0o644
      if ((statSync(child).mode & 0o7777) !== mode) {
        chmodSync(child, mode)
        changed++
      }
    }
  }
}
walk(dir)
process.stdout.write(`${changed} file modes fixed\n`)
