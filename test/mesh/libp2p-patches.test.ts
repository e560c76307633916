import { once } from 'node:events'
import { type AddressInfo, connect, createServer, type Socket } from 'node:net'
import { generateKeyPair } from '@libp2p/crypto/keys'
import type { Libp2p, MultiaddrConnection, PeerInfo } from '@libp2p/interface'
import { LengthPrefixedDecoder } from '@libp2p/utils'
import * as varint from 'uint8-varint'
import { Uint8ArrayList } from 'uint8arraylist'
import { afterEach, describe, expect, it, vi } from 'vitest'
import {
  backOffEmptyWalks,
  coalesceWrites,
  emptyWalkBackoffMs,
  halfWindowUpdates,
  libp2pPatches,
  quietDecoderEnds,
} from '../../mesh/libp2p-patches.ts'
import { createMeshNode } from '../../mesh/node.ts'

/** A peer router whose queries find `results[i]` peers on the i-th call. */
function router(results: number[]): { routing: Libp2p['peerRouting']; calls: number[] } {
  const calls: number[] = []
  const routing = {
    async *getClosestPeers(): AsyncGenerator<PeerInfo> {
      calls.push(Date.now())
      const n = results[calls.length - 1] ?? 0
      for (let i = 0; i < n; i++) yield { id: {}, multiaddrs: [] } as unknown as PeerInfo
    },
  } as unknown as Libp2p['peerRouting']
  return { routing, calls }
}

async function drain(routing: Libp2p['peerRouting'], signal?: AbortSignal): Promise<number> {
  let n = 0
  for await (const _ of routing.getClosestPeers(new Uint8Array(32), signal != null ? { signal } : {})) n++
  return n
}

describe('backOffEmptyWalks', () => {
  afterEach(() => {
    vi.useRealTimers()
  })

  it('pauses after a query that found nobody, doubling, and not after one that found peers', async () => {
    vi.useFakeTimers({ now: 0 })
    const { routing, calls } = router([0, 0, 2, 0])
    backOffEmptyWalks(routing)
    expect(await drain(routing)).toBe(0)
    const second = drain(routing)
    await vi.advanceTimersByTimeAsync(emptyWalkBackoffMs.min)
    expect(await second).toBe(0)
    const third = drain(routing)
    await vi.advanceTimersByTimeAsync(emptyWalkBackoffMs.min * 2)
    expect(await third).toBe(2)
    // A query that found peers resets the pause: the next one starts at once.
    expect(await drain(routing)).toBe(0)
    expect(calls).toEqual([0, emptyWalkBackoffMs.min, emptyWalkBackoffMs.min * 3, emptyWalkBackoffMs.min * 3])
  })

  it('gives up the pause when the caller aborts', async () => {
    vi.useFakeTimers({ now: 0 })
    const { routing, calls } = router([0, 0])
    backOffEmptyWalks(routing)
    await drain(routing)
    const controller = new AbortController()
    const paused = drain(routing, controller.signal)
    controller.abort(new Error('stopped'))
    await expect(paused).rejects.toThrow('stopped')
    expect(calls).toHaveLength(1)
  })
})

describe('coalesceWrites', () => {
  it("sends one turn's writes to the socket in one writev, bytes in order", async () => {
    const server = createServer()
    server.listen(0, '127.0.0.1')
    await once(server, 'listening')
    const received: Buffer[] = []
    const accepted = once(server, 'connection').then(([socket]) => {
      ;(socket as Socket).on('data', (chunk: Buffer) => received.push(chunk))
      return socket as Socket
    })
    const socket = connect((server.address() as AddressInfo).port, '127.0.0.1')
    await once(socket, 'connect')
    const peer = await accepted
    try {
      const maConn = {
        socket,
        sendData(data: Iterable<Uint8Array>) {
          let sentBytes = 0
          let canSendMore = true
          for (const buf of data) {
            sentBytes += buf.byteLength
            canSendMore = socket.write(buf)
          }
          return { sentBytes, canSendMore }
        },
      }
      const writev = vi.spyOn(socket as unknown as { _writev: (...a: unknown[]) => void }, '_writev')
      const write = vi.spyOn(socket as unknown as { _write: (...a: unknown[]) => void }, '_write')
      const before = libp2pPatches.coalesceWrites
      const patched = coalesceWrites(maConn as unknown as MultiaddrConnection) as unknown as typeof maConn
      expect(libp2pPatches.coalesceWrites).toBe(before + 1)
      // noise writes a length, then the ciphertext: four small buffers from two messages.
      patched.sendData([Buffer.from('ab'), Buffer.from('cd')])
      patched.sendData([Buffer.from('ef'), Buffer.from('gh')])
      await new Promise((resolve) => setImmediate(resolve))
      expect(writev).toHaveBeenCalledTimes(1)
      expect(write).not.toHaveBeenCalled()
      await vi.waitFor(() => expect(Buffer.concat(received).toString()).toBe('abcdefgh'))
    } finally {
      socket.destroy()
      peer.destroy()
      server.close()
    }
  })

  it('leaves a connection without a socket as it is', () => {
    const before = libp2pPatches.coalesceWrites
    const maConn = { sendData: () => ({ sentBytes: 0, canSendMore: true }) }
    expect(coalesceWrites(maConn as unknown as MultiaddrConnection)).toBe(maConn)
    expect(libp2pPatches.coalesceWrites).toBe(before)
  })
})

describe('halfWindowUpdates', () => {
  it('sends a window update only once half the receive window is used, or before the stream is established', () => {
    const sent: number[] = []
    const stream = {
      state: 3,
      recvWindow: 100,
      recvWindowCapacity: 100,
      sendWindowUpdate(this: { recvWindowCapacity: number }) {
        sent.push(this.recvWindowCapacity)
      },
    }
    halfWindowUpdates(stream)
    stream.recvWindowCapacity = 80
    stream.sendWindowUpdate()
    expect(sent).toEqual([])
    stream.recvWindowCapacity = 40
    stream.sendWindowUpdate()
    expect(sent).toEqual([40])
    // A SYN or ACK rides on the update: it must go out.
    stream.state = 1
    stream.recvWindowCapacity = 90
    stream.sendWindowUpdate()
    expect(sent).toEqual([40, 90])
  })
})

describe('quietDecoderEnds', () => {
  /** Length-prefixed frames (varint, as the stock decoder defaults to) of the given sizes. */
  function frames(sizes: number[]): { wire: Uint8Array; payloads: Uint8Array[] } {
    const payloads = sizes.map((n, i) => Uint8Array.from({ length: n }, (_, j) => (i * 31 + j) & 0xff))
    const list = new Uint8ArrayList()
    for (const p of payloads) list.append(varint.encode(p.byteLength), p)
    return { wire: list.subarray(), payloads: payloads.filter((p) => p.byteLength > 0) }
  }

  it('yields the same frames however the bytes are cut, without a RangeError on an empty buffer', () => {
    quietDecoderEnds()
    const { wire, payloads } = frames([0, 1, 5, 127, 128, 300, 2, 20_000])
    for (const cut of [1, 2, 3, 7, 64, 1000, wire.byteLength]) {
      let emptyCalls = 0
      const decoder = new LengthPrefixedDecoder({
        lengthDecoder: (buf) => {
          if (buf.byteLength === 0) emptyCalls++
          return varint.decode(buf)
        },
      })
      const got: Uint8Array[] = []
      for (let i = 0; i < wire.byteLength; i += cut)
        for (const f of decoder.decode(wire.subarray(i, i + cut))) got.push(f.subarray())
      expect(got).toEqual(payloads)
      expect(emptyCalls).toBe(0)
    }
  })

  it('keeps the limits and errors of the stock decoder', () => {
    quietDecoderEnds()
    const tooLong = new LengthPrefixedDecoder({ maxDataLength: 10 })
    expect(() => [...tooLong.decode(varint.encode(11))]).toThrow(/Invalid message length/)
    const tooMuch = new LengthPrefixedDecoder({ maxBufferSize: 4 })
    expect(() => [...tooMuch.decode(new Uint8Array(5))]).toThrow(/Buffer length limit exceeded/)
    // A partial length prefix waits for its next byte.
    const partial = new LengthPrefixedDecoder()
    expect([...partial.decode(Uint8Array.of(0x80))]).toEqual([])
    expect([...partial.decode(Uint8Array.of(0x01, ...new Uint8Array(128)))].map((f) => f.byteLength)).toEqual(
      [128],
    )
  })
})

describe('the patches on real libp2p nodes', () => {
  it('take hold on every connection, stream and router (an upgrade that moves an internal fails here)', async () => {
    const before = { ...libp2pPatches }
    const [a, b] = await Promise.all(
      [0, 1].map(async () =>
        createMeshNode({
          privateKey: await generateKeyPair('Ed25519'),
          listen: ['/ip4/127.0.0.1/tcp/0'],
          allowPrivateAddresses: true,
          relayReservation: false,
        }),
      ),
    )
    try {
      expect(libp2pPatches.backOffEmptyWalks).toBe(before.backOffEmptyWalks + 2)
      const rtt = await a!.services.ping.ping(b!.getMultiaddrs()[0]!)
      expect(rtt).toBeGreaterThanOrEqual(0)
      expect(libp2pPatches.coalesceWrites).toBeGreaterThanOrEqual(before.coalesceWrites + 2)
      expect(libp2pPatches.halfWindowUpdates).toBeGreaterThan(before.halfWindowUpdates)
      // noise's reads end on an empty buffer through the patched decoder.
      expect(libp2pPatches.quietDecoderEnds).toBeGreaterThan(before.quietDecoderEnds)
    } finally {
      await Promise.all([a!.stop(), b!.stop()])
    }
  })
})
