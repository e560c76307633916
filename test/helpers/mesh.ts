import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { type BootstrapNode, startBootstrap } from '../../bootstrap/bootstrap-node.ts'
import { type Authority, initAuthority } from '../../mesh/authority.ts'
import { issueRegionCertificate } from '../../mesh/certificate.ts'
import { RegionDiscovery } from '../../mesh/discovery.ts'
import { loadOrCreateIdentity } from '../../mesh/identity.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'

export const day = 24 * 60 * 60_000

/** Tracks everything a test starts so one `cleanup()` in afterAll stops it all. */
export class TestMesh {
  private readonly dirs: string[] = []
  private readonly stoppers: Array<() => Promise<void>> = []

  async tempDir(prefix = 'garage-test-'): Promise<string> {
    const dir = await mkdtemp(join(tmpdir(), prefix))
    this.dirs.push(dir)
    return dir
  }

  async authority(): Promise<Authority> {
    return initAuthority(await this.tempDir('garage-authority-'))
  }

  /** A bootstrap node of `region` with a certificate from `authority`, on loopback. */
  async bootstrap(
    authority: Authority,
    region: string,
    opts: {
      bootstrap?: string[]
      announce?: string[]
      listen?: string[]
      certificate?: (peerId: string) => Promise<Uint8Array>
    } = {},
  ): Promise<BootstrapNode> {
    const dataDir = await this.tempDir(`garage-bootstrap-${region}-`)
    const key = await loadOrCreateIdentity(dataDir)
    const peerId = peerIdFromPrivateKey(key).toString()
    const certBytes =
      opts.certificate != null
        ? await opts.certificate(peerId)
        : await issueRegionCertificate(authority.key, { region, head: peerId, addrs: [], ttlMs: 30 * day })
    const certPath = join(dataDir, 'region.cert')
    await writeFile(certPath, certBytes)
    const b = await startBootstrap({
      dataDir,
      region,
      certPath,
      listen: opts.listen ?? ['/ip4/127.0.0.1/tcp/0'],
      bootstrap: opts.bootstrap ?? [],
      ...(opts.announce != null ? { announce: opts.announce } : {}),
      allowPrivateAddresses: true,
      httpPort: 0,
    })
    this.stoppers.push(() => b.stop())
    return b
  }

  async node(bootstrap: string[], extra: { relayReservation?: boolean } = {}): Promise<MeshNode> {
    const node = await createMeshNode({
      privateKey: await generateKeyPair('Ed25519'),
      listen: ['/ip4/127.0.0.1/tcp/0'],
      bootstrap,
      allowPrivateAddresses: true,
      relayReservation: extra.relayReservation ?? false,
    })
    this.stoppers.push(async () => {
      await node.stop()
    })
    return node
  }

  /** Runs `stop` at cleanup (proxies, extra nodes). */
  track(stop: () => Promise<void>): void {
    this.stoppers.push(stop)
  }

  async cleanup(): Promise<void> {
    await Promise.allSettled(this.stoppers.splice(0).map((s) => s()))
    await Promise.all(this.dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })))
  }
}

export function dialAddr(b: BootstrapNode): string {
  const addr = b.node.getMultiaddrs().find((a) => a.toString().includes('/tcp/'))
  if (addr == null) throw new Error('bootstrap node has no TCP address')
  return addr.toString()
}

/** Resolves with the first event of `type` whose detail passes `test`; rejects after `timeoutMs`. */
export function waitForEvent<T>(
  target: EventTarget,
  type: string,
  test: (detail: T) => boolean,
  timeoutMs: number,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const onEvent = (evt: Event): void => {
      const detail = (evt as CustomEvent<T>).detail
      if (!test(detail)) return
      clearTimeout(timer)
      target.removeEventListener(type, onEvent)
      resolve(detail)
    }
    const timer = setTimeout(() => {
      target.removeEventListener(type, onEvent)
      reject(new Error(`no ${type} event within ${timeoutMs} ms`))
    }, timeoutMs)
    target.addEventListener(type, onEvent)
  })
}

/**
 * A free loopback port chosen by the OS, for a server whose real port must be known before it starts
 * (a node that announces a proxy in front of itself). The OS hands out ports in turn, so reuse in the
 * moment between close and listen is not a practical risk.
 */
export async function freePort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  await new Promise<void>((resolve) => server.close(() => resolve()))
  if (address == null || typeof address === 'string') throw new Error('no port')
  return address.port
}

/**
 * Resolves once a throw-away node sees `regions` valid heads through `bootstrap`: the mesh a
 * gamer's node would find, settled. Discovery itself retries with backoff; this bounds it.
 */
export async function waitForRegions(
  bootstrap: string[],
  authority: string,
  regions: number,
  timeoutMs = 30_000,
): Promise<void> {
  const probe = await createMeshNode({
    privateKey: await generateKeyPair('Ed25519'),
    listen: [],
    bootstrap,
    allowPrivateAddresses: true,
    relayReservation: false,
  })
  const deadline = Date.now() + timeoutMs
  try {
    const discovery = new RegionDiscovery(probe, { authority })
    while ((await discovery.discover()).filter((h) => h.valid).length < regions) {
      if (Date.now() > deadline) throw new Error(`fewer than ${regions} valid regions after ${timeoutMs} ms`)
    }
  } finally {
    await probe.stop()
  }
}
