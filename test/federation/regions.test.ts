import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest'
import type { BootstrapNode } from '../../bootstrap/bootstrap-node.ts'
import { type RegionalHead, startRegionalHead } from '../../bootstrap/head/head.ts'
import { parseRegionPolicy, type RegionPolicy } from '../../bootstrap/head/policy.ts'
import { capabilityFromHardware } from '../../daemon/node-daemon.ts'
import {
  defaultDiscoveryIntervalMs,
  headPerRegion,
  parseRegionHolds,
  parseRegionModels,
  RegionDirectory,
  type RegionStatus,
} from '../../federation/regions.ts'
import type { Authority } from '../../mesh/authority.ts'
import { signCapabilityReport } from '../../mesh/capability-report.ts'
import { issueRegionCertificate } from '../../mesh/certificate.ts'
import { type DiscoveredHead, RegionDiscovery } from '../../mesh/discovery.ts'
import { handleInferProtocol, type InferReply } from '../../mesh/infer-protocol.ts'
import { requestJoin } from '../../mesh/join-protocol.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { sendTelemetry } from '../../mesh/telemetry-protocol.ts'
import { cpuOnlyMachine } from '../helpers/hardware.ts'
import { day, dialAddr, TestMesh, waitForEvent } from '../helpers/mesh.ts'
import { tinyModel, tinyPolicy } from '../helpers/region.ts'

const machine = cpuOnlyMachine()

const otherModel = 'garage-other'

/** us-east serves two models, one node each (equal replicas: the first join takes the first model). */
function twoModelPolicy(region: string): RegionPolicy {
  const model = (name: string): Record<string, unknown> => ({
    name,
    engine: ['llamacpp'],
    source: { gguf: 'garage-tiny' },
    replicas: 1,
    minVramMiB: 0,
    minRamMiB: 16,
    parallel: 2,
  })
  return parseRegionPolicy({ region, models: [model(tinyModel), model(otherModel)], ray: { enabled: false } })
}

/** Rounds until `done` holds: each round is real discovery and status work, bounded by `timeoutMs`. */
async function refreshUntil(
  directory: RegionDirectory,
  done: () => boolean,
  what: string,
  timeoutMs = 20_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  await directory.refresh()
  while (!done()) {
    if (Date.now() > deadline) {
      throw new Error(
        `${what} not seen within ${timeoutMs} ms: ${JSON.stringify(describeRegions(directory))}`,
      )
    }
    await directory.refresh()
  }
}

function describeRegions(directory: RegionDirectory): unknown {
  return directory.regions().map((r) => ({ ...r, models: Object.fromEntries(r.models) }))
}

function collect(directory: RegionDirectory): Array<{ type: string; region: string; reachable: boolean }> {
  const events: Array<{ type: string; region: string; reachable: boolean }> = []
  for (const type of ['region:added', 'region:updated', 'region:unreachable', 'region:removed'] as const) {
    directory.addEventListener(type, (evt) =>
      events.push({ type, region: evt.detail.region, reachable: evt.detail.reachable }),
    )
  }
  return events
}

describe('RegionDirectory against real heads', () => {
  const mesh = new TestMesh()
  let authority: Authority
  const bootstraps: Record<string, BootstrapNode> = {}
  const heads: Record<string, RegionalHead> = {}
  let federation: MeshNode
  let addrs: string[]

  /** A raw mesh node joins `region` with a signed report and tells the head it serves. */
  async function serveOne(region: string): Promise<string> {
    const key: PrivateKey = await generateKeyPair('Ed25519')
    const node = await createMeshNode({
      privateKey: key,
      listen: ['/ip4/127.0.0.1/tcp/0'],
      bootstrap: [dialAddr(bootstraps[region]!)],
      allowPrivateAddresses: true,
    })
    mesh.track(async () => {
      await node.stop()
    })
    const head = bootstraps[region]!.peerId
    const report = capabilityFromHardware(node.peerId.toString(), region, machine, { daemonVersion: 'test' })
    const assignment = await requestJoin(node, head, await signCapabilityReport(key, report), {
      signal: AbortSignal.timeout(10_000),
    })
    const ack = await sendTelemetry(node, head, {
      v: 1,
      seq: 1,
      state: 'serving',
      model: assignment.model,
      tokensTotal: 0,
      promptTokensTotal: 0,
      tokensPerSecond: 0,
      running: 0,
      waiting: 0,
      kvCacheUsage: 0,
    })
    expect(ack).toBe('ok')
    return assignment.model
  }

  beforeAll(async () => {
    authority = await mesh.authority()
    const eu = await mesh.bootstrap(authority, 'eu-north')
    const us = await mesh.bootstrap(authority, 'us-east', { bootstrap: [dialAddr(eu)] })
    bootstraps['eu-north'] = eu
    bootstraps['us-east'] = us
    addrs = [dialAddr(eu), dialAddr(us)]
    federation = await mesh.node(addrs)
    for (const [region, policy] of [
      ['eu-north', tinyPolicy('eu-north')],
      ['us-east', twoModelPolicy('us-east')],
    ] as const) {
      const head = await startRegionalHead({
        node: bootstraps[region]!.node,
        region,
        policy,
        dataDir: await mesh.tempDir('garage-head-'),
        httpPort: 0,
        federationPeers: [federation.peerId.toString()],
        // Raw nodes report once; they must not be evicted while the suite runs.
        telemetryDeadlineMs: 10 * 60_000,
      })
      heads[region] = head
      mesh.track(() => head.stop())
    }
    expect(await serveOne('eu-north')).toBe(tinyModel)
    expect(await serveOne('us-east')).toBe(tinyModel)
    expect(await serveOne('us-east')).toBe(otherModel)
  })
  afterAll(() => mesh.cleanup())

  it('discovers both regions and reads what each serves, on its own timers', async () => {
    const directory = new RegionDirectory(federation, {
      authority: authority.id,
      refreshIntervalMs: 100,
      discoveryIntervalMs: 300,
    })
    mesh.track(() => directory.stop())
    const updated = (region: string): Promise<RegionStatus> =>
      waitForEvent<RegionStatus>(directory, 'region:updated', (s) => s.region === region, 20_000)
    const both = Promise.all([updated('eu-north'), updated('us-east')])
    // Before its first round the directory knows nothing: the gateway answers "retry", not "no such model".
    expect(directory.warm).toBe(false)
    directory.start()
    directory.start()
    const [eu, us] = await both
    await directory.refresh()
    expect(directory.warm).toBe(true)
    expect(eu).toMatchObject({
      region: 'eu-north',
      head: bootstraps['eu-north']!.peerId.toString(),
      reachable: true,
      error: null,
    })
    expect(eu.rttMs).toBeGreaterThanOrEqual(0)
    expect(eu.updatedAt).toBeGreaterThan(0)
    expect(eu.expiresAt).toBeGreaterThan(Date.now() + 29 * day)
    // One node on the tiny model, unmeasured (capacity 0 until the head has measured it), 2 slots.
    expect(Object.fromEntries(eu.models)).toEqual({
      [tinyModel]: { nodes: 1, capacityTokensPerSecond: 0, inflight: 0, slots: 2 },
    })
    expect(us.head).toBe(bootstraps['us-east']!.peerId.toString())
    expect([...us.models.keys()].sort()).toEqual([otherModel, tinyModel])
    expect(directory.regions().map((r) => r.region)).toEqual(['eu-north', 'us-east'])
    expect(directory.region('us-east')).not.toBeNull()
    expect(directory.region('nowhere')).toBeNull()
    expect(directory.modelsUnion()).toEqual([
      { model: otherModel, regions: ['us-east'], nodes: 1 },
      { model: tinyModel, regions: ['eu-north', 'us-east'], nodes: 2 },
    ])
    await directory.stop()
  })

  it('stops cleanly in the middle of a round: nothing runs or is sent after stop()', async () => {
    const directory = new RegionDirectory(federation, { authority: authority.id })
    let stopped = false
    let afterStop = 0
    for (const type of ['region:added', 'region:updated', 'region:unreachable', 'region:removed'] as const) {
      directory.addEventListener(type, () => {
        if (stopped) afterStop++
      })
    }
    directory.start()
    const pending = directory.refresh()
    await directory.stop()
    stopped = true
    await pending
    expect(afterStop).toBe(0)
    // The discovery round was cut short, and no status round started after it.
    expect(directory.regions()).toEqual([])
  })

  it('gets no status as a federation peer the heads do not allow: the head resets the stream', async () => {
    const stranger = await mesh.node(addrs)
    const directory = new RegionDirectory(stranger, { authority: authority.id })
    const events = collect(directory)
    await refreshUntil(directory, () => directory.regions().length >= 2, 'two regions')
    for (const r of directory.regions()) {
      expect(r.reachable).toBe(false)
      expect(r.models.size).toBe(0)
      expect(r.updatedAt).toBeNull()
      expect(r.error?.name).toBe('InferStreamError')
    }
    expect(directory.modelsUnion()).toEqual([])
    // Reported once per region, not once per failed round.
    await directory.refresh({ discover: false })
    expect(
      events
        .filter((e) => e.type === 'region:unreachable')
        .map((e) => e.region)
        .sort(),
    ).toEqual(['eu-north', 'us-east'])
    expect(events.some((e) => e.type === 'region:updated')).toBe(false)

    // Once the head trusts it, the same directory reads the region.
    heads['eu-north']!.allowFederation(stranger.peerId.toString())
    await directory.refresh({ discover: false })
    expect(directory.region('eu-north')).toMatchObject({ reachable: true, error: null })
    expect(directory.modelsUnion()).toEqual([{ model: tinyModel, regions: ['eu-north'], nodes: 1 }])
  })

  it('survives a certified "head" that answers garbage, and keeps only the items that parse', async () => {
    const hostile = await mesh.bootstrap(authority, 'hostile', { bootstrap: addrs })
    let answer: (reply: InferReply, signal: AbortSignal) => Promise<void> = (reply) =>
      reply.respond(200, [['content-type', 'application/json']], Buffer.from('{"object": "list", "da'))
    await handleInferProtocol(hostile.node, {
      allow: () => true,
      handle: (_request, reply, signal) => answer(reply, signal),
    })
    const directory = new RegionDirectory(federation, { authority: authority.id, statusTimeoutMs: 500 })
    const events = collect(directory)
    await refreshUntil(directory, () => directory.region('hostile') != null, 'the hostile region')
    const status = (): RegionStatus => directory.region('hostile')!
    expect(status()).toMatchObject({ reachable: false, error: { name: 'RegionStatusError' } })

    const round = async (next: typeof answer): Promise<RegionStatus> => {
      answer = next
      await directory.refresh({ discover: false })
      return status()
    }
    const json =
      (value: unknown, code = 200) =>
      (reply: InferReply) =>
        reply.respond(code, [['content-type', 'application/json']], Buffer.from(JSON.stringify(value)))

    expect((await round(json({ object: 'list', data: 'nope' }))).error?.name).toBe('RegionStatusError')
    expect((await round(json([1, 2, 3]))).error?.name).toBe('RegionStatusError')
    expect((await round(json({ object: 'list', data: [] }, 500))).error?.name).toBe('RegionStatusError')
    expect((await round((reply) => reply.error('internal_error', 'no'))).error?.name).toBe('InferRemoteError')
    // An endless body is cut at 1 MiB.
    const big = await round(async (reply) => {
      await reply.head(200, [])
      const chunk = new Uint8Array(64 * 1024).fill(0x20)
      for (let i = 0; i < 32; i++) await reply.data(chunk)
      await reply.end()
    })
    expect(big.error?.name).toBe('RegionStatusError')
    // A head that never answers costs statusTimeoutMs and no more.
    const silent = await round(
      (_reply, signal) =>
        new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve(), { once: true })),
    )
    expect(silent.error?.name).toBe('RegionStatusTimeoutError')
    expect(events.filter((e) => e.type === 'region:unreachable' && e.region === 'hostile')).toHaveLength(1)

    const item = (id: unknown, garage: unknown) => ({
      id,
      object: 'model',
      created: 0,
      owned_by: 'x',
      garage,
    })
    const good = { region: 'hostile', nodes: 2, capacityTokensPerSecond: 12.5, inflight: 1, slots: 4 }
    const mixed = await round(
      json({
        object: 'list',
        data: [
          item('ok-model', good),
          item('ok-model', { ...good, nodes: 99 }),
          item('other-region', { ...good, region: 'eu-north' }),
          item('negative', { ...good, nodes: -1 }),
          item('fraction', { ...good, inflight: 0.5 }),
          item('huge', { ...good, capacityTokensPerSecond: 1e300 }),
          item('string', { ...good, slots: '4' }),
          item('no-garage', null),
          item('bad name with spaces', good),
          item(42, good),
          null,
          'text',
        ],
      }),
    )
    expect(mixed).toMatchObject({ reachable: true, error: null })
    expect(Object.fromEntries(mixed.models)).toEqual({
      'ok-model': { nodes: 2, capacityTokensPerSecond: 12.5, inflight: 1, slots: 4 },
    })
    // The real regions were read all along.
    expect(directory.region('eu-north')?.reachable).toBe(true)
    expect(directory.modelsUnion().find((m) => m.model === 'ok-model')).toEqual({
      model: 'ok-model',
      regions: ['hostile'],
      nodes: 2,
    })
  })

  it('marks a head that stops unreachable, and removes the region once discovery no longer finds it', async () => {
    const directory = new RegionDirectory(federation, { authority: authority.id, regionGoneAfterMs: 0 })
    await refreshUntil(
      directory,
      () =>
        directory.region('us-east')?.reachable === true && directory.region('eu-north')?.reachable === true,
      'both regions reachable',
    )
    const events = collect(directory)
    await heads['us-east']!.stop()
    await directory.refresh({ discover: false })
    expect(directory.region('us-east')).toMatchObject({ reachable: false })
    // It keeps its last models for /health, but the union lists reachable regions only.
    expect(directory.region('us-east')!.models.size).toBe(2)
    expect(directory.modelsUnion().filter((m) => m.model !== 'ok-model')).toEqual([
      { model: tinyModel, regions: ['eu-north'], nodes: 1 },
    ])
    expect(events).toContainEqual({ type: 'region:unreachable', region: 'us-east', reachable: false })
    expect(events).toContainEqual({ type: 'region:updated', region: 'eu-north', reachable: true })

    await bootstraps['us-east']!.stop()
    await refreshUntil(directory, () => directory.region('us-east') == null, 'us-east removed')
    expect(events).toContainEqual({ type: 'region:removed', region: 'us-east', reachable: false })
    expect(directory.region('eu-north')?.reachable).toBe(true)
  })
})

describe('RegionDirectory: a discovery round that misses a region', () => {
  const mesh = new TestMesh()
  afterAll(() => mesh.cleanup())

  it('keeps a region whose head answers its status, or is down for a moment; drops it once gone for longer', async () => {
    const authority = await mesh.authority()
    const boot = await mesh.bootstrap(authority, 'eu-north')
    const federation = await mesh.node([dialAddr(boot)])
    const startHead = async (): Promise<RegionalHead> => {
      const head = await startRegionalHead({
        node: boot.node,
        region: 'eu-north',
        policy: tinyPolicy('eu-north'),
        dataDir: await mesh.tempDir('garage-head-'),
        httpPort: 0,
        federationPeers: [federation.peerId.toString()],
      })
      mesh.track(() => head.stop())
      return head
    }
    let head = await startHead()
    let clock = Date.now()
    const directory = new RegionDirectory(federation, { authority: authority.id, now: () => clock })
    await refreshUntil(
      directory,
      () => directory.region('eu-north')?.reachable === true,
      'eu-north reachable',
    )
    const events = collect(directory)
    // The DHT lookup comes back without the region's record (what a restarted head's region saw).
    const missed = vi.spyOn(RegionDiscovery.prototype, 'discover').mockResolvedValue([])
    try {
      await directory.refresh()
      expect(directory.region('eu-north')).toMatchObject({ reachable: true })
      // The head goes down, a round misses it: listed still, unreachable, and taken back once it answers.
      await head.stop()
      await directory.refresh()
      expect(directory.region('eu-north')).toMatchObject({ reachable: false })
      head = await startHead()
      await directory.refresh({ discover: false })
      expect(directory.region('eu-north')).toMatchObject({ reachable: true })
      expect(events.filter((e) => e.type === 'region:removed')).toEqual([])
      // Gone for longer than two discovery intervals: dropped.
      await head.stop()
      await boot.stop()
      await directory.refresh()
      expect(directory.region('eu-north')).toMatchObject({ reachable: false })
      // The first round that finds it both unreachable and unfound starts the count.
      await directory.refresh()
      expect(directory.region('eu-north')).toMatchObject({ reachable: false })
      clock += 2 * defaultDiscoveryIntervalMs
      await directory.refresh()
      expect(directory.region('eu-north')).toBeNull()
      expect(events).toContainEqual({ type: 'region:removed', region: 'eu-north', reachable: false })
    } finally {
      missed.mockRestore()
    }
  })
})

describe('RegionDirectory: two certified heads for one region', () => {
  const mesh = new TestMesh()
  afterAll(() => mesh.cleanup())

  it('keeps the head whose certificate expires later', async () => {
    const authority = await mesh.authority()
    const certificate = (ttlMs: number) => (peerId: string) =>
      issueRegionCertificate(authority.key, { region: 'dup', head: peerId, addrs: [], ttlMs })
    const older = await mesh.bootstrap(authority, 'dup', { certificate: certificate(10 * day) })
    const newer = await mesh.bootstrap(authority, 'dup', {
      certificate: certificate(30 * day),
      bootstrap: [dialAddr(older)],
    })
    const federation = await mesh.node([dialAddr(older), dialAddr(newer)])
    const directory = new RegionDirectory(federation, { authority: authority.id })
    // Both heads must be in one round for the choice to be tested.
    await refreshUntil(directory, () => directory.heads().filter((h) => h.valid).length === 2, 'both heads')
    expect(directory.regions().map((r) => r.region)).toEqual(['dup'])
    expect(directory.region('dup')!.head).toBe(newer.peerId.toString())
    // Neither runs a head API: found, but not reachable.
    expect(directory.region('dup')!.reachable).toBe(false)
  })
})

describe('parseRegionHolds', () => {
  it("reads a head's quarantines beside its models, ignoring what does not parse", () => {
    const hold = { node: '12D3KooWx', since: 1_796_586_721_967, reason: 'answers unlikely', tokens: 40 }
    const body = (held: unknown, region = 'r') => ({ object: 'list', data: [], garage: { region, held } })
    expect(parseRegionHolds(body([hold, { ...hold, tokens: -1 }, 'x', { ...hold, node: '' }]), 'r')).toEqual([
      { ...hold, region: 'r' },
    ])
    expect(parseRegionHolds(body([hold], 'other'), 'r')).toEqual([])
    expect(parseRegionHolds({ object: 'list', data: [] }, 'r')).toEqual([])
  })
})

describe('headPerRegion and parseRegionModels', () => {
  const head = (peerId: string, over: Partial<DiscoveredHead>): DiscoveredHead => ({
    peerId,
    region: 'r',
    addrs: [],
    rttMs: 10,
    expiresAt: new Date(1_000_000),
    valid: true,
    reason: null,
    certificate: null,
    status: null,
    ...over,
  })

  it('keeps one valid head per region: later expiry, then lower RTT, then lower PeerId', () => {
    const chosen = (heads: DiscoveredHead[]): string | undefined => headPerRegion(heads).get('r')?.peerId
    expect(chosen([head('a', {}), head('b', { expiresAt: new Date(2_000_000), rttMs: 500 })])).toBe('b')
    expect(chosen([head('a', { rttMs: 30 }), head('b', { rttMs: 20 })])).toBe('b')
    expect(chosen([head('b', { rttMs: 20 }), head('a', { rttMs: 20 })])).toBe('a')
    expect(chosen([head('a', { rttMs: null }), head('b', { rttMs: 900 })])).toBe('b')
    expect(chosen([head('a', { valid: false, expiresAt: new Date(9_000_000) }), head('b', {})])).toBe('b')
    expect(headPerRegion([head('a', { valid: false })]).size).toBe(0)
    expect([...headPerRegion([head('a', {}), head('b', { region: 's' })]).keys()].sort()).toEqual(['r', 's'])
  })

  it('refuses a body that is not an OpenAI list and never throws on a hostile item', () => {
    for (const body of [null, 'list', 42, [], {}, { object: 'list' }, { object: 'x', data: [] }]) {
      expect(() => parseRegionModels(body, 'r')).toThrow(
        expect.objectContaining({ name: 'RegionStatusError' }),
      )
    }
    const data = Array.from({ length: 5000 }, (_, i) => ({
      id: `m${i}`,
      object: 'model',
      garage: { region: 'r', nodes: 1, capacityTokensPerSecond: 1, inflight: 0, slots: 1 },
    }))
    // Only the first 1024 items are looked at.
    expect(parseRegionModels({ object: 'list', data }, 'r').size).toBe(1024)
  })
})
