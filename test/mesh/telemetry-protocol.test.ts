import type { PeerId, Stream } from '@libp2p/interface'
import { lpStream } from '@libp2p/utils'
import { encode } from 'cborg'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest'
import { NodeRegistry } from '../../bootstrap/head/registry.ts'
import { encodeCanonical } from '../../core/cbor.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { TELEMETRY_PROTOCOL } from '../../mesh/protocols.ts'
import type { Assignment, CapabilityReport, TelemetryReport } from '../../mesh/region-messages.ts'
import {
  handleTelemetryProtocol,
  parseTelemetryReport,
  sendTelemetry,
  type TelemetryAck,
  TelemetryReporter,
  type TelemetrySample,
} from '../../mesh/telemetry-protocol.ts'
import { TestMesh } from '../helpers/mesh.ts'

function telemetry(over: Partial<TelemetryReport> = {}): TelemetryReport {
  return {
    v: 1,
    seq: 1,
    state: 'serving',
    model: 'garage-tiny',
    tokensTotal: 1200,
    promptTokensTotal: 3400,
    tokensPerSecond: 41.5,
    running: 2,
    waiting: 0,
    kvCacheUsage: 0.25,
    gpu: { utilizationPct: 87, temperatureC: 71, powerW: 310.5 },
    ...over,
  }
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p
  } catch (err) {
    return err as Error
  }
  throw new Error('expected a rejection')
}

async function drain(
  stream: AsyncIterable<{ byteLength: number }>,
): Promise<{ bytes: number; error: Error | null }> {
  let bytes = 0
  try {
    for await (const chunk of stream) bytes += chunk.byteLength
    return { bytes, error: null }
  } catch (err) {
    return { bytes, error: err as Error }
  }
}

describe('telemetry reports are checked', () => {
  it('accepts a full report and one without gpu', () => {
    expect(parseTelemetryReport(telemetry())).toEqual(telemetry())
    const { gpu: _, ...noGpu } = telemetry()
    expect(parseTelemetryReport(noGpu)).toEqual(noGpu)
  })

  it('rejects each broken field with TelemetryProtocolError naming it', () => {
    const bad: Array<[string, unknown]> = [
      ['kvCacheUsage', telemetry({ kvCacheUsage: 1.01 })],
      ['running', telemetry({ running: -1 })],
      ['tokensPerSecond', telemetry({ tokensPerSecond: Number.POSITIVE_INFINITY })],
      ['tokensTotal', telemetry({ tokensTotal: Number.NaN })],
      ['seq', telemetry({ seq: 1.5 })],
      ['state', telemetry({ state: 'gaming' as never })],
      ['model', telemetry({ model: 'm'.repeat(129) })],
      ['gpu.utilizationPct', telemetry({ gpu: { utilizationPct: 101, temperatureC: 1, powerW: 1 } })],
      ['gpu has fields', telemetry({ gpu: { utilizationPct: 1 } as never })],
      ['waiting is missing', { ...telemetry(), waiting: undefined }],
      ['not a known field', { ...telemetry(), extra: 1 }],
      ['version', { ...telemetry(), v: 2 }],
    ]
    for (const [what, value] of bad) {
      expect(() => parseTelemetryReport(value), what).toThrow(
        expect.objectContaining({ name: 'TelemetryProtocolError' }),
      )
      expect(() => parseTelemetryReport(value), what).toThrow(what)
    }
  })
})

describe('/garage/telemetry/1.0.0 between two nodes', () => {
  const mesh = new TestMesh()
  const registry = new NodeRegistry()
  let head: MeshNode
  let node: MeshNode
  let headId: PeerId
  const badRequests: string[] = []
  let standing: { state: 'quarantined' | 'appeal'; reason: string } | null = null

  beforeAll(async () => {
    head = await mesh.node([])
    headId = head.peerId
    await handleTelemetryProtocol(head, {
      onReport: (report, peer) => {
        const outcome = registry.report(peer, report)
        if (outcome === 'not_joined') return outcome
        return { ack: 'ok', verified: 7, integrity: standing }
      },
      onBadRequest: (err) => badRequests.push(err.name),
    })
    node = await mesh.node([])
    await node.dial(head.getMultiaddrs()[0]!)
  })
  afterAll(() => mesh.cleanup())

  it('answers not_joined to a node the head does not know, then ok once it has joined', async () => {
    expect(await sendTelemetry(node, headId, telemetry({ seq: 1 }))).toBe('not_joined')
    registry.join(node.peerId, {} as CapabilityReport, { model: 'garage-tiny' } as Assignment)
    expect(await sendTelemetry(node, headId, telemetry({ seq: 2 }))).toBe('ok')
    expect(registry.get(node.peerId)?.telemetry).toEqual(telemetry({ seq: 2 }))
    expect(registry.get(node.peerId)?.state).toBe('serving')
  })

  it('keeps one stream for report after report; a head that closes it gets a new stream each time', async () => {
    const streams = () =>
      node
        .getConnections(headId)
        .flatMap((c) => c.streams)
        .filter((st) => st.protocol === TELEMETRY_PROTOCOL)
    for (let seq = 10; seq < 15; seq++)
      expect(await sendTelemetry(node, headId, telemetry({ seq }))).toBe('ok')
    // One stream carried all five.
    expect(streams()).toHaveLength(1)
    expect(registry.get(node.peerId)?.telemetry?.seq).toBe(14)
    // An older head answers once and closes: each report still gets through, on a stream of its own.
    const old = await mesh.node([])
    await old.handle(TELEMETRY_PROTOCOL, async (stream) => {
      const lp = lpStream(stream)
      await lp.read()
      await lp.write(encodeCanonical({ v: 1, ok: true }))
      await stream.close()
    })
    await node.dial(old.getMultiaddrs()[0]!)
    for (let seq = 1; seq <= 3; seq++)
      expect(await sendTelemetry(node, old.peerId, telemetry({ seq }))).toBe('ok')
  })

  it("carries the head's verified count and the node's integrity standing", async () => {
    const seen: unknown[] = []
    const onVerified = (tokens: number, integrity: unknown): void => {
      seen.push([tokens, integrity])
    }
    standing = { state: 'quarantined', reason: 'answers unlikely under garage-tiny' }
    expect(await sendTelemetry(node, headId, telemetry({ seq: 20 }), { onVerified })).toBe('ok')
    standing = null
    expect(await sendTelemetry(node, headId, telemetry({ seq: 21 }), { onVerified })).toBe('ok')
    expect(seen).toEqual([
      [7, { state: 'quarantined', reason: 'answers unlikely under garage-tiny' }],
      [7, null],
    ])
  })

  it('refuses to send a malformed report', async () => {
    const err = await rejection(sendTelemetry(node, headId, telemetry({ kvCacheUsage: 2 })))
    expect(err.name).toBe('TelemetryProtocolError')
  })

  it('resets garbage, oversized and out-of-range reports, and keeps serving', async () => {
    const before = badRequests.length
    const open = (): Promise<Stream> => node.dialProtocol(headId, TELEMETRY_PROTOCOL)

    const garbage = await open()
    garbage.send(new Uint8Array([3, 0xff, 0xfe, 0xfd]))
    expect((await drain(garbage)).error?.name).toMatch(/Reset|Abort/)

    // a varint length of 1 MiB, far past the 4 KiB report limit
    const big = await open()
    big.send(new Uint8Array([0x80, 0x80, 0x40]))
    big.send(new Uint8Array(4096))
    const b = await drain(big)
    expect(b.bytes).toBe(0)
    expect(b.error?.name).toMatch(/Reset|Abort/)

    for (const value of [telemetry({ kvCacheUsage: 3 }), telemetry({ running: -2 }), { v: 1 }]) {
      const body = encode(value)
      const wrong = await open()
      wrong.send(new Uint8Array([body.byteLength, ...body]))
      const w = await drain(wrong)
      expect(w.bytes, JSON.stringify(value)).toBe(0)
      expect(w.error?.name, JSON.stringify(value)).toMatch(/Reset|Abort/)
    }
    expect(badRequests.length - before).toBe(5)
    expect(await sendTelemetry(node, headId, telemetry({ seq: 3 }))).toBe('ok')
  })
})

/** A send whose answer the test gives when it wants: shows whether sends overlap. */
function controlledSend() {
  const calls: Array<{
    report: TelemetryReport
    signal: AbortSignal
    answer: (a: TelemetryAck) => void
    fail: (e: Error) => void
  }> = []
  const send = (report: TelemetryReport, options: { signal: AbortSignal }): Promise<TelemetryAck> =>
    new Promise((resolve, reject) => {
      calls.push({ report, signal: options.signal, answer: resolve, fail: reject })
    })
  return { calls, send }
}

const sample: TelemetrySample = {
  state: 'serving',
  model: 'garage-tiny',
  tokensTotal: 0,
  promptTokensTotal: 0,
  tokensPerSecond: 0,
  running: 0,
  waiting: 0,
  kvCacheUsage: 0,
}

describe('TelemetryReporter', () => {
  beforeEach(() => {
    vi.useFakeTimers()
  })
  afterEach(() => {
    vi.useRealTimers()
  })

  it('sends at once on start, then every interval, with a rising seq', async () => {
    const sent: TelemetryReport[] = []
    const reporter = new TelemetryReporter({
      intervalMs: 2_000,
      collect: async () => sample,
      send: async (report) => {
        sent.push(report)
        return 'ok'
      },
      onNotJoined: () => {},
    })
    reporter.start()
    await vi.advanceTimersByTimeAsync(0)
    expect(sent.map((r) => r.seq)).toEqual([1])
    await vi.advanceTimersByTimeAsync(1_999)
    expect(sent).toHaveLength(1)
    await vi.advanceTimersByTimeAsync(1)
    await vi.advanceTimersByTimeAsync(4_000)
    expect(sent.map((r) => r.seq)).toEqual([1, 2, 3, 4])
    expect(sent[0]).toEqual({ ...sample, v: 1, seq: 1 })
    reporter.stop()
    await vi.advanceTimersByTimeAsync(10_000)
    expect(sent).toHaveLength(4)
    expect(vi.getTimerCount()).toBe(0)
  })

  it('never overlaps sends: ticks during a slow send are skipped', async () => {
    const { calls, send } = controlledSend()
    const reporter = new TelemetryReporter({
      intervalMs: 1_000,
      collect: async () => sample,
      send,
      onNotJoined: () => {},
    })
    reporter.start()
    await vi.advanceTimersByTimeAsync(3_500)
    expect(calls).toHaveLength(1)
    calls[0]!.answer('ok')
    await vi.advanceTimersByTimeAsync(500)
    expect(calls).toHaveLength(2)
    expect(calls[1]!.report.seq).toBe(2)
    reporter.stop()
    expect(calls[1]!.signal.aborted).toBe(true)
  })

  it('reports a failing send and tries again at the next tick', async () => {
    const { calls, send } = controlledSend()
    const errors: string[] = []
    const reporter = new TelemetryReporter({
      intervalMs: 1_000,
      collect: async () => sample,
      send,
      onNotJoined: () => {},
      onError: (err) => errors.push(err.message),
    })
    reporter.start()
    await vi.advanceTimersByTimeAsync(0)
    calls[0]!.fail(new Error('head unreachable'))
    await vi.advanceTimersByTimeAsync(0)
    expect(errors).toEqual(['head unreachable'])
    expect(calls).toHaveLength(1)
    await vi.advanceTimersByTimeAsync(1_000)
    expect(calls).toHaveLength(2)
    calls[1]!.answer('ok')
    await vi.advanceTimersByTimeAsync(0)
    expect(errors).toHaveLength(1)
    reporter.stop()
  })

  it('a failing collect is an error too, not a stuck reporter', async () => {
    const errors: string[] = []
    let broken = true
    const sent: number[] = []
    const reporter = new TelemetryReporter({
      intervalMs: 1_000,
      collect: async () => {
        if (broken) throw new Error('engine metrics unreachable')
        return sample
      },
      send: async (r) => {
        sent.push(r.seq)
        return 'ok'
      },
      onNotJoined: () => {},
      onError: (err) => errors.push(err.message),
    })
    reporter.start()
    await vi.advanceTimersByTimeAsync(0)
    broken = false
    await vi.advanceTimersByTimeAsync(1_000)
    expect(errors).toEqual(['engine metrics unreachable'])
    expect(sent).toEqual([1])
    reporter.stop()
  })

  it('calls onNotJoined on each not_joined answer and keeps reporting', async () => {
    let joined = false
    let notJoined = 0
    const reporter = new TelemetryReporter({
      intervalMs: 1_000,
      collect: async () => sample,
      send: async () => (joined ? 'ok' : 'not_joined'),
      onNotJoined: () => {
        notJoined += 1
        if (notJoined === 2) joined = true
      },
    })
    reporter.start()
    await vi.advanceTimersByTimeAsync(5_000)
    expect(notJoined).toBe(2)
    expect(reporter.running).toBe(true)
    reporter.stop()
    expect(reporter.running).toBe(false)
  })

  it('ignores the answer of a send that was in flight when it stopped', async () => {
    const { calls, send } = controlledSend()
    let notJoined = 0
    const reporter = new TelemetryReporter({
      intervalMs: 1_000,
      collect: async () => sample,
      send,
      onNotJoined: () => {
        notJoined += 1
      },
    })
    reporter.start()
    await vi.advanceTimersByTimeAsync(0)
    reporter.stop()
    expect(calls[0]!.signal.aborted).toBe(true)
    // a restart does not wait for the aborted send
    reporter.start()
    await vi.advanceTimersByTimeAsync(0)
    expect(calls).toHaveLength(2)
    calls[0]!.answer('not_joined')
    await vi.advanceTimersByTimeAsync(0)
    expect(notJoined).toBe(0)
    reporter.stop()
  })
})
