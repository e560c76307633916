import { type ChildProcess, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdtemp, rm, symlink } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import { execa } from 'execa'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { freeLoopbackPort } from '../../containers/ports.ts'
import { UsageLedger } from '../../federation/ledger.ts'
import { openFederationStore } from '../../federation/store-sqlite.ts'
import { containersOf, requirePodman, standInImage } from '../containers/podman.ts'
import { fakeGpuMachine } from '../helpers/fake-tools.ts'
import { ProcessCluster } from '../helpers/process-cluster.ts'

/**
 * A model larger than one GPU on the region's Ray cluster, end to end with real processes and real
 * Podman (the Ray and vLLM stand-ins speak the real tools' interfaces; test/fixtures/vllm/): a region
 * whose certificate marks its Ray cluster trusted, four opted-in nodes whose probe sees an RTX 4090
 * each. Three take a pipeline stage each and the head starts vLLM on the cluster; it serves through
 * the federation with the tokens credited to the three by layers. A game starts on one member's
 * machine: the member pauses and frees its GPU at once, the group is torn down (requests get 503
 * no_capacity with Retry-After, there is no other replica), the fourth node takes the free stage, and
 * the group serves again.
 */

const model = 'stand-in-70b'
const runId = randomBytes(4).toString('hex')

interface Health {
  groups: Array<{
    state: string
    members: Array<{ node: string; rank: number; ray: string | null }>
    formations: number
    lastFormedMs: number | null
    tokens: number
  }>
}

describe('a pipeline group on the Ray cluster', () => {
  let root: string
  let cluster: ProcessCluster
  let image: string
  let gpu: Awaited<ReturnType<typeof fakeGpuMachine>> | undefined
  const games: ChildProcess[] = []

  const health = async (): Promise<Health> =>
    (await (await fetch(`${cluster.region('big').headUrl}/health`)).json()) as Health

  /** Polls the head until `ok` holds (the group forms over a few telemetry ticks). */
  async function until(ok: (h: Health) => boolean, timeoutMs: number, what: string): Promise<Health> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const h = await health()
      if (ok(h)) return h
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(h.groups)}`)
      await new Promise((r) => setTimeout(r, 200))
    }
  }

  beforeAll(async () => {
    await requirePodman()
    image = await standInImage()
    root = await mkdtemp(join(tmpdir(), 'garage-ray-group-'))
    gpu = await fakeGpuMachine(root, runId)
    const bin = gpu.bin
    cluster = ProcessCluster.create({
      runId,
      root: join(root, 'cluster'),
      regions: ['big'],
      nodesPerRegion: 4,
      isolateOneNode: false,
      maxTokensPerSecond: 1000,
      parallel: 2,
      contextLength: 1024,
      keyNames: ['app'],
      rayTrusted: true,
      ray: { enabled: true, trusted: true, port: await freeLoopbackPort() },
      headArgs: ['--ray-image', image, '--vllm-image', image],
      models: [
        {
          name: model,
          engine: ['vllm'],
          source: { hf: 'garage/stand-in-70b' },
          replicas: 1,
          minVramMiB: 20_000,
          minRamMiB: 16,
          pipelineParallel: 3,
          layers: 80,
        },
        {
          name: 'garage-tiny',
          engine: ['llamacpp'],
          source: { gguf: 'garage-tiny' },
          replicas: 1,
          minVramMiB: 0,
          minRamMiB: 16,
        },
      ],
      // Every node watches the host (a game pauses it); each one's game list is its own (settings).
      nodeSetup: () => ({
        args: ['--ray'],
        env: { PATH: `${bin}${delimiter}${process.env.PATH}` },
        hostPolicies: true,
      }),
    })
    await cluster.start()
  })

  afterAll(async () => {
    for (const g of games) g.kill('SIGKILL')
    const report = await cluster?.stop()
    await gpu?.remove()
    if (root != null) await rm(root, { recursive: true, force: true })
    expect(report?.containers ?? []).toEqual([])
  })

  it('three opted-in nodes take a stage each, the head starts vLLM on Ray, and it serves through the federation', async () => {
    const h = await until((x) => x.groups[0]?.state === 'serving', 60_000, 'the group to serve')
    const group = h.groups[0]!
    expect(group.members.map((m) => m.rank)).toEqual([0, 1, 2])
    expect(group.members.every((m) => m.ray === 'ready')).toBe(true)
    process.stdout.write(`pipeline group formed in ${group.lastFormedMs} ms\n`)
    // Each member's Ray worker runs with its GPU; the head's group vLLM beside the Ray head.
    for (const m of group.members) expect(await containersOf(m.node)).toHaveLength(1)
    const headContainers = await execa('podman', [
      'ps',
      '--filter',
      `label=garage.node=${cluster.region('big').headPeerId}`,
      '--format',
      '{{.Labels}}',
    ])
    expect(headContainers.stdout).toMatch(/garage.role:vllm-group/)
    expect(headContainers.stdout).toMatch(/garage.role:ray-head/)

    const client = new OpenAI({
      baseURL: `${cluster.federation.url}/v1`,
      apiKey: cluster.keys[0]!.key,
      maxRetries: 0,
    })
    const { data, response } = await client.chat.completions
      .create({ model, messages: [{ role: 'user', content: 'big hello' }], max_tokens: 16 })
      .withResponse()
    expect(data.choices[0]!.message.content).toBe(`stand-in ${model} says: big hello`)
    expect(response.headers.get('x-garage-node')!.split(',')).toEqual(group.members.map((m) => m.node))
    expect(response.headers.get('x-garage-node-shares')).toBe('27,27,26')
  })

  it("credits the group's tokens to its members by the layers each holds", async () => {
    const members = (await health()).groups[0]!.members.map((m) => m.node)
    // The gateway's ledger, read as `garage ledger` does (its own connection to the SQLite file).
    const db = openFederationStore(cluster.federation.dir)
    try {
      const ledger = new UsageLedger(db)
      const deadline = Date.now() + 10_000
      let credits = (await ledger.creditsByNode()).filter((c) => c.model === model)
      while (credits.length < 3 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 200))
        credits = (await ledger.creditsByNode()).filter((c) => c.model === model)
      }
      const byNode = new Map(credits.map((c) => [c.node, c.completionTokens]))
      const total = [...byNode.values()].reduce((a, b) => a + b, 0)
      expect(new Set(byNode.keys())).toEqual(new Set(members))
      // 'stand-in stand-in-70b says: big hello' is 5 tokens: 27/80, 27/80, 26/80 of them, exactly.
      expect(total).toBe(5)
      expect(members.map((m) => byNode.get(m))).toEqual([2, 2, 1])
      await ledger.close()
    } finally {
      await db.close()
    }
  })

  it('a game on a member pauses it at once; the group re-forms with the fourth node and serves again', async () => {
    const before = (await health()).groups[0]!
    const members = before.members.map((m) => m.node)
    const spare = [...cluster.nodes.values()].find((n) => !members.includes(n.peerId))!
    const gamer = [...cluster.nodes.values()].find((n) => n.peerId === members[1])!
    await execa(process.execPath, [
      'bin/garage.js',
      'settings',
      'set',
      'games=garage-test-game',
      '--data-dir',
      gamer.dir,
    ])

    const dir = await mkdtemp(join(root, 'game-'))
    const exe = join(dir, 'garage-test-game')
    await symlink('/bin/sleep', exe)
    const started = performance.now()
    games.push(spawn(exe, ['600'], { stdio: 'ignore' }))
    // The member frees its GPU: its Ray worker container is gone within the usual pause time.
    for (;;) {
      if ((await containersOf(gamer.peerId)).length === 0) break
      if (performance.now() - started > 10_000) throw new Error('the member did not leave the Ray cluster')
      await new Promise((r) => setTimeout(r, 100))
    }
    const freed = performance.now() - started
    process.stdout.write(`game start → member's GPU freed: ${freed.toFixed(0)} ms\n`)
    expect(freed).toBeLessThan(5_000)

    // Meanwhile: no other replica, so a clear 503 the SDK retries after Retry-After.
    const down = await until((h) => h.groups[0]!.state !== 'serving', 10_000, 'the group to come down')
    expect(down.groups[0]!.members.map((m) => m.node)).not.toContain(gamer.peerId)
    const res = await fetch(`${cluster.federation.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${cluster.keys[0]!.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model, messages: [{ role: 'user', content: 'x' }], max_tokens: 2 }),
    })
    if (res.status !== 200) {
      expect(res.status).toBe(503)
      expect(res.headers.get('retry-after')).not.toBeNull()
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe('no_capacity')
    } else await res.arrayBuffer() // the group re-formed already

    const after = await until(
      (h) => h.groups[0]!.state === 'serving' && h.groups[0]!.formations === before.formations + 1,
      90_000,
      'the group to serve again',
    )
    const reformed = after.groups[0]!
    process.stdout.write(
      `re-formed ${((performance.now() - started) / 1000).toFixed(1)} s after the game started (formation ${reformed.lastFormedMs} ms)\n`,
    )
    expect(reformed.members.map((m) => m.node)).toContain(spare.peerId)
    expect(reformed.members.map((m) => m.node)).not.toContain(gamer.peerId)

    // The gateway learns that the group serves again at its next look at the region (every 3 s):
    // until then it answers 503 with Retry-After, which the SDK honours.
    const client = new OpenAI({
      baseURL: `${cluster.federation.url}/v1`,
      apiKey: cluster.keys[0]!.key,
      maxRetries: 5,
    })
    const again = await client.chat.completions.create({
      model,
      messages: [{ role: 'user', content: 'again' }],
      max_tokens: 8,
    })
    expect(again.choices[0]!.message.content).toBe(`stand-in ${model} says: again`)
  })
})
