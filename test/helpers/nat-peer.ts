/**
 * A mesh node for the NAT test, run inside a network namespace behind a MASQUERADE router:
 *
 *   ip netns exec <home> node test/helpers/nat-peer.ts <relay multiaddr> <listen ip> [authority]
 *
 * With an authority it first discovers its region through the DHT, as a gamer's daemon does from
 * behind a home NAT, and reports the chosen head and how long it took. It reserves a slot on the relay, answers `/garage/test-echo/1.0.0` on limited (relayed) connections
 * with "pong:" + what it read, and prints one JSON line on stdout once its `/p2p-circuit` address
 * exists: `{ "peerId", "circuit", "addrs", "region", "head", "discoveryMs" }`. It stops on SIGTERM/SIGINT or when stdin closes.
 */
import { generateKeyPair } from '@libp2p/crypto/keys'
import type { Connection, Stream } from '@libp2p/interface'
import { RegionDiscovery } from '../../mesh/discovery.ts'
import { createMeshNode } from '../../mesh/node.ts'

const ECHO_PROTOCOL = '/garage/test-echo/1.0.0'

const [relayAddr, listenIp = '0.0.0.0', authority] = process.argv.slice(2)
if (relayAddr == null) {
  process.stderr.write('usage: nat-peer.ts <relay multiaddr with /p2p/<id>> [listen ip]\n')
  process.exit(2)
}

const nodeStarted = performance.now()
const node = await createMeshNode({
  privateKey: await generateKeyPair('Ed25519'),
  role: 'node',
  listen: [`/ip4/${listenIp}/tcp/0`],
  bootstrap: [relayAddr],
  allowPrivateAddresses: true,
  relayReservation: true,
})

// Discovery runs while the relay reservation is made, as in the daemon.
const discovering = (async () => {
  const chosen = authority != null ? await new RegionDiscovery(node, { authority }).choose() : null
  return { chosen, discoveryMs: Math.round(performance.now() - nodeStarted) }
})()

let stopping: Promise<void> | undefined
function shutdown(reason: string): Promise<void> {
  stopping ??= (async () => {
    process.stderr.write(`nat-peer: stopping (${reason})\n`)
    try {
      await node.stop()
    } catch (err) {
      process.stderr.write(`nat-peer: stop failed: ${err}\n`)
    }
    process.exit(0)
  })()
  return stopping
}
process.once('SIGTERM', () => void shutdown('SIGTERM'))
process.once('SIGINT', () => void shutdown('SIGINT'))
process.stdin.on('end', () => void shutdown('stdin closed'))
process.stdin.on('close', () => void shutdown('stdin closed'))
process.stdin.resume()

async function echo(stream: Stream, connection: Connection): Promise<void> {
  const chunks: Uint8Array[] = []
  for await (const chunk of stream) chunks.push(chunk.subarray())
  const request = Buffer.concat(chunks).toString('utf8')
  const limited = connection.limits != null
  process.stderr.write(
    `nat-peer: echo ${JSON.stringify(request)} via ${connection.remoteAddr} limited=${limited}\n`,
  )
  stream.send(new TextEncoder().encode(`pong:${request}`))
  await stream.close()
}

await node.handle(
  ECHO_PROTOCOL,
  (stream, connection) => {
    echo(stream, connection).catch((err: unknown) => {
      process.stderr.write(`nat-peer: echo failed: ${err}\n`)
      stream.abort(err instanceof Error ? err : new Error(String(err)))
    })
  },
  { runOnLimitedConnection: true },
)

function circuitAddr(): string | undefined {
  return node
    .getMultiaddrs()
    .map((a) => a.toString())
    .find((a) => a.includes('/p2p-circuit'))
}

const circuit =
  circuitAddr() ??
  (await new Promise<string>((resolve) => {
    const onUpdate = (): void => {
      const found = circuitAddr()
      if (found == null) return
      node.removeEventListener('self:peer:update', onUpdate)
      resolve(found)
    }
    node.addEventListener('self:peer:update', onUpdate)
  }))

const { chosen, discoveryMs } = await discovering

process.stdout.write(
  `${JSON.stringify({
    peerId: node.peerId.toString(),
    circuit,
    addrs: node.getMultiaddrs().map((a) => a.toString()),
    region: chosen?.region ?? null,
    head: chosen?.peerId ?? null,
    discoveryMs,
  })}\n`,
)
