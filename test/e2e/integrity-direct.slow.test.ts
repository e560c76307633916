import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { writeTinyModel } from '../../daemon/engines/llamacpp/tiny-model.ts'
import { serveInferOverMesh } from '../../daemon/infer-handler.ts'
import type { NodeDaemon } from '../../daemon/node-daemon.ts'
import { type Federation, startFederation } from '../../federation/gateway.ts'
import type { IntegritySample } from '../../openai/integrity.ts'
import { sendMixed, startRandomTextEngine } from '../helpers/integrity-cheats.ts'
import { dialAddr, TestMesh } from '../helpers/mesh.ts'
import { startTestRegion, type TestRegion, tinyPolicy } from '../helpers/region.ts'

/**
 * Result integrity on the direct path (real daemons, real llama.cpp, a real federation gateway):
 * the head sees none of the answers a node serves straight to the gateway, so the gateway samples
 * them at the rate each lease carries and ships the samples in its lease reports. A node that
 * answers random text to the gateway's direct requests is quarantined from those samples alone,
 * and then gets no more leases.
 */

const model = 'garage-tiny-sharp'
/** A peaked tiny model (the default one is nearly flat: docs/integrity.md). */
const logitScale = 16
const maxTokensPerSecond = 300

describe('result integrity on the direct path (slow)', () => {
  const mesh = new TestMesh()
  let region: TestRegion
  let federation: Federation
  let apiKey = ''
  const honest: NodeDaemon[] = []
  let cheat = ''
  const paths = new Map<string, number>()
  const servedBy = new Map<string, number>()
  /** x-request-id of the answers that came straight from a node. */
  const directIds = new Set<string>()

  async function viaHead(i: number): Promise<void> {
    await sendMixed(region.head.url, region.head.apiToken, i, model)
  }

  async function viaFederation(i: number): Promise<void> {
    const res = await sendMixed(federation.url, apiKey, i, model)
    const path_ = res.headers.get('x-garage-path') ?? 'none'
    paths.set(path_, (paths.get(path_) ?? 0) + 1)
    if (path_ === 'direct') directIds.add(res.headers.get('x-request-id') ?? '')
    const node = res.headers.get('x-garage-node')
    if (res.status === 200 && node != null) servedBy.set(node, (servedBy.get(node) ?? 0) + 1)
  }

  /** `send` 4 at a time until `done()` or `max` requests, the sampled checks done between rounds of 20. */
  async function traffic(
    send: (i: number) => Promise<void>,
    max: number,
    done: () => boolean,
  ): Promise<number> {
    let next = 0
    while (next < max && !done()) {
      const end = Math.min(max, next + 20)
      const worker = async (): Promise<void> => {
        while (next < end) await send(next++)
      }
      await Promise.all(Array.from({ length: 4 }, worker))
      // Samples travel in the gateway's next report: send it now, then let the checks run.
      await federation?.direct?.flush()
      await region.head.integrity!.idle()
    }
    return next
  }

  beforeAll(async () => {
    const dir = await mesh.tempDir('garage-integrity-direct-')
    await writeTinyModel(join(dir, 'sharp.gguf'), { logitScale })
    region = await startTestRegion(mesh, 'integrity-direct', {
      integrity: { maxQueued: 1024, probationChecks: 4 },
      policy: tinyPolicy('integrity-direct', {
        name: model,
        source: { gguf: join(dir, 'sharp.gguf') },
        replicas: 4,
        parallel: 4,
        contextLength: 512,
        vocabularySize: 270,
      }),
    })
    for (let n = 0; n < 2; n++) honest.push(await region.addNode({ maxTokensPerSecond }))
    // The honest nodes are established through the head first: they verify the cheat's answers.
    const established = (): boolean =>
      honest.every((n) => region.head.integrity!.status(n.peerId!).state === 'established')
    await traffic(viaHead, 200, established)
    expect(established()).toBe(true)

    const random = await startRandomTextEngine()
    mesh.track(() => random.close())
    const node = await region.addNode({
      maxTokensPerSecond,
      components: {
        serveInfer: async (mn, o) =>
          serveInferOverMesh(mn, { ...o, engine: () => (o.engine() == null ? null : random) }),
      },
    })
    cheat = node.peerId!

    federation = await startFederation({
      dataDir: await mesh.tempDir('garage-federation-'),
      authority: region.authority.id,
      bootstrap: [dialAddr(region.bootstrap)],
      listen: ['/ip4/127.0.0.1/tcp/0'],
      allowPrivateAddresses: true,
      httpPort: 0,
    })
    mesh.track(() => federation.stop())
    region.head.allowFederation(federation.peerId.toString())
    apiKey = (await federation.keys.create({ name: 'direct' })).key
    await federation.directory.refresh()
  }, 120_000)

  afterAll(() => mesh.cleanup())

  it('catches a cheat that serves the gateway directly, from the samples in its lease reports', async () => {
    const integrity = region.head.integrity!
    expect(integrity.status(cheat).checks).toBe(0)
    // Every sample the head takes, from its own answers or the gateway's reports.
    const considered: IntegritySample[] = []
    const consider = integrity.consider.bind(integrity)
    integrity.consider = (sample) => {
      considered.push(sample)
      return consider(sample)
    }
    // The gateway's leases first (its first request asks for them): then the traffic goes direct.
    await traffic(viaFederation, 1, () => false)
    const leased = Date.now() + 15_000
    while ((federation.direct!.view()[0]?.leases ?? 0) < 3) {
      if (Date.now() > leased) throw new Error('timed out waiting for the gateway to lease every node')
      await federation.direct!.flush()
    }
    const sent = await traffic(viaFederation, 600, () => integrity.status(cheat).state === 'quarantined')
    console.log(
      'integrity-direct: requests',
      sent,
      'paths',
      JSON.stringify([...paths]),
      'served',
      JSON.stringify([...servedBy]),
      'gateway',
      JSON.stringify(federation.direct!.counts),
      'cheat',
      JSON.stringify(integrity.status(cheat)),
    )
    expect(integrity.status(cheat).state).toBe('quarantined')
    // Answers came straight from the nodes (the first ones go through the head while the gateway
    // takes its leases: a fast catch leaves few of either), and the checks came from the gateway's samples.
    expect(paths.get('direct') ?? 0).toBeGreaterThan(0)
    expect(federation.direct!.counts.samples).toBeGreaterThan(0)
    expect(servedBy.get(cheat) ?? 0).toBeGreaterThan(0)
    // The cheat's checks came from answers the head never saw: the gateway's samples of direct ones.
    const fromGateway = considered.filter((s) => s.node === cheat && directIds.has(s.requestId)).length
    console.log(
      'integrity-direct: cheat samples from the gateway',
      fromGateway,
      'in all',
      considered.filter((s) => s.node === cheat).length,
    )
    // Overflow past the leases' slots still goes through the head, which samples what it relays.
    expect(fromGateway).toBeGreaterThan(0)
    for (const n of honest) expect(integrity.status(n.peerId!).fails).toBe(0)

    // Quarantined: the head leases it no more; the gateway's leases on it lapse at their renewal,
    // and then none of its traffic goes there.
    const grant = region.head.leases!.exchange({ models: [model], done: [], inflight: [] }, 'probe')
    expect(grant.leases.map((l) => l.node).sort()).toEqual(honest.map((n) => n.peerId!).sort())
    for (const l of grant.leases) expect(l.rate).toBeGreaterThan(0)
    const deadline = Date.now() + 15_000
    while ((federation.direct!.view()[0]?.leases ?? 0) !== honest.length) {
      if (Date.now() > deadline) throw new Error('timed out waiting for the lease on the cheat to lapse')
      await federation.direct!.flush()
      await new Promise((r) => setTimeout(r, 50))
    }
    const before = servedBy.get(cheat) ?? 0
    await traffic(viaFederation, 20, () => false)
    expect(servedBy.get(cheat) ?? 0).toBe(before)
  }, 110_000)
})
