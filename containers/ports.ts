import { createServer } from 'node:net'

/** A TCP port free on 127.0.0.1 right now (the container engine binds it a moment later). */
export function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.unref()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address != null ? address.port : 0
      server.close(() => (port > 0 ? resolve(port) : reject(new Error('no free port on 127.0.0.1'))))
    })
  })
}

/** The CLI's words when the host port was taken between freeLoopbackPort() and run. */
export function isPortInUse(message: string): boolean {
  return /address already in use|port is already allocated|bind: .*in use/i.test(message)
}
