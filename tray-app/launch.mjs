// Electron entry for running from a checkout: `npx electron tray-app/launch.mjs`.
// main.ts is TypeScript run by the type stripping of Electron's own Node (Electron 40 and later
// bundle Node 24, where it is on by default); an Electron without it gets one clear line.
if (!process.features?.typescript) {
  console.error(
    `garage tray: this Electron's Node (${process.versions.node}) does not strip TypeScript types; ` +
      'use Electron 40 or newer (npm install puts Electron 45 in node_modules).',
  )
  process.exit(1)
}
await import('./main.ts')
