/**
 * The embedded engine's own process: `node serve-process.ts` with its options in the
 * GARAGE_ENGINE_OPTIONS environment variable (JSON, the API key included: never on the command
 * line, where any local user could read it). It prints one JSON line, `{ "url", "apiKey",
 * "servedModelName" }`, once it serves; answers `{ type: 'drain', graceMs }` IPC messages with
 * `{ type: 'drained' }`; and exits cleanly on SIGTERM, SIGINT or when its parent goes away.
 *
 * A process of its own: a crash in llama.cpp cannot take the daemon down, and the daemon's own
 * work (mesh streams, HTTP parsing) does not compete with token generation for one event loop.
 */
import { type EmbeddedServerOptions, startEmbeddedServer } from './server.ts'

const options = JSON.parse(process.env.GARAGE_ENGINE_OPTIONS ?? '{}') as EmbeddedServerOptions
delete process.env.GARAGE_ENGINE_OPTIONS

try {
  const server = await startEmbeddedServer(options)
  let closing = false
  const close = (code: number): void => {
    if (closing) return
    closing = true
    void server.close().finally(() => process.exit(code))
  }
  process.once('SIGTERM', () => close(0))
  process.once('SIGINT', () => close(0))
  process.on('disconnect', () => close(0))
  process.on('message', (message: { type?: string; graceMs?: number }) => {
    if (message?.type === 'drain') {
      void server.drain(message.graceMs).then(() => process.send?.({ type: 'drained' }))
    }
  })
  process.stdout.write(
    `${JSON.stringify({ url: server.url, apiKey: server.apiKey, servedModelName: server.servedModelName })}\n`,
  )
} catch (err) {
  process.stderr.write(`embedded engine failed to start: ${(err as Error).message}\n`)
  process.exit(1)
}
