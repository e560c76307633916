// Stands in for `garage node` in the tray's child-process tests: records its argv, writes
// control.json and serves the stub control API like the daemon; SIGTERM stops it.
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { startStubControlApi } from './stub-control-api.ts'

const args = process.argv.slice(2)
const dataDir = args[args.indexOf('--data-dir') + 1] as string
writeFileSync(join(dataDir, 'argv.json'), JSON.stringify(args))
if (process.env.FAKE_GARAGE_FAIL != null) {
  process.stderr.write(`${JSON.stringify({ level: 50, msg: process.env.FAKE_GARAGE_FAIL })}\n`)
  process.exit(1)
}
const api = await startStubControlApi({
  dataDir,
  pid: process.pid,
  status: {
    state: 'serving',
    reason: null,
    pausedUntil: null,
    peerId: null,
    region: 'eu-north',
    head: null,
    model: 'garage-tiny',
    engine: null,
    gpu: null,
    tokensPerSecond: 3,
    tokensToday: 0,
    creditsToday: 0,
    integrity: null,
    uptimeSeconds: 0,
  },
})
process.on('SIGTERM', () => {
  writeFileSync(join(dataDir, 'sigterm'), String(Date.now()))
  void api.close().then(() => process.exit(0))
})
