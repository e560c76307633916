import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { type Devnet, startDevnet } from '../../cli/commands/devnet.ts'

describe('garage devnet (npm start)', () => {
  let dir: string
  let devnet: Devnet | undefined
  afterAll(async () => {
    await devnet?.stop()
    if (dir != null) await rm(dir, { recursive: true, force: true })
  })

  it('brings up two regions and nodes that join a certified region and serve through its head; writes devnet.json', async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-devnet-'))
    devnet = await startDevnet({ dataDir: dir, regions: 2, nodes: 3, port: 0 })
    const written = JSON.parse(await readFile(join(dir, 'devnet.json'), 'utf8'))
    expect(written).toEqual(devnet.info)
    expect(written.regions.map((r: { name: string }) => r.name)).toEqual(['local', 'local-2'])
    expect(written.nodes).toHaveLength(3)
    for (const n of written.nodes) {
      expect(['local', 'local-2']).toContain(n.region)
      expect(written.regions.map((r: { headPeerId: string }) => r.headPeerId)).toContain(n.head)
    }
    const health = await fetch(written.regions[0].healthUrl)
    expect(health.status).toBe(200)
    // A request through each region's head, the mesh and one of its nodes.
    for (const region of written.regions) {
      const served = written.nodes.filter((n: { region: string }) => n.region === region.name)
      if (served.length === 0) continue
      const res = await fetch(`${region.headUrl}/v1/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${region.headToken}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'garage-tiny', prompt: 'Hello', max_tokens: 4 }),
      })
      expect(res.status).toBe(200)
      expect(served.map((n: { peerId: string }) => n.peerId)).toContain(res.headers.get('x-garage-node'))
      const body = (await res.json()) as { usage: { completion_tokens: number } }
      expect(body.usage.completion_tokens).toBe(4)
    }
  })
})
