import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { peerIdFromPrivateKey, peerIdFromString } from '@libp2p/peer-id'
import OpenAI from 'openai'
import { afterAll, describe, expect, it } from 'vitest'
import { startBootstrap } from '../../bootstrap/bootstrap-node.ts'
import { startRegionalHead } from '../../bootstrap/head/head.ts'
import { devnetPolicy, devnetModelName as model } from '../../cli/commands/devnet.ts'
import { createLogger } from '../../core/logger.ts'
import { writeTinyModel } from '../../daemon/engines/llamacpp/tiny-model.ts'
import { daemonEnv } from '../../daemon/launch.ts'
import { startFederation } from '../../federation/gateway.ts'
import { initAuthority } from '../../mesh/authority.ts'
import { issueRegionCertificate } from '../../mesh/certificate.ts'
import { loadOrCreateIdentity } from '../../mesh/identity.ts'
import {
  buildNatTopology,
  type NatTopology,
  NatUnavailableError,
  type UndoStep,
  undoAll,
} from '../helpers/nat-topology.ts'
import { GarageProcess } from '../helpers/process-cluster.ts'

/**
 * A `garage node` behind a MASQUERADE NAT (no way in) serves the federation on the direct path: the
 * gateway, in the "public" namespace with the head and its relay, dials the node through the
 * relay's circuit, and DCUtR upgrades that to a direct connection where the NAT lets it (the node
 * dials out to the gateway's public address). The test says which carried the answers.
 */
const garageBin = fileURLToPath(new URL('../../bin/garage.js', import.meta.url))
const tag = `d${process.pid % 100_000}`

async function until<T>(what: string, get: () => T | null | Promise<T | null>, ms = 60_000): Promise<T> {
  const deadline = Date.now() + ms
  for (;;) {
    const v = await get()
    if (v != null) return v
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

describe('the direct path to a node behind NAT', () => {
  const undo: UndoStep[] = []
  afterAll(() => undoAll(undo, 'direct-path NAT test'), 60_000)

  it('the federation reaches the NAT’d node through the relay or DCUtR, bills it, and says which', async (ctx) => {
    let topology: NatTopology
    try {
      topology = buildNatTopology(tag, undo)
    } catch (err) {
      if (!(err instanceof NatUnavailableError)) throw err
      ctx.skip(err.message)
      return
    }
    const { publicIp, homeIp } = topology
    const dir = await mkdtemp(join(tmpdir(), 'garage-direct-nat-'))
    undo.push({ what: 'remove the test dir', fn: () => rm(dir, { recursive: true, force: true }) })
    const logger = createLogger('direct-nat', 'warn')
    const region = 'nat-direct'

    // The coordinator's side, on the "public" network: bootstrap (DHT, relay), head, gateway.
    const authority = await initAuthority(join(dir, 'authority'))
    const headDir = join(dir, 'head')
    const headId = peerIdFromPrivateKey(await loadOrCreateIdentity(headDir)).toString()
    const certPath = join(headDir, 'region.cert')
    await writeFile(
      certPath,
      await issueRegionCertificate(authority.key, { region, head: headId, addrs: [], ttlMs: 3_600_000 }),
    )
    const bootstrap = await startBootstrap({
      dataDir: headDir,
      region,
      certPath,
      authority: authority.id,
      listen: [`/ip4/${publicIp}/tcp/0`],
      bootstrap: [],
      allowPrivateAddresses: true,
      httpPort: 0,
      logger,
    })
    undo.push({ what: 'stop the bootstrap node', fn: () => bootstrap.stop() })
    const head = await startRegionalHead({
      node: bootstrap.node,
      region,
      policy: devnetPolicy(region, 1),
      dataDir: headDir,
      httpPort: 0,
      logger,
    })
    undo.push({ what: 'stop the head', fn: () => head.stop() })
    await bootstrap.announce().catch(() => {})
    const relayAddr = bootstrap.node
      .getMultiaddrs()
      .map(String)
      .find((a) => a.startsWith(`/ip4/${publicIp}/tcp/`))!
    const federation = await startFederation({
      dataDir: join(dir, 'federation'),
      authority: authority.id,
      bootstrap: [relayAddr],
      listen: [`/ip4/${publicIp}/tcp/0`],
      allowPrivateAddresses: true,
      httpPort: 0,
      logger,
    })
    undo.push({ what: 'stop the federation', fn: () => federation.stop() })
    head.allowFederation(federation.peerId.toString())
    const key = (await federation.keys.create({ name: 'nat' })).key

    // The gamer's side: `garage node` in the home namespace, behind the NAT, as a user runs it.
    const nodeDir = join(dir, 'node')
    await mkdir(join(nodeDir, 'models'), { recursive: true })
    await writeTinyModel(join(nodeDir, 'models', 'garage-tiny.gguf'))
    const proc = new GarageProcess(
      'node behind NAT',
      topology.atHome([
        process.execPath,
        garageBin,
        'node',
        ...['--authority', authority.id, '--bootstrap', relayAddr],
        ...['--listen', `/ip4/${homeIp}/tcp/0`, '--allow-private', '--threads', '1'],
        ...['--no-host-policies', '--data-dir', nodeDir],
      ]),
      { ...process.env, ...daemonEnv(), GARAGE_LOG_LEVEL: 'warn' },
    )
    undo.push({ what: 'stop the node', fn: async () => void (await proc.stop('SIGTERM')) })
    ctx.onTestFailed(() => console.warn(`node stderr:\n${proc.stderrTail(80)}`))
    await proc.line(/^\s*engine\s/, 90_000)
    const nodeId = await until('the node serving at its head', () => {
      const n = head.registry.nodes().find((e) => e.state === 'serving')
      return n?.peerId ?? null
    })
    // The head sees the node through the NAT: from the router's public address, never the LAN one.
    for (const c of bootstrap.node.getConnections(peerIdFromString(nodeId)))
      expect(c.remoteAddr.toString()).not.toContain(homeIp)

    await federation.directory.refresh()
    const openai = new OpenAI({ baseURL: `${federation.url}/v1`, apiKey: key, maxRetries: 0 })
    // The first requests go through the head while the gateway takes its leases; then straight.
    const answered = await until(
      'an answer on the direct path',
      async () => {
        const { data, response } = await openai.completions
          .create({ model, prompt: 'behind the NAT', max_tokens: 8 })
          .withResponse()
        return response.headers.get('x-garage-path') === 'direct'
          ? { data, node: response.headers.get('x-garage-node') }
          : null
      },
      30_000,
    )
    expect(answered.node).toBe(nodeId)
    expect(answered.data.usage!.completion_tokens).toBe(8)

    // A stream on the same path, billed as received.
    const { data: stream, response } = await openai.chat.completions
      .create({
        model,
        messages: [{ role: 'user', content: 'stream through the NAT' }],
        max_tokens: 16,
        stream: true,
        stream_options: { include_usage: true },
      })
      .withResponse()
    expect(response.headers.get('x-garage-path')).toBe('direct')
    let usage = 0
    for await (const chunk of stream) if (chunk.usage != null) usage = chunk.usage.completion_tokens
    expect(usage).toBe(16)

    // Which way the gateway reaches the node now: a direct connection (DCUtR upgraded the relayed
    // one: the node dialled out to the gateway's public address), or only the relay's circuit.
    const connections = federation.node.getConnections(peerIdFromString(nodeId))
    expect(connections.length).toBeGreaterThan(0)
    const upgraded = connections.some((c) => !c.remoteAddr.toString().includes('/p2p-circuit'))
    const relayed = connections.some((c) => c.remoteAddr.toString().includes('/p2p-circuit'))
    const path = upgraded ? 'DCUtR (direct connection through the NAT)' : 'the relay (circuit v2)'
    console.log(
      `direct path to the NAT'd node: ${path}; connections: ${connections.map((c) => c.remoteAddr.toString()).join(', ')}`,
    )
    expect(upgraded || relayed).toBe(true)
    // No connection ever goes to the node's LAN address: there is no way in.
    for (const c of connections) expect(c.remoteAddr.toString()).not.toContain(`/ip4/${homeIp}/`)

    // The head learnt of both answers from the gateway's reports.
    await federation.direct!.flush()
    expect(head.verified.verified(nodeId)).toBeGreaterThanOrEqual(8 + 16)
  }, 180_000)
})
