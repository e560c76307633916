import { generateKeyPair } from '@libp2p/crypto/keys'
import { RegionDiscovery } from '../mesh/discovery.ts'
import { createMeshNode, type MeshNode } from '../mesh/node.ts'
import { dialAddr, TestMesh, waitForRegions } from '../test/helpers/mesh.ts'
import { percentile, progress, table, writeResult } from './report.ts'

/**
 * Time from a node's start to its chosen region, with 100 nodes joining a two-region mesh on
 * loopback, beside the same measure for a node that joins an empty mesh (same run, same machine).
 */
export async function run(options: { nodes?: number; wave?: number } = {}): Promise<Record<string, unknown>> {
  const total = options.nodes ?? 100
  const wave = options.wave ?? 10
  const mesh = new TestMesh()
  try {
    const authority = await mesh.authority()
    const eu = await mesh.bootstrap(authority, 'eu-north')
    const us = await mesh.bootstrap(authority, 'us-east', { bootstrap: [dialAddr(eu)] })
    await Promise.all([eu.announce(), us.announce()])
    const bootstrap = [dialAddr(eu), dialAddr(us)]
    // Measure joins into a settled mesh, as a gamer's node would find it: both regions answer.
    progress('waiting for both regions to be discoverable')
    await waitForRegions(bootstrap, authority.id, 2)

    const join = async (keep: MeshNode[]): Promise<number> => {
      const privateKey = await generateKeyPair('Ed25519')
      const started = performance.now()
      const node = await createMeshNode({
        privateKey,
        listen: ['/ip4/127.0.0.1/tcp/0'],
        bootstrap,
        allowPrivateAddresses: true,
        relayReservation: false,
      })
      const discovery = new RegionDiscovery(node, { authority: authority.id })
      await discovery.choose()
      const ms = performance.now() - started
      keep.push(node)
      return ms
    }

    progress('baseline: 5 nodes joining one at a time, each alone in the mesh')
    const solo: number[] = []
    for (let i = 0; i < 5; i++) {
      const alone: MeshNode[] = []
      solo.push(await join(alone))
      await Promise.all(alone.map((n) => n.stop()))
    }

    const nodes: MeshNode[] = []
    mesh.track(async () => {
      await Promise.all(nodes.map((n) => n.stop()))
    })
    global.gc?.()
    const rssBefore = process.memoryUsage().rss
    const times: number[] = []
    for (let i = 0; i < total; i += wave) {
      const n = Math.min(wave, total - i)
      times.push(...(await Promise.all(Array.from({ length: n }, () => join(nodes)))))
      progress(`${nodes.length}/${total} nodes joined, p50 so far ${percentile(times, 50).toFixed(0)} ms`)
    }
    global.gc?.()
    const rssAfter = process.memoryUsage().rss
    // The same join one at a time into the 100-node mesh: load of the mesh, not of this machine's CPU.
    progress('10 more nodes joining one at a time into the full mesh')
    const late: number[] = []
    for (let i = 0; i < 10; i++) late.push(await join(nodes))
    const result = {
      nodes: total,
      wave,
      discovery_ms_p50: Math.round(percentile(times, 50)),
      discovery_ms_p95: Math.round(percentile(times, 95)),
      discovery_ms_max: Math.round(Math.max(...times)),
      discovery_ms_p50_solo: Math.round(percentile(solo, 50)),
      discovery_ms_p50_one_at_a_time_at_full_mesh: Math.round(percentile(late, 50)),
      discovery_p50_ratio_vs_solo: Number((percentile(times, 50) / percentile(solo, 50)).toFixed(2)),
      discovery_p50_ratio_full_mesh_vs_solo: Number((percentile(late, 50) / percentile(solo, 50)).toFixed(2)),
      rss_mb_per_node: Number(((rssAfter - rssBefore) / total / 2 ** 20).toFixed(2)),
      goal: { discovery_ms_p50: '<= 1000' },
      goal_met: percentile(times, 50) <= 1000,
    }
    const path = await writeResult('mesh', result)
    process.stdout.write(
      `\nmesh: ${total} nodes joining a 2-region mesh on loopback, ${wave} at a time\n${table([
        ['nodes', String(total), ''],
        ['discovery_ms_p50', String(result.discovery_ms_p50), '<= 1000'],
        ['discovery_ms_p95', String(result.discovery_ms_p95), ''],
        ['discovery_ms_p50_solo', String(result.discovery_ms_p50_solo), '(one node joining, no other nodes)'],
        [
          'discovery_ms_p50_one_at_a_time_at_full_mesh',
          String(result.discovery_ms_p50_one_at_a_time_at_full_mesh),
          '',
        ],
        [
          'discovery_p50_ratio_full_mesh_vs_solo',
          String(result.discovery_p50_ratio_full_mesh_vs_solo),
          '(mesh size cost)',
        ],
        [
          'discovery_p50_ratio_vs_solo',
          String(result.discovery_p50_ratio_vs_solo),
          '(10 joining at once on this CPU)',
        ],
        ['rss_mb_per_node', String(result.rss_mb_per_node), ''],
      ])}\n${result.goal_met ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    await mesh.cleanup()
  }
}
