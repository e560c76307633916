import type { AbortOptions, PeerId, Stream } from '@libp2p/interface'
import { lpStream } from '@libp2p/utils'
import type { MeshNode } from './node.ts'

/**
 * Request/answer exchanges (one length-prefixed message each way) on one stream per peer and
 * protocol, kept open between them: opening a stream (yamux setup, multistream-select) cost the
 * head most of a small exchange's CPU. Telemetry and the direct path's lease reports use it. A
 * server that closes the stream after one answer (an older version) gets a new stream per request;
 * a client that closes after one is served as before.
 */

interface KeptChannel {
  stream: Stream
  lp: ReturnType<typeof lpStream>
}

/** Per mesh node, the kept stream per `protocol peer`. */
const channels = new WeakMap<MeshNode, Map<string, KeptChannel>>()

export interface KeptExchangeOptions extends AbortOptions {
  protocol: string
  maxAnswerBytes: number
  maxOutboundStreams: number
  runOnLimitedConnection?: boolean
}

async function once(channel: KeptChannel, bytes: Uint8Array, signal: AbortSignal | undefined) {
  await channel.lp.write(bytes, { signal })
  return (await channel.lp.read({ signal })).subarray()
}

/** Sends `bytes` and resolves with the answer, on the kept stream when there is one. */
export async function keptExchange(
  node: MeshNode,
  peer: PeerId,
  bytes: Uint8Array,
  options: KeptExchangeOptions,
): Promise<Uint8Array> {
  const { signal } = options
  let open = channels.get(node)
  if (open == null) {
    open = new Map()
    channels.set(node, open)
  }
  const key = `${options.protocol} ${peer.toString()}`
  const kept = open.get(key)
  // Off the map while in use: a second exchange at the same time opens a stream of its own.
  open.delete(key)
  if (kept != null && kept.stream.status === 'open' && kept.stream.remoteWriteStatus === 'writable') {
    try {
      const answer = await once(kept, bytes, signal)
      open.set(key, kept)
      return answer
    } catch (err) {
      kept.stream.abort(err as Error)
      // The other side closed or reset the kept stream: the request goes again on a new one.
      if (signal?.aborted === true) throw err
    }
  } else if (kept != null) kept.stream.abort(new Error('the peer closed the kept stream'))
  const stream = await node.dialProtocol(peer, options.protocol, {
    ...(signal != null ? { signal } : {}),
    runOnLimitedConnection: options.runOnLimitedConnection ?? false,
    maxOutboundStreams: options.maxOutboundStreams,
  })
  const channel = { stream, lp: lpStream(stream, { maxDataLength: options.maxAnswerBytes }) }
  try {
    const answer = await once(channel, bytes, signal)
    // Kept for the next exchange unless the other side is done with it.
    if (stream.remoteWriteStatus === 'writable') open.set(key, channel)
    else await stream.close(signal != null ? { signal } : {})
    return answer
  } catch (err) {
    stream.abort(err as Error)
    throw err
  }
}

/**
 * The server's side: answers request after request on `stream`, the first within `firstMs`, each
 * next within `idleMs`. A client that closes its side, goes quiet past `idleMs` or goes away ends it
 * quietly; a request `answer` throws on (malformed, refused) throws, for the caller to reset the
 * stream and log.
 */
export async function serveKept(
  stream: Stream,
  options: {
    maxRequestBytes: number
    firstMs: number
    idleMs: number
    /** Each answer is written within this. */
    writeMs: number
    answer(request: Uint8Array): Uint8Array | Promise<Uint8Array>
  },
): Promise<void> {
  const lp = lpStream(stream, { maxDataLength: options.maxRequestBytes })
  for (let first = true; ; first = false) {
    let request: Uint8Array
    try {
      request = (
        await lp.read({ signal: AbortSignal.timeout(first ? options.firstMs : options.idleMs) })
      ).subarray()
    } catch (err) {
      if (first) throw err
      if (stream.remoteWriteStatus !== 'writable')
        await stream
          .close({ signal: AbortSignal.timeout(options.writeMs) })
          .catch(() => stream.abort(err as Error))
      else stream.abort(err as Error)
      return
    }
    const answer = await options.answer(request)
    await lp.write(answer, { signal: AbortSignal.timeout(options.writeMs) })
  }
}
