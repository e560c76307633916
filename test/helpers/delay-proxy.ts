import { createConnection, createServer, type Server, type Socket } from 'node:net'

/**
 * A TCP proxy on 127.0.0.1 that holds every chunk for `delayMs` in each direction (order kept):
 * a slow link made real for RTT-based choices.
 */
export interface DelayProxy {
  port: number
  close(): Promise<void>
}

function delayedPipe(from: Socket, to: Socket, delayMs: number): void {
  let chain = Promise.resolve()
  from.on('data', (chunk) => {
    from.pause()
    chain = chain.then(
      () =>
        new Promise<void>((resolve) => {
          setTimeout(() => {
            if (!to.destroyed) to.write(chunk)
            resolve()
          }, delayMs)
        }),
    )
    // Read on while the delayed chunk waits: latency, not a bandwidth cap.
    from.resume()
  })
  from.on('end', () => {
    void chain.then(() => to.end())
  })
  from.on('error', () => to.destroy())
  from.on('close', () => {
    void chain.then(() => to.destroy())
  })
}

/** `target` is read per connection, so the proxy can start before the server it fronts. */
export async function startDelayProxy(
  target: () => { host: string; port: number },
  delayMs: number,
): Promise<DelayProxy> {
  const sockets = new Set<Socket>()
  const server: Server = createServer((client) => {
    const upstream = createConnection(target())
    for (const s of [client, upstream]) {
      sockets.add(s)
      s.on('close', () => sockets.delete(s))
    }
    delayedPipe(client, upstream, delayMs)
    delayedPipe(upstream, client, delayMs)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  if (address == null || typeof address === 'string') throw new Error('proxy has no port')
  return {
    port: address.port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy()
        server.close(() => resolve())
      }),
  }
}
