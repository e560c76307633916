import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { afterEach, describe, expect, it } from 'vitest'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { type LinkProxy, startLinkProxy } from '../helpers/fault-link.ts'

/** Resolves once `node` has a connection to `peer` (event driven, with a deadline). */
function connectedTo(node: MeshNode, peer: string, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const has = (): boolean => node.getConnections().some((c) => c.remotePeer.toString() === peer)
    if (has()) return resolve()
    const timer = setTimeout(() => {
      node.removeEventListener('peer:connect', onConnect)
      reject(new Error(`no connection to ${peer} within ${timeoutMs} ms`))
    }, timeoutMs)
    const onConnect = (): void => {
      if (!has()) return
      clearTimeout(timer)
      node.removeEventListener('peer:connect', onConnect)
      resolve()
    }
    node.addEventListener('peer:connect', onConnect)
  })
}

describe('a node keeps its --bootstrap address', () => {
  const nodes: MeshNode[] = []
  let proxy: LinkProxy | null = null
  afterEach(async () => {
    await Promise.allSettled(nodes.splice(0).map((n) => n.stop()))
    await proxy?.close()
    proxy = null
  })

  async function bootstrapNode(key: PrivateKey): Promise<{ node: MeshNode; port: number }> {
    const node = await createMeshNode({
      privateKey: key,
      role: 'bootstrap',
      listen: ['/ip4/127.0.0.1/tcp/0'],
      allowPrivateAddresses: true,
      relayReservation: false,
    })
    nodes.push(node)
    return { node, port: Number(node.getMultiaddrs()[0]!.toString().split('/')[4]) }
  }

  it('reached through a port forward: after identify and a drop, it dials the configured address again', async () => {
    const key = await generateKeyPair('Ed25519')
    const id = peerIdFromPrivateKey(key).toString()
    let first = await bootstrapNode(key)
    let targetPort = first.port
    // The bootstrap node is known to the gamer by a forwarded port, not by what it listens on.
    proxy = await startLinkProxy({
      listenHost: '127.0.0.1',
      target: () => ({ host: '127.0.0.1', port: targetPort }),
    })
    const gamer = await createMeshNode({
      privateKey: await generateKeyPair('Ed25519'),
      role: 'node',
      listen: [],
      bootstrap: [`/ip4/127.0.0.1/tcp/${proxy.port}/p2p/${id}`],
      allowPrivateAddresses: true,
      relayReservation: false,
    })
    nodes.push(gamer)
    await connectedTo(gamer, id, 10_000)
    // Identify ran: the bootstrap node's own listen address is in the peer store, and so is the configured one.
    const known = async (): Promise<string[]> =>
      (await gamer.peerStore.get(peerIdFromPrivateKey(key))).addresses.map((a) => a.multiaddr.toString())
    for (let i = 0; i < 50 && !(await known()).includes(`/ip4/127.0.0.1/tcp/${first.port}`); i++)
      await new Promise((r) => setTimeout(r, 20))
    expect(await known()).toContain(`/ip4/127.0.0.1/tcp/${proxy.port}`)

    // The bootstrap node restarts on another port (its old one is gone); the forward follows it.
    const dropped = new Promise<void>((resolve) => {
      const onDisconnect = (evt: CustomEvent<{ toString(): string }>): void => {
        if (evt.detail.toString() !== id) return
        gamer.removeEventListener('peer:disconnect', onDisconnect)
        resolve()
      }
      gamer.addEventListener('peer:disconnect', onDisconnect)
    })
    await first.node.stop()
    await dropped
    expect(gamer.getConnections().filter((c) => c.remotePeer.toString() === id)).toEqual([])
    first = await bootstrapNode(key)
    targetPort = first.port
    const started = performance.now()
    await connectedTo(gamer, id, 15_000)
    console.log(
      `bootstrap node back after a restart: re-dialled in ${Math.round(performance.now() - started)} ms`,
    )
  }, 30_000)
})
