import { createConnection, createServer, type Server, type Socket } from 'node:net'

/**
 * A TCP proxy that adds a one-way delay to every chunk, changeable while connections are open: a
 * slow link between a node and its head. Each chunk leaves `delayMs` after it arrived (order kept),
 * so this is latency, not a bandwidth cap: a burst of chunks is not delayed once per chunk.
 */
export interface LinkProxy {
  host: string
  port: number
  readonly delayMs: number
  /** Applies to chunks that arrive from now on (earlier ones keep their time, and the order). */
  setDelay(delayMs: number): void
  /** Connections open through the proxy now. */
  readonly connections: number
  close(): Promise<void>
}

interface Pending {
  due: number
  chunk: Buffer
}

/** One direction of one connection: chunks leave in order, each at max(its due time, the previous one's). */
function delayedPipe(from: Socket, to: Socket, delay: () => number): void {
  const queue: Pending[] = []
  let timer: NodeJS.Timeout | null = null
  /** How this side finished: a clean end is passed on as an end, anything else as a reset. */
  let finished: 'end' | 'reset' | null = null
  const pump = (): void => {
    timer = null
    const now = performance.now()
    while (queue.length > 0 && queue[0]!.due <= now) {
      const { chunk } = queue.shift()!
      if (!to.destroyed) to.write(chunk)
    }
    if (queue.length > 0) timer = setTimeout(pump, Math.max(0, queue[0]!.due - now))
    else if (finished === 'end' && !to.destroyed) to.end()
    else if (finished === 'reset') to.destroy()
  }
  const finish = (how: 'end' | 'reset'): void => {
    if (finished != null) return
    finished = how
    if (timer == null) pump()
  }
  from.on('data', (chunk: Buffer) => {
    const last = queue.at(-1)?.due ?? 0
    queue.push({ chunk, due: Math.max(performance.now() + delay(), last) })
    if (timer == null) pump()
  })
  from.on('end', () => finish('end'))
  from.on('error', () => finish('reset'))
  from.on('close', () => finish('reset'))
}

/** `target` is read per connection: the server behind it may restart on the same port. */
export async function startLinkProxy(options: {
  listenHost: string
  target: () => { host: string; port: number }
  delayMs?: number
}): Promise<LinkProxy> {
  let delayMs = options.delayMs ?? 0
  const sockets = new Set<Socket>()
  const server: Server = createServer((client) => {
    const upstream = createConnection(options.target())
    for (const s of [client, upstream]) {
      sockets.add(s)
      s.on('close', () => sockets.delete(s))
      s.setNoDelay(true)
    }
    delayedPipe(client, upstream, () => delayMs)
    delayedPipe(upstream, client, () => delayMs)
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, options.listenHost, () => {
      server.off('error', reject)
      resolve()
    })
  })
  const address = server.address()
  if (address == null || typeof address === 'string') throw new Error('the link proxy has no port')
  return {
    host: options.listenHost,
    port: address.port,
    get delayMs() {
      return delayMs
    },
    setDelay(ms) {
      delayMs = Math.max(0, ms)
    },
    get connections() {
      return Math.floor(sockets.size / 2)
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy()
        server.close(() => resolve())
      }),
  }
}
