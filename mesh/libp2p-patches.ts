import type { Socket } from 'node:net'
import { type YamuxMuxerInit, yamux } from '@chainsafe/libp2p-yamux'
import {
  InvalidParametersError,
  type Libp2p,
  type MultiaddrConnection,
  type StreamMuxerFactory,
  type Transport,
  type Upgrader,
} from '@libp2p/interface'
import { type TCPComponents, tcp } from '@libp2p/tcp'
import { InvalidMessageLengthError, LengthPrefixedDecoder } from '@libp2p/utils'

/**
 * Garage's patches of libp2p internals, in one place. Each reaches into a private part of a libp2p
 * module (a socket, a yamux stream, the peer router); an upgrade that renames that part leaves the
 * stock behaviour in place, and `libp2pPatches` says so: test/mesh/libp2p-patches.test.ts runs real
 * nodes and fails when a patch no longer takes hold. docs/mesh.md has the measurements behind each.
 */

/** How many times each patch took hold since the process started (connections, streams, routers). */
export const libp2pPatches = {
  coalesceWrites: 0,
  halfWindowUpdates: 0,
  backOffEmptyWalks: 0,
  /** Reads that ended on an empty buffer without a RangeError thrown and caught (quietDecoderEnds). */
  quietDecoderEnds: 0,
}

/**
 * Gathers what libp2p writes to a TCP socket into fewer writes. noise writes each message as two
 * buffers (its length, then the ciphertext): with TCP_NODELAY (which @libp2p/tcp sets) each was its
 * own syscall and segment, waking the peer for a 2-byte read. Now the first message of a turn of the
 * event loop leaves once the code that wrote it is done, and the rest of that turn's in one write at
 * its end. The bytes, their order and backpressure are unchanged.
 */
export function coalesceWrites(maConn: MultiaddrConnection): MultiaddrConnection {
  const conn = maConn as MultiaddrConnection & {
    socket?: Socket
    sendData?: (data: Iterable<Uint8Array>) => { sentBytes: number; canSendMore: boolean }
  }
  const socket = conn.socket
  if (socket == null || typeof conn.sendData !== 'function' || typeof socket.cork !== 'function')
    return maConn
  libp2pPatches.coalesceWrites++
  let corked = false
  // A gathered write already left in this turn of the event loop: later ones wait for its end.
  let sentThisTurn = false
  const endTurn = (): void => {
    sentThisTurn = false
  }
  const flush = (): void => {
    if (!corked) return
    corked = false
    socket.uncork()
  }
  const flushFirst = (): void => {
    if (!corked) return
    flush()
    if (!sentThisTurn) {
      sentThisTurn = true
      setImmediate(endTurn)
    }
  }
  conn.sendData = (data) => {
    if (!corked) {
      corked = true
      socket.cork()
      // The first message of a turn leaves as soon as the code that wrote it is done (a lone
      // request waits for nothing); what follows in the same turn leaves together at its end.
      if (sentThisTurn) setImmediate(flush)
      else queueMicrotask(flushFirst)
    }
    let sentBytes = 0
    let canSendMore = true
    for (const buf of data) {
      sentBytes += buf.byteLength
      canSendMore = socket.write(buf)
      if (!canSendMore) break
    }
    // Bulk data leaves at once, as it did uncorked: only small writes wait.
    if (socket.writableLength >= socket.writableHighWaterMark) flush()
    return { sentBytes, canSendMore }
  }
  return maConn
}

/** @libp2p/tcp with coalesceWrites on every connection it makes or accepts. */
export function coalescingTcp(): (components: TCPComponents) => Transport {
  const factory = tcp()
  return (components) => {
    const inner = factory(components)
    const wrap = (upgrader: Upgrader): Upgrader =>
      Object.assign(Object.create(upgrader) as Upgrader, {
        upgradeInbound: (maConn: MultiaddrConnection, opts: Parameters<Upgrader['upgradeInbound']>[1]) =>
          upgrader.upgradeInbound(coalesceWrites(maConn), opts),
        upgradeOutbound: (maConn: MultiaddrConnection, opts: Parameters<Upgrader['upgradeOutbound']>[1]) =>
          upgrader.upgradeOutbound(coalesceWrites(maConn), opts),
      })
    return Object.assign(Object.create(inner) as Transport, {
      dial: (ma: Parameters<Transport['dial']>[0], options: Parameters<Transport['dial']>[1]) =>
        inner.dial(ma, { ...options, upgrader: wrap(options.upgrader) }),
      createListener: (options: Parameters<Transport['createListener']>[0]) =>
        inner.createListener({ ...options, upgrader: wrap(options.upgrader) }),
    })
  }
}

/** What halfWindowUpdates needs of a yamux stream (@chainsafe/libp2p-yamux 8). */
interface YamuxStreamWindow {
  sendWindowUpdate(): void
  recvWindow: number
  recvWindowCapacity: number
  state: number
}
/** YamuxStream's StreamState.Established: no SYN or ACK waits to ride on an update. */
const yamuxEstablished = 3

/**
 * A stream sends a window update once half its receive window is used, as hashicorp/yamux does,
 * instead of after every data frame: for a small request and its answer that was two extra frames,
 * each waking the other process for nothing. The sender always keeps at least half a window, so
 * nothing waits; updates that carry a SYN or ACK, and those after a pause, go out as before.
 */
export function halfWindowUpdates(stream: unknown): void {
  const s = stream as Partial<YamuxStreamWindow>
  const update = s.sendWindowUpdate
  if (
    typeof update !== 'function' ||
    typeof s.recvWindow !== 'number' ||
    typeof s.recvWindowCapacity !== 'number'
  )
    return
  libp2pPatches.halfWindowUpdates++
  s.sendWindowUpdate = function (this: YamuxStreamWindow): void {
    if (this.state === yamuxEstablished && this.recvWindow - this.recvWindowCapacity < this.recvWindow / 2)
      return
    update.call(this)
  }
}

/** yamux with halfWindowUpdates on every stream its muxers make. */
export function yamuxHalfWindowUpdates(init: YamuxMuxerInit): () => StreamMuxerFactory {
  const factory = yamux(init)
  return () => {
    const inner = factory()
    return Object.assign(Object.create(inner) as StreamMuxerFactory, {
      createStreamMuxer: (maConn: MultiaddrConnection) => {
        const muxer = inner.createStreamMuxer(maConn)
        const m = muxer as unknown as { _newStream?: (...args: unknown[]) => unknown }
        const newStream = m._newStream
        if (typeof newStream === 'function') {
          m._newStream = function (this: unknown, ...args: unknown[]): unknown {
            const stream = newStream.apply(this, args)
            halfWindowUpdates(stream)
            return stream
          }
        }
        return muxer
      },
    })
  }
}

/** The first and longest pause before a closest-peers query that follows one that found nobody. */
export const emptyWalkBackoffMs = { min: 1_000, max: 30_000 } as const

/**
 * libp2p's random walk (which the relay transport runs to find relays for `/p2p-circuit`) asks for
 * closest peers in a loop with no pause: with every known peer unreachable (the head's region is
 * down) each query ends at once and a node spun at 50-75% of a core. A query that found nobody is
 * followed by a pause, doubling to `emptyWalkBackoffMs.max`, reset by one that finds a peer. Reaches
 * into the component libp2p's random walk calls (`node.peerRouting` is that same object); if it is
 * renamed, the stock behaviour stays.
 */
export function backOffEmptyWalks(peerRouting: Libp2p['peerRouting']): void {
  const original = peerRouting.getClosestPeers.bind(peerRouting)
  libp2pPatches.backOffEmptyWalks++
  let pauseMs = 0
  peerRouting.getClosestPeers = async function* (key, options) {
    if (pauseMs > 0) await waitOrAbort(pauseMs, options?.signal)
    let found = false
    try {
      for await (const peer of original(key, options)) {
        found = true
        yield peer
      }
    } finally {
      pauseMs = found ? 0 : Math.min(Math.max(pauseMs * 2, emptyWalkBackoffMs.min), emptyWalkBackoffMs.max)
    }
  }
}

function waitOrAbort(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason)
    const timer = setTimeout(done, ms)
    function done(): void {
      signal?.removeEventListener('abort', aborted)
      resolve()
    }
    function aborted(): void {
      clearTimeout(timer)
      reject(signal?.reason)
    }
    signal?.addEventListener('abort', aborted, { once: true })
  })
}

/** What quietDecoderEnds needs of @libp2p/utils' LengthPrefixedDecoder (7.x). */
interface DecoderInternals {
  buffer: Uint8ArrayListLike
  maxBufferSize: number
  maxDataLength: number
  lengthDecoder: (buf: Uint8ArrayListLike) => number
  encodingLength: (n: number) => number
}
interface Uint8ArrayListLike {
  byteLength: number
  append(buf: Uint8Array | Uint8ArrayListLike): void
  sublist(begin: number, end: number): Uint8ArrayListLike
  consume(bytes: number): void
}

let decoderPatched = false

/**
 * @libp2p/utils' LengthPrefixedDecoder (which noise runs on every TCP read) loops until its length
 * decoder throws a RangeError for want of bytes, so each read ended in a thrown and caught error:
 * 3-6 % of a head's and a node's CPU, most of it building the stack trace. Now the loop also stops,
 * without calling the length decoder, once the buffer is empty; every frame, limit and error is as
 * before (a partial length prefix still ends the loop through the RangeError). Offered upstream as
 * the same one-line check in `decode()`. Patches the class's prototype once per process; an upgrade
 * that renames its fields leaves the stock method in place (test/mesh/libp2p-patches.test.ts).
 */
export function quietDecoderEnds(): void {
  if (decoderPatched) return
  const proto = LengthPrefixedDecoder.prototype as unknown as {
    decode: (this: DecoderInternals, buf: Uint8Array) => Generator<Uint8ArrayListLike>
  }
  const probe = new LengthPrefixedDecoder() as unknown as Partial<DecoderInternals>
  if (
    probe.buffer == null ||
    typeof probe.lengthDecoder !== 'function' ||
    typeof probe.encodingLength !== 'function' ||
    typeof probe.maxBufferSize !== 'number' ||
    typeof probe.maxDataLength !== 'number' ||
    typeof proto.decode !== 'function'
  )
    return
  const stock = proto.decode
  decoderPatched = true
  proto.decode = function* (this: DecoderInternals, buf: Uint8Array): Generator<Uint8ArrayListLike> {
    // The stock method with one check added: `if (this.buffer.byteLength === 0) break`.
    if (this.buffer == null || typeof this.lengthDecoder !== 'function') return yield* stock.call(this, buf)
    this.buffer.append(buf)
    if (this.buffer.byteLength > this.maxBufferSize)
      throw new InvalidParametersError(
        `Buffer length limit exceeded - ${this.buffer.byteLength}/${this.maxBufferSize}`,
      )
    while (true) {
      if (this.buffer.byteLength === 0) {
        libp2pPatches.quietDecoderEnds++
        break
      }
      let dataLength: number
      try {
        dataLength = this.lengthDecoder(this.buffer)
      } catch (err) {
        if (err instanceof RangeError) break
        throw err
      }
      if (dataLength < 0 || dataLength > this.maxDataLength)
        throw new InvalidMessageLengthError('Invalid message length')
      const lengthLength = this.encodingLength(dataLength)
      const chunkLength = lengthLength + dataLength
      if (this.buffer.byteLength < chunkLength) break
      const frame = this.buffer.sublist(lengthLength, chunkLength)
      this.buffer.consume(chunkLength)
      if (frame.byteLength > 0) yield frame
    }
  }
}
