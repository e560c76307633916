#!/usr/bin/env node
// The CLI is TypeScript run by Node's built-in type stripping (on by default from Node 22.18).
const [major, minor] = process.versions.node.split('.').map(Number)
if (major < 22 || (major === 22 && minor < 18)) {
  process.stderr.write(
    `garage: needs Node.js 22.18 or newer, this is ${process.version}.\n` +
      '  Run it through npm (npm start, npx garage ...), which uses the Node 22 that npm install put in\n' +
      '  node_modules/.bin, or install Node.js 22 LTS.\n',
  )
  process.exit(1)
}
// node:sqlite (the federation's store) warns that it is experimental on every run: drop that one
// warning and hand every other to Node's own printer, so they look and redirect as Node makes them.
const [nodeWarningPrinter] = process.listeners('warning')
if (nodeWarningPrinter != null) {
  process.removeListener('warning', nodeWarningPrinter)
  process.on('warning', (warning) => {
    if (warning?.name === 'ExperimentalWarning' && /\bSQLite\b/.test(warning.message)) return
    nodeWarningPrinter.call(process, warning)
  })
}
const { main } = await import('../cli/main.ts')
process.exitCode = await main(process.argv.slice(2))
