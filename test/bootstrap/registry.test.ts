import { afterEach, describe, expect, it, vi } from 'vitest'
import { firstReportMaxSeq, NodeRegistry, type NodeRegistryEvents } from '../../bootstrap/head/registry.ts'
import { telemetryDeadlineMs } from '../../mesh/protocols.ts'
import type { Assignment, CapabilityReport, TelemetryReport } from '../../mesh/region-messages.ts'

const report = (peerId: string): CapabilityReport => ({
  v: 1,
  peerId,
  region: 'eu-north',
  daemonVersion: '0.1.0',
  issuedAt: 0,
  hardware: { gpus: [], ramMiB: 16_384, cpuCores: 8 },
  engines: ['llamacpp'],
  vramCapMiB: 0,
  ramCapMiB: 8_192,
  hostPolicy: { state: 'clear' },
  rayOptIn: false,
})

const assignment = (model: string): Assignment => ({
  v: 1,
  region: 'eu-north',
  head: 'head',
  model,
  engine: 'llamacpp',
  source: { gguf: model },
  engineArgs: {},
  telemetryIntervalMs: 2_000,
})

const telemetry = (seq: number, over: Partial<TelemetryReport> = {}): TelemetryReport => ({
  v: 1,
  seq,
  state: 'serving',
  model: 'garage-tiny',
  tokensTotal: seq * 10,
  promptTokensTotal: 0,
  tokensPerSecond: 5,
  running: 0,
  waiting: 0,
  kvCacheUsage: 0,
  ...over,
})

/** Records every event a registry sends, in order. */
function record(registry: NodeRegistry): string[] {
  const log: string[] = []
  registry.addEventListener('node:joined', (e) =>
    log.push(`joined ${e.detail.peerId} ${e.detail.assignment.model}`),
  )
  registry.addEventListener('node:left', (e) => log.push(`left ${e.detail.peerId} ${e.detail.reason}`))
  registry.addEventListener('node:state', (e) =>
    log.push(`state ${e.detail.peerId} ${e.detail.previous}->${e.detail.state}`),
  )
  return log
}

describe('NodeRegistry', () => {
  afterEach(() => {
    vi.useRealTimers()
  })

  it('joins a node as starting, with its report, assignment and join time', () => {
    let t = 1_000
    const registry = new NodeRegistry({ now: () => t })
    const events = record(registry)
    registry.join('A', report('A'), assignment('garage-tiny'))
    t = 1_500
    expect(registry.get('A')).toEqual({
      peerId: 'A',
      report: report('A'),
      assignment: assignment('garage-tiny'),
      joinedAt: 1_000,
      lastSeen: 1_000,
      telemetry: null,
      state: 'starting',
    })
    expect(registry.nodes().map((n) => n.peerId)).toEqual(['A'])
    expect(events).toEqual(['joined A garage-tiny'])
  })

  it('a report numbered before the node joined again (it crossed the join) is stale; the new numbering is taken', () => {
    const registry = new NodeRegistry()
    registry.join('A', report('A'), assignment('garage-tiny'))
    for (let seq = 1; seq <= 40; seq++) registry.report('A', telemetry(seq))
    // The node joins again and numbers from 1; its report 41, sent before, arrives after the join.
    registry.join('A', report('A'), assignment('garage-tiny'))
    expect(registry.report('A', telemetry(41, { tokensTotal: 2151 }))).toBe('stale')
    expect(registry.get('A')?.telemetry).toBeNull()
    expect(registry.report('A', telemetry(1, { state: 'serving' }))).toBe('ok')
    expect(registry.report('A', telemetry(2, { state: 'serving' }))).toBe('ok')
    expect(registry.get('A')?.telemetry?.seq).toBe(2)
    // Reports 1-4 lost on the way: the fifth is still this entry's first.
    registry.join('A', report('A'), assignment('garage-tiny'))
    expect(registry.report('A', telemetry(firstReportMaxSeq))).toBe('ok')
    // A node that goes on with its old numbering (an older daemon): held once, then taken.
    registry.join('A', report('A'), assignment('garage-tiny'))
    expect(registry.report('A', telemetry(90))).toBe('stale')
    expect(registry.report('A', telemetry(91, { state: 'serving' }))).toBe('ok')
    expect(registry.get('A')?.telemetry?.seq).toBe(91)
  })

  it('answers not_joined to telemetry from a stranger', () => {
    const registry = new NodeRegistry()
    expect(registry.report('B', telemetry(1))).toBe('not_joined')
    expect(registry.size).toBe(0)
  })

  it('keeps the latest telemetry, ignores reordered reports, and says when the state changes', () => {
    let t = 0
    const registry = new NodeRegistry({ now: () => t })
    const events = record(registry)
    registry.join('A', report('A'), assignment('garage-tiny'))
    t = 100
    expect(registry.report('A', telemetry(2))).toBe('ok')
    t = 200
    expect(registry.report('A', telemetry(1, { state: 'paused' }))).toBe('stale')
    expect(registry.report('A', telemetry(2, { state: 'paused' }))).toBe('stale')
    expect(registry.get('A')?.telemetry?.seq).toBe(2)
    expect(registry.get('A')?.state).toBe('serving')
    expect(registry.get('A')?.lastSeen).toBe(100)
    t = 300
    registry.report('A', telemetry(3, { state: 'serving' }))
    registry.report('A', telemetry(4, { state: 'paused' }))
    registry.report('A', telemetry(5, { state: 'draining' }))
    expect(registry.get('A')?.lastSeen).toBe(300)
    expect(events).toEqual([
      'joined A garage-tiny',
      'state A starting->serving',
      'state A serving->paused',
      'state A paused->draining',
    ])
  })

  it('hands listeners entries that do not change under them', () => {
    const registry = new NodeRegistry({ now: () => 0 })
    const seen: Array<NodeRegistryEvents['node:state']['detail']> = []
    registry.addEventListener('node:state', (e) => seen.push(e.detail))
    registry.join('A', report('A'), assignment('garage-tiny'))
    registry.report('A', telemetry(1))
    registry.report('A', telemetry(2, { state: 'paused' }))
    expect(seen[0]?.entry.state).toBe('serving')
    expect(seen[0]?.entry.telemetry?.seq).toBe(1)
  })

  it('a node that joins again gets a fresh entry and seq', () => {
    let t = 0
    const registry = new NodeRegistry({ now: () => t })
    const events = record(registry)
    registry.join('A', report('A'), assignment('garage-tiny'))
    registry.report('A', telemetry(9))
    t = 50
    registry.join('A', report('A'), assignment('llama'))
    expect(registry.get('A')?.telemetry).toBeNull()
    expect(registry.get('A')?.joinedAt).toBe(50)
    expect(registry.report('A', telemetry(1))).toBe('ok')
    expect(registry.get('A')?.telemetry?.seq).toBe(1)
    expect(events.filter((e) => e.startsWith('joined'))).toEqual(['joined A garage-tiny', 'joined A llama'])
    expect(registry.size).toBe(1)
  })

  it('removes a node that leaves, once', () => {
    const registry = new NodeRegistry()
    const events = record(registry)
    registry.join('A', report('A'), assignment('garage-tiny'))
    expect(registry.leave('A')).toBe(true)
    expect(registry.leave('A')).toBe(false)
    expect(registry.get('A')).toBeUndefined()
    expect(events).toEqual(['joined A garage-tiny', 'left A leave'])
    expect(registry.report('A', telemetry(1))).toBe('not_joined')
  })

  it('evicts nodes silent past the deadline, and only them', () => {
    let t = 0
    const registry = new NodeRegistry({ now: () => t, deadlineMs: 7_000 })
    const events = record(registry)
    registry.join('A', report('A'), assignment('garage-tiny'))
    registry.join('B', report('B'), assignment('garage-tiny'))
    t = 5_000
    registry.report('B', telemetry(1))
    t = 7_000
    expect(registry.evictSilent()).toEqual([])
    t = 7_001
    expect(registry.evictSilent().map((e) => e.peerId)).toEqual(['A'])
    t = 12_001
    expect(registry.evictSilent().map((e) => e.peerId)).toEqual(['B'])
    expect(registry.size).toBe(0)
    expect(events.slice(-2)).toEqual(['left A evicted', 'left B evicted'])
  })

  it("evicts on its own timer between start() and stop(), with the protocol's deadline by default", async () => {
    vi.useFakeTimers()
    const registry = new NodeRegistry({ now: () => Date.now() })
    const events = record(registry)
    registry.join('A', report('A'), assignment('garage-tiny'))
    registry.start()
    await vi.advanceTimersByTimeAsync(telemetryDeadlineMs)
    expect(registry.size).toBe(1)
    await vi.advanceTimersByTimeAsync(telemetryDeadlineMs)
    expect(events).toContain('left A evicted')
    registry.stop()
    expect(vi.getTimerCount()).toBe(0)
  })

  it('counts replicas per model, leaving out draining nodes and a node joining again', () => {
    const registry = new NodeRegistry()
    registry.join('A', report('A'), assignment('garage-tiny'))
    registry.join('B', report('B'), assignment('garage-tiny'))
    registry.join('C', report('C'), assignment('llama'))
    registry.join('D', report('D'), assignment('llama'))
    registry.report('D', telemetry(1, { state: 'draining' }))
    expect(registry.replicasByModel()).toEqual(
      new Map([
        ['garage-tiny', 2],
        ['llama', 1],
      ]),
    )
    expect(registry.replicasByModel({ except: 'A' }).get('garage-tiny')).toBe(1)
  })
})
