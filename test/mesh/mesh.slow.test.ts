import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { peerIdFromPrivateKey, peerIdFromString } from '@libp2p/peer-id'
import { decode, encode } from 'cborg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { BootstrapNode } from '../../bootstrap/bootstrap-node.ts'
import type { Authority } from '../../mesh/authority.ts'
import { issueRegionCertificate } from '../../mesh/certificate.ts'
import { allRegionsKey, regionKey } from '../../mesh/dht-keys.ts'
import { type DiscoveredHead, RegionDiscovery } from '../../mesh/discovery.ts'
import { loadOrCreateIdentity } from '../../mesh/identity.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { fetchRegionCertificate, handleRegionProtocol } from '../../mesh/region-protocol.ts'
import { spawnBootstrap } from '../helpers/cli.ts'
import { type DelayProxy, startDelayProxy } from '../helpers/delay-proxy.ts'
import { day, freePort, TestMesh, waitForEvent, waitForRegions } from '../helpers/mesh.ts'

/** Each direction of the us-east link is held this long: its RTT is at least twice this. */
const slowLinkDelayMs = 150

interface ForgedHead {
  node: MeshNode
  expected: string
}

describe('32 nodes on loopback: certified regional discovery', () => {
  const mesh = new TestMesh()
  let authority: Authority
  let euNorth: { peerId: string; addr: string; kill(): void; exited: Promise<number | null> }
  let usEast: BootstrapNode
  let proxy: DelayProxy
  let bootstrapList: string[]
  const forged: ForgedHead[] = []

  /** A hostile head: announces itself like a region and serves whatever certificate it likes. */
  async function forgedHead(
    expected: string,
    certFor: (peerId: string, node: MeshNode) => Promise<Uint8Array>,
    keys: string[],
  ): Promise<void> {
    const node = await mesh.node(bootstrapList)
    const cert = await certFor(node.peerId.toString(), node)
    await handleRegionProtocol(node, { certificate: () => cert })
    for (const k of keys) {
      const cid = k === '*' ? await allRegionsKey() : await regionKey(k)
      await node.contentRouting.provide(cid, { signal: AbortSignal.timeout(20_000) })
    }
    forged.push({ node, expected })
  }

  beforeAll(async () => {
    authority = await mesh.authority()
    const rogue = await mesh.authority()
    // eu-north runs as its own `garage bootstrap` process, so the test can SIGKILL it
    const euDir = await mesh.tempDir('garage-eu-north-')
    const euHead = peerIdFromPrivateKey(await loadOrCreateIdentity(euDir)).toString()
    const euCert = join(euDir, 'region.cert')
    await writeFile(
      euCert,
      await issueRegionCertificate(authority.key, {
        region: 'eu-north',
        head: euHead,
        addrs: [],
        ttlMs: 30 * day,
      }),
    )
    const running = await spawnBootstrap([
      '--region',
      'eu-north',
      '--cert',
      euCert,
      '--authority',
      authority.id,
      '--data-dir',
      euDir,
      '--listen',
      '/ip4/127.0.0.1/tcp/0',
      '--http',
      '127.0.0.1:0',
      '--allow-private',
    ])
    mesh.track(async () => {
      running.child.kill('SIGKILL')
      await running.exited
    })
    euNorth = {
      peerId: euHead,
      addr: running.field('address'),
      kill: () => running.child.kill('SIGKILL'),
      exited: running.exited,
    }
    const usEastPort = await freePort()
    proxy = await startDelayProxy(() => ({ host: '127.0.0.1', port: usEastPort }), slowLinkDelayMs)
    mesh.track(() => proxy.close())
    // us-east is only known by its proxied address: every peer reaches it over the slow link.
    usEast = await mesh.bootstrap(authority, 'us-east', {
      bootstrap: [euNorth.addr],
      listen: [`/ip4/127.0.0.1/tcp/${usEastPort}`],
      announce: [`/ip4/127.0.0.1/tcp/${proxy.port}`],
    })
    const usEastViaProxy = `/ip4/127.0.0.1/tcp/${proxy.port}/p2p/${usEast.peerId.toString()}`
    bootstrapList = [euNorth.addr, usEastViaProxy]
    await waitForRegions(bootstrapList, authority.id, 2)

    const genuine = (region: string) => (peerId: string) =>
      issueRegionCertificate(authority.key, { region, head: peerId, addrs: [], ttlMs: 30 * day })
    await forgedHead(
      'RegionCertificateWrongSignerError',
      (peerId) =>
        issueRegionCertificate(rogue.key, { region: 'eu-north', head: peerId, addrs: [], ttlMs: 30 * day }),
      ['*', 'eu-north', 'us-east'],
    )
    await forgedHead(
      'RegionCertificateExpiredError',
      (peerId) =>
        issueRegionCertificate(authority.key, {
          region: 'eu-north',
          head: peerId,
          addrs: [],
          notBefore: new Date(Date.now() - 40 * day),
          ttlMs: 30 * day,
        }),
      ['*', 'eu-north', 'us-east'],
    )
    await forgedHead(
      'RegionCertificateSignatureError',
      async (peerId) => {
        // a genuine ap-south certificate with its region rewritten, signature kept
        const env = decode(await genuine('ap-south')(peerId)) as { payload: Uint8Array; sig: Uint8Array }
        return encode({
          payload: encode({ ...(decode(env.payload) as object), region: 'us-east' }),
          sig: env.sig,
        })
      },
      ['*', 'us-east'],
    )
    // replays eu-north's genuine certificate, fetched the way any peer can
    await forgedHead(
      'RegionCertificateHeadMismatchError',
      (_id, node) => fetchRegionCertificate(node, peerIdFromString(euNorth.peerId)),
      ['*', 'us-east'],
    )
    // genuine, but for ap-south: announced only under us-east, where a pinned node must refuse it
    await forgedHead('RegionCertificateWrongRegionError', genuine('ap-south'), ['us-east'])
  })

  afterAll(() => mesh.cleanup())

  /** Starts nodes eight at a time (two cores: a hundred handshakes at once would blur the RTTs). */
  async function startNodes(
    count: number,
    region?: string,
  ): Promise<
    Array<{ node: MeshNode; discovery: RegionDiscovery; chosen: DiscoveredHead; heads: DiscoveredHead[] }>
  > {
    const started: Array<{
      node: MeshNode
      discovery: RegionDiscovery
      chosen: DiscoveredHead
      heads: DiscoveredHead[]
    }> = []
    for (let i = 0; i < count; i += 8) {
      started.push(...(await startBatch(Math.min(8, count - i), region)))
    }
    return started
  }

  async function startBatch(
    count: number,
    region?: string,
  ): Promise<
    Array<{ node: MeshNode; discovery: RegionDiscovery; chosen: DiscoveredHead; heads: DiscoveredHead[] }>
  > {
    return Promise.all(
      Array.from({ length: count }, async () => {
        const node = await mesh.node(bootstrapList)
        const discovery = new RegionDiscovery(node, {
          authority: authority.id,
          ...(region != null ? { region } : {}),
        })
        discovery.start()
        mesh.track(async () => discovery.stop())
        const chosen = await discovery.choose()
        // choose() stops waiting for far heads; a full round lists every announced head
        const heads = await discovery.discover()
        return { node, discovery, chosen, heads }
      }),
    )
  }

  let unpinned: Awaited<ReturnType<typeof startNodes>>

  it('every node finds both regions with valid certificates and takes the lower-RTT one', async () => {
    unpinned = await startNodes(20)
    for (const { heads, chosen } of unpinned) {
      const valid = heads.filter((h) => h.valid)
      expect(valid.map((h) => h.region).sort()).toEqual(['eu-north', 'us-east'])
      const eu = valid.find((h) => h.region === 'eu-north')!
      const us = valid.find((h) => h.region === 'us-east')!
      // the slow link is real: RTT measured through the proxy
      expect(us.rttMs!).toBeGreaterThanOrEqual(2 * slowLinkDelayMs)
      expect(eu.rttMs!).toBeLessThan(us.rttMs!)
      expect(chosen.region).toBe('eu-north')
      expect(chosen.peerId).toBe(euNorth.peerId)
    }
  })

  it('rejects every forged certificate with its named reason, and never chooses a forger', async () => {
    const forgerIds = new Set(forged.map((f) => f.node.peerId.toString()))
    for (const { heads, chosen } of unpinned) {
      expect(forgerIds.has(chosen.peerId)).toBe(false)
      const rejected = Object.fromEntries(
        heads.filter((h) => !h.valid).map((h) => [h.peerId, h.reason?.name]),
      )
      for (const f of forged.filter((f) => f.expected !== 'RegionCertificateWrongRegionError')) {
        expect(rejected[f.node.peerId.toString()], f.expected).toBe(f.expected)
      }
    }
  })

  it('honours a pinned region even when another has lower RTT, refusing a head of the wrong region', async () => {
    const pinned = await startNodes(8, 'us-east')
    const wrongRegion = forged.find((f) => f.expected === 'RegionCertificateWrongRegionError')!
    for (const { heads, chosen } of pinned) {
      expect(chosen.region).toBe('us-east')
      expect(chosen.peerId).toBe(usEast.peerId.toString())
      const w = heads.find((h) => h.peerId === wrongRegion.node.peerId.toString())
      expect(w?.reason?.name).toBe('RegionCertificateWrongRegionError')
      expect(heads.some((h) => h.region === 'eu-north' && h.valid)).toBe(false)
    }
  })

  it('with one of two bootstrap nodes SIGKILLed, new nodes still join and discover; old ones move over', async () => {
    const watcher = unpinned[0]!
    const moved = waitForEvent<DiscoveredHead>(
      watcher.discovery,
      'region:chosen',
      (h) => h.region === 'us-east',
      30_000,
    )
    const lost = waitForEvent<DiscoveredHead>(watcher.discovery, 'region:lost', () => true, 30_000)
    euNorth.kill()
    expect(await euNorth.exited).toBe(null) // killed by the signal, no clean shutdown
    expect((await lost).region).toBe('eu-north')
    expect((await moved).peerId).toBe(usEast.peerId.toString())
    const late = await startNodes(4)
    for (const { chosen, heads } of late) {
      expect(chosen.region).toBe('us-east')
      const dead = heads.find((h) => h.peerId === euNorth.peerId)
      if (dead != null) expect(dead.valid).toBe(false)
    }
  })
})
