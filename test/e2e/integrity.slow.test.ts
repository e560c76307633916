import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { NodeIntegrity } from '../../bootstrap/head/integrity.ts'
import { LlamaCppEngine } from '../../daemon/engines/llamacpp/engine.ts'
import { writeTinyModel } from '../../daemon/engines/llamacpp/tiny-model.ts'
import { serveInferOverMesh } from '../../daemon/infer-handler.ts'
import type { NodeDaemon, NodeDaemonOptions } from '../../daemon/node-daemon.ts'
import { parseRegionHolds } from '../../federation/regions.ts'
import { fetchRegionInfo } from '../../mesh/region-protocol.ts'
import {
  type Endpoint,
  sendMixed,
  startPartialCheat,
  startRandomTextEngine,
} from '../helpers/integrity-cheats.ts'
import { TestMesh, waitForEvent } from '../helpers/mesh.ts'
import { startTestRegion, type TestRegion, tinyPolicy } from '../helpers/region.ts'

/**
 * Result integrity in a region of real nodes (real daemons, real llama.cpp, real libp2p): honest
 * nodes under mixed traffic are never blamed; four cheats (another model, a smaller one, random
 * text, and one that cheats on a fifth of its answers) are each quarantined, at the default
 * sampling rates, after a count of their own answers this test prints; quarantined nodes get no
 * traffic; an appeal needs a burst of passed checks.
 */

const model = 'garage-tiny-sharp'
/** A peaked tiny model: the default one is nearly flat, which no statistic can tell apart (docs/integrity.md). */
const logitScale = 16
/**
 * Every engine capped alike: the router sends work by measured speed, and on this loaded 2-core
 * machine a node measured slow once would get next to nothing (the cheats must be served to be caught).
 */
const maxTokensPerSecond = 300

describe('result integrity (slow)', () => {
  const mesh = new TestMesh()
  let region: TestRegion
  const honest: NodeDaemon[] = []
  const cheats = new Map<string, { node: NodeDaemon; kind: string }>()
  const served = new Map<string, number>()
  const servedAtQuarantine = new Map<string, number>()
  const cheatTarget: { current: Endpoint | null } = { current: null }
  let requests = 0
  let engine: (file: string) => Promise<Endpoint>
  let dir = ''
  const path = (name: string): string => join(dir, `${name}.gguf`)

  async function send(i: number): Promise<void> {
    const res = await sendMixed(region.head.url, region.head.apiToken, i, model)
    requests++
    const node = res.headers.get('x-garage-node')
    if (res.status === 200 && node != null) served.set(node, (served.get(node) ?? 0) + 1)
  }

  /**
   * Mixed traffic, 8 at a time (enough for the router to spread it over every node), in rounds of
   * 40 with the checks they sampled done in between, until `done()` or `max` requests.
   */
  async function traffic(max: number, done: () => boolean): Promise<void> {
    let next = 0
    while (next < max && !done()) {
      const end = Math.min(max, next + 40)
      const worker = async (): Promise<void> => {
        while (next < end) await send(next++)
      }
      await Promise.all(Array.from({ length: 8 }, worker))
      await region.head.integrity!.idle()
    }
  }

  beforeAll(async () => {
    dir = await mesh.tempDir('garage-integrity-')
    await writeTinyModel(path('assigned'), { logitScale })
    await writeTinyModel(path('seed2'), { logitScale, seed: 2 })
    await writeTinyModel(path('small'), { logitScale, layers: 1 })
    region = await startTestRegion(mesh, 'integrity', {
      // Probation ends after 10 passes here (20 by default) only to shorten the honest nodes' warm-up;
      // the cheats meet the default rates.
      integrity: { maxQueued: 1024, probationChecks: 10 },
      policy: tinyPolicy('integrity', {
        name: model,
        source: { gguf: path('assigned') },
        replicas: 8,
        parallel: 4,
        contextLength: 512,
        vocabularySize: 270,
      }),
    })
    region.head.integrity!.addEventListener('integrity:state', (evt) => {
      if (evt.detail.state === 'quarantined' && !servedAtQuarantine.has(evt.detail.node))
        servedAtQuarantine.set(evt.detail.node, served.get(evt.detail.node) ?? 0)
    })
    // Honest nodes on different thread counts.
    for (const threads of [1, 2, 1]) honest.push(await region.addNode({ threads, maxTokensPerSecond }))
    // The region runs a while before the cheats come: its honest nodes are established.
    // (The node on two threads is slower on this 2-core machine: the router sends it less.)
    const established = (): boolean =>
      honest.filter((n) => region.head.integrity!.status(n.peerId!).state === 'established').length >= 2
    await traffic(300, established)
    expect(established()).toBe(true)

    // An engine in its own process, as a node runs it (in this process it would be starved).
    engine = async (file: string): Promise<Endpoint> => {
      const e = new LlamaCppEngine()
      const handle = await e.start({
        maxTokensPerSecond,
        model: path(file),
        servedModelName: model,
        threads: 1,
        parallel: 4,
        contextLength: 512,
      })
      mesh.track(() => e.stop())
      return { baseUrl: handle.baseUrl, apiKey: handle.apiKey }
    }
    // A node that loads another model file than its assignment's, in its own engine process.
    const servingFile = (file: string): Partial<NodeDaemonOptions> => ({
      components: {
        createEngine: () => {
          const e = new LlamaCppEngine()
          const start = e.start.bind(e)
          e.start = (o) => start({ ...o, model: path(file) })
          return e
        },
      },
    })
    // A node whose mesh requests go to `target` instead of its own engine.
    const forwarding = (
      make: (own: () => Endpoint | null) => Promise<Endpoint>,
    ): Partial<NodeDaemonOptions> => ({
      components: {
        serveInfer: async (mn, o) => {
          const target = await make(() => o.engine())
          return serveInferOverMesh(mn, { ...o, engine: () => (o.engine() == null ? null : target) })
        },
      },
    })
    const random = await startRandomTextEngine()
    mesh.track(() => random.close())
    cheatTarget.current = random
    const fixtures: Array<[string, Partial<NodeDaemonOptions>]> = [
      ['other model (another seed)', servingFile('seed2')],
      ['smaller model (1 layer)', servingFile('small')],
      ['random text', forwarding(async () => random)],
      [
        'cheats on 20%',
        // The node runs the assigned model and a second engine (another seed) it answers a fifth from.
        forwarding(async (own) => {
          const p = await startPartialCheat(own, await engine('seed2'), 0.2)
          mesh.track(() => p.close())
          return p
        }),
      ],
    ]
    for (const [kind, extra] of fixtures) {
      const node = await region.addNode({ maxTokensPerSecond, ...extra })
      cheats.set(node.peerId!, { node, kind })
    }
  }, 120_000)

  afterAll(() => mesh.cleanup())

  it('quarantines every cheat and never an honest node, under mixed traffic', async () => {
    const integrity = region.head.integrity!
    const quarantined = (): boolean =>
      [...cheats.keys()].every((p) => integrity.status(p).state === 'quarantined')
    await traffic(900, quarantined)
    await integrity.idle()
    const report = [...cheats].map(([peer, c]) => ({
      kind: c.kind,
      state: integrity.status(peer).state,
      requestsToQuarantine: servedAtQuarantine.get(peer) ?? null,
      checks: integrity.status(peer).checks,
      fails: integrity.status(peer).fails,
    }))
    console.log('integrity: cheats', JSON.stringify(report), 'region requests', requests)
    console.log(
      'integrity: served',
      JSON.stringify([...served]),
      JSON.stringify(
        region.head.router
          .snapshot()
          .map((n) => [n.peerId.slice(-6), n.state, n.breaker, n.capacity, n.consecutiveFailures]),
      ),
    )
    for (const r of report) expect(r, r.kind).toMatchObject({ state: 'quarantined' })
    for (const n of honest) {
      const s: NodeIntegrity = integrity.status(n.peerId!)
      console.log(
        'integrity: honest',
        n.peerId,
        JSON.stringify({
          state: s.state,
          checks: s.checks,
          passes: s.passes,
          fails: s.fails,
          inconclusive: s.inconclusive,
        }),
      )
      expect(['established', 'probation']).toContain(s.state)
      expect(s.fails).toBe(0)
    }

    // Quarantined: no traffic, listed in /health and /metrics, its unverified tokens held back.
    const before = new Map(served)
    await traffic(30, () => false)
    for (const peer of cheats.keys()) expect(served.get(peer)).toBe(before.get(peer))
    const health = (await (await fetch(`${region.head.url}/health`)).json()) as {
      quarantined: Array<{ node: string; reason: string; heldTokens: number }>
    }
    expect(health.quarantined.map((q) => q.node).sort()).toEqual([...cheats.keys()].sort())
    for (const q of health.quarantined) expect(q.reason).toMatch(/unlikely under garage-tiny-sharp/)
    const metrics = await (await fetch(`${region.head.url}/metrics`)).text()
    for (const peer of cheats.keys())
      expect(metrics).toMatch(
        new RegExp(`garage_head_node_quarantined\\{node="${peer}",model="${model}"\\} 1`),
      )
    for (const n of honest)
      expect(metrics).toMatch(
        new RegExp(`garage_head_node_quarantined\\{node="${n.peerId}",model="${model}"\\} 0`),
      )
    expect(metrics).toMatch(/garage_head_integrity_checks_total\{result="fail"\} [1-9]/)
    expect(metrics).toMatch(/garage_head_integrity_checks_total\{result="pass"\} [1-9]/)
    // The federation reads the quarantines beside the models, and its ledger holds the credits.
    const models = await (
      await fetch(`${region.head.url}/v1/models`, {
        headers: { authorization: `Bearer ${region.head.apiToken}` },
      })
    ).json()
    const holds = parseRegionHolds(models, 'integrity')
    expect(holds.map((h) => h.node).sort()).toEqual([...cheats.keys()].sort())
    for (const h of holds) expect(h.reason).toMatch(/unlikely under garage-tiny-sharp/)
    expect(holds.reduce((t, h) => t + h.tokens, 0)).toBeGreaterThan(0)
    // `garage regions` reads the region's status beside its certificate (wired as garage bootstrap does).
    const head = region.head
    region.bootstrap.setRegionStatus(() => ({
      nodes: head.registry.size,
      quarantined: head.integrity?.quarantined().length ?? 0,
    }))
    const asker = await mesh.node([])
    await asker.dial(region.bootstrap.node.getMultiaddrs()[0]!)
    const info = await fetchRegionInfo(asker, region.bootstrap.peerId)
    expect(info.status).toEqual({ nodes: honest.length + cheats.size, quarantined: cheats.size })
  }, 90_000)

  it('an appeal needs a burst of passed checks: a cheat fails it, a node that mends its ways passes', async () => {
    const integrity = region.head.integrity!
    const [randomPeer] = [...cheats].find(([, c]) => c.kind === 'random text')!
    // The random-text node rejoins (the head forgets it; its next telemetry makes it join again).
    const appealFailed = waitForEvent<NodeIntegrity>(
      integrity,
      'integrity:state',
      (d) => d.node === randomPeer && d.state === 'quarantined' && /appeal failed/.test(d.reason ?? ''),
      30_000,
    )
    // Its gamer sees it: the head's telemetry answers carry the quarantine and its reason.
    const randomNode = cheats.get(randomPeer)!.node
    if (randomNode.status().integrity == null)
      await waitForEvent(randomNode, 'stats', () => randomNode.status().integrity != null, 10_000)
    expect(randomNode.status().integrity).toMatchObject({
      state: 'quarantined',
      reason: expect.stringMatching(/unlikely under garage-tiny-sharp/),
    })
    region.head.registry.leave(randomPeer)
    await appealFailed
    expect(region.head.router.held(randomPeer)).toBe(true)

    // The random-text node now forwards to an engine of the assigned model: it appeals again and passes.
    const mended = await engine('assigned')
    Object.assign(cheatTarget.current!, mended)
    const back = waitForEvent<NodeIntegrity>(
      integrity,
      'integrity:state',
      (d) => d.node === randomPeer && d.state === 'probation',
      30_000,
    )
    region.head.registry.leave(randomPeer)
    await back
    expect(region.head.router.held(randomPeer)).toBe(false)
  }, 60_000)
})
