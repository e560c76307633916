import { spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { multiaddr } from '@multiformats/multiaddr'
import { afterAll, describe, expect, it } from 'vitest'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { runCommand as run } from '../helpers/fault-netns.ts'
import { TestMesh } from '../helpers/mesh.ts'
import {
  buildNatTopology,
  type NatTopology,
  NatUnavailableError,
  type UndoStep,
  undoAll,
} from '../helpers/nat-topology.ts'

/**
 * Topology (all made here, removed in afterAll):
 *
 *   root ns: relay + dialer ── veth ── ns router (MASQUERADE) ── veth ── ns home: nat-peer.ts
 *   10.231.P.1                         10.231.P.2 | 10.231.H.1           10.231.H.2
 *
 * The root namespace has no route into 10.231.H.0/24 (an `unreachable` route keeps the SYNs of the
 * failing direct dial off the host's default gateway), so the home node can only dial out.
 */

const ECHO_PROTOCOL = '/garage/test-echo/1.0.0'
const repoRoot = fileURLToPath(new URL('../../', import.meta.url))
const natPeerScript = fileURLToPath(new URL('../helpers/nat-peer.ts', import.meta.url))

const tag = `g${process.pid}`

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

interface NatPeerInfo {
  peerId: string
  circuit: string
  addrs: string[]
  region: string | null
  head: string | null
  discoveryMs: number
}

describe('NAT traversal through the bootstrap relay', () => {
  const mesh = new TestMesh()
  /** Undo steps, run in reverse order in afterAll whatever happened. */
  const undo: UndoStep[] = []
  let childStderr = ''

  afterAll(() => undoAll(undo, 'nat test'))

  it('a node behind MASQUERADE with no inbound route is reached through the relay', async (ctx) => {
    // Only namespace creation decides a skip: everything after it must work where it can be made.
    let topology: NatTopology
    try {
      topology = buildNatTopology(tag, undo)
    } catch (err) {
      if (!(err instanceof NatUnavailableError)) throw err
      console.warn(`skipping NAT test: ${err.message}`)
      ctx.skip(err.message)
      return
    }
    ctx.onTestFailed(() => {
      if (childStderr !== '') console.warn(`nat-peer stderr:\n${childStderr}`)
    })
    const { publicNet, publicIp: relayIp, homeIp, ns } = topology
    expect(() => run('ip', ['route', 'get', homeIp])).toThrow(/no route to host/i)

    // The relay: a real bootstrap node (DHT, relay server, certified region) on the "public" side.
    const authority = await mesh.authority()
    const bootstrap = await mesh.bootstrap(authority, 'nat-test', { listen: [`/ip4/${relayIp}/tcp/0`] })
    undo.push({ what: 'stop bootstrap and remove its files', fn: () => mesh.cleanup() })
    const relay: MeshNode = bootstrap.node
    const relayAddr = relay
      .getMultiaddrs()
      .map((a) => a.toString())
      .find((a) => a.startsWith(`/ip4/${relayIp}/tcp/`))
    if (relayAddr == null) throw new Error(`relay has no address on ${relayIp}: ${relay.getMultiaddrs()}`)

    // The NATed node, in the home namespace.
    const started = Date.now()
    const proc = spawn(
      'ip',
      ['netns', 'exec', ns.home, process.execPath, natPeerScript, relayAddr, homeIp, authority.id],
      {
        cwd: repoRoot,
        stdio: ['pipe', 'pipe', 'pipe'],
      },
    )
    const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)))
    undo.push({
      what: 'stop nat-peer',
      fn: async () => {
        if (proc.exitCode != null || proc.signalCode != null) return
        proc.kill('SIGTERM')
        proc.stdin.end()
        const code = await withTimeout(exited, 5_000, 'nat-peer exit after SIGTERM').catch(() => {
          proc.kill('SIGKILL')
          return withTimeout(exited, 5_000, 'nat-peer exit after SIGKILL')
        })
        if (code !== 0 && code !== null) console.warn(`nat-peer exited with ${code}`)
      },
    })
    const stderrLines = createInterface({ input: proc.stderr })
    const seen: string[] = []
    stderrLines.on('line', (line) => {
      seen.push(line)
      childStderr += `${line}\n`
    })
    /** The first stderr line of nat-peer that matches, whether it was printed already or comes later. */
    const stderrLine = (match: (line: string) => boolean): Promise<string> => {
      const earlier = seen.find(match)
      if (earlier != null) return Promise.resolve(earlier)
      return new Promise((resolve) => {
        const onLine = (line: string): void => {
          if (!match(line)) return
          stderrLines.off('line', onLine)
          resolve(line)
        }
        stderrLines.on('line', onLine)
      })
    }
    const lines = createInterface({ input: proc.stdout })
    const firstLine = new Promise<string>((resolve, reject) => {
      lines.once('line', resolve)
      proc.once('exit', (code, signal) =>
        reject(new Error(`nat-peer exited (${code ?? signal}) before reserving: ${childStderr}`)),
      )
    })
    const info = JSON.parse(
      await withTimeout(firstLine, 30_000, 'nat-peer relay reservation').catch((err: Error) => {
        throw new Error(`${err.message}\nnat-peer stderr:\n${childStderr}`)
      }),
    ) as NatPeerInfo
    console.log(`nat-peer reserved a relay slot in ${Date.now() - started} ms: ${info.circuit}`)
    expect(info.circuit).toContain(`/ip4/${relayIp}/tcp/`)
    expect(info.circuit).toContain(`/p2p-circuit/p2p/${info.peerId}`)
    // From behind the NAT, the node found its certified region through the DHT.
    expect(info.region).toBe('nat-test')
    expect(info.head).toBe(bootstrap.peerId.toString())
    console.log(`nat-peer: from start to chosen region behind the NAT: ${info.discoveryMs} ms`)

    // The relay sees the home node through the NAT: from the router's public address, not the LAN one.
    const atRelay = relay.getConnections().filter((c) => c.remotePeer.toString() === info.peerId)
    expect(atRelay.length).toBeGreaterThan(0)
    for (const c of atRelay) expect(c.remoteAddr.toString()).toContain(`/ip4/${publicNet}.2/tcp/`)

    // The other peer, in the root namespace.
    const dialer: MeshNode = await createMeshNode({
      privateKey: await generateKeyPair('Ed25519'),
      role: 'node',
      listen: ['/ip4/127.0.0.1/tcp/0'],
      allowPrivateAddresses: true,
      relayReservation: false,
    })
    undo.push({ what: 'stop dialer', fn: () => dialer.stop() })

    // A direct dial to the home node's own address fails: there is no way in.
    const direct = info.addrs.find((a) => a.startsWith(`/ip4/${homeIp}/tcp/`))
    if (direct == null) throw new Error(`nat-peer does not listen on ${homeIp}: ${info.addrs.join(' ')}`)
    const directAddr = direct.includes('/p2p/') ? direct : `${direct}/p2p/${info.peerId}`
    const directError = await dialer.dial(multiaddr(directAddr), { signal: AbortSignal.timeout(5_000) }).then(
      (c) => {
        throw new Error(`direct dial to the NATed node succeeded: ${c.remoteAddr}`)
      },
      (err: Error) => err,
    )
    console.log(
      `direct dial to ${directAddr} failed as expected: ${directError.name}: ${directError.message}`,
    )
    expect(dialer.getConnections().filter((c) => c.remotePeer.toString() === info.peerId)).toHaveLength(0)

    // Through the relay: a limited connection and an echo stream carrying data both ways.
    const dialStart = Date.now()
    const conn = await dialer.dial(multiaddr(info.circuit), { signal: AbortSignal.timeout(15_000) })
    expect(conn.remotePeer.toString()).toBe(info.peerId)
    expect(conn.remoteAddr.toString()).toContain('/p2p-circuit')
    expect(conn.limits).toBeDefined()
    const stream = await conn.newStream(ECHO_PROTOCOL, {
      runOnLimitedConnection: true,
      signal: AbortSignal.timeout(10_000),
    })
    const payload = `ping ${randomUUID()}`
    stream.send(new TextEncoder().encode(payload))
    await stream.close()
    const reply = await withTimeout(
      (async () => {
        const chunks: Uint8Array[] = []
        for await (const chunk of stream) chunks.push(chunk.subarray())
        return Buffer.concat(chunks).toString('utf8')
      })(),
      10_000,
      'echo reply through the relay',
    )
    // LimitTracker exposes `bytes`/`seconds` as non-enumerable getters: JSON.stringify shows `{}`.
    console.log(
      `relayed echo: dial to answer ${Date.now() - dialStart} ms; relay limits left: ` +
        `${conn.limits?.bytes} bytes, ${conn.limits?.seconds} s`,
    )
    expect(reply).toBe(`pong:${payload}`)
    // The home side's own log line (stderr may arrive after the reply): it saw a limited connection.
    const served = await withTimeout(
      stderrLine((l) => l.includes(`echo ${JSON.stringify(payload)}`)),
      5_000,
      'nat-peer log of the echo',
    )
    expect(served).toContain('limited=true')
    expect(served).toContain('/p2p-circuit')
  })
})
