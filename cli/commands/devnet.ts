import { access, mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { type BootstrapNode, startBootstrap } from '../../bootstrap/bootstrap-node.ts'
import { LlamaCppEngine } from '../../daemon/engines/llamacpp/engine.ts'
import { writeTinyModel } from '../../daemon/engines/llamacpp/tiny-model.ts'
import type { EngineHandle } from '../../daemon/engines/types.ts'
import { type Authority, initAuthority, loadAuthority } from '../../mesh/authority.ts'
import { issueRegionCertificate } from '../../mesh/certificate.ts'
import { type DiscoveredHead, RegionDiscovery } from '../../mesh/discovery.ts'
import { loadOrCreateIdentity } from '../../mesh/identity.ts'
import { createLogger } from '../../mesh/logger.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { type CommandContext, defaultDataDir, parseOptions, print, UsageError } from '../io.ts'

export const usage = `Usage: garage devnet [--regions N] [--nodes N] [--data-dir DIR]

Runs a whole Garage mesh on this machine, on loopback, with no GPU and no network: a federation
authority, one bootstrap node per region (regions "local", "local-2", ...) with certificates it
issues, and N nodes that discover their region through the DHT, each with an embedded llama.cpp
engine serving the tiny model the project generates (made on first run). Prints a banner and writes the
same facts to <data dir>/devnet.json. Ctrl-C stops everything.

Options:
  --regions N     regions to run (default: 1)
  --nodes N       nodes to start (default: 2)
  --data-dir DIR  where devnet keys and state live (default: <Garage data dir>/devnet)`

export interface DevnetInfo {
  authority: string
  regions: Array<{
    name: string
    headPeerId: string
    bootstrapAddr: string
    metricsUrl: string
    healthUrl: string
  }>
  /** The tiny model every node's embedded engine serves. */
  model: { path: string; servedModelName: string }
  nodes: Array<{
    peerId: string
    region: string | null
    head: string | null
    rttMs: number | null
    engineUrl: string
    engineKey: string
  }>
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  )
}

export interface Devnet {
  info: DevnetInfo
  stop(): Promise<void>
}

export const devnetModelName = 'garage-tiny'

interface DevnetNode {
  node: MeshNode
  discovery: RegionDiscovery
  engine: LlamaCppEngine
  chosen: DiscoveredHead | null
  handle: EngineHandle | null
}

/** Starts the devnet; the CLI and tests share this. */
export async function startDevnet(options: {
  dataDir: string
  regions: number
  nodes: number
}): Promise<Devnet> {
  // The banner is the devnet's output; logs only when something goes wrong (GARAGE_LOG_LEVEL=info for more).
  const logger = createLogger('garage-devnet', 'warn')
  const authorityDir = join(options.dataDir, 'authority')
  const authority: Authority = (await exists(join(authorityDir, 'authority.key')))
    ? await loadAuthority(authorityDir)
    : await initAuthority(authorityDir)
  const bootstraps: BootstrapNode[] = []
  const nodes: DevnetNode[] = []
  const stop = async (): Promise<void> => {
    for (const n of nodes) n.discovery.stop()
    await Promise.allSettled(nodes.flatMap((n) => [n.node.stop(), n.engine.stop()]))
    await Promise.allSettled(bootstraps.map((b) => b.stop()))
  }
  try {
    for (let i = 0; i < options.regions; i++) {
      const name = i === 0 ? 'local' : `local-${i + 1}`
      const dataDir = join(options.dataDir, `bootstrap-${name}`)
      const head = peerIdFromPrivateKey(await loadOrCreateIdentity(dataDir)).toString()
      const certPath = join(dataDir, 'region.cert')
      await writeFile(
        certPath,
        await issueRegionCertificate(authority.key, { region: name, head, addrs: [], ttlMs: 86_400_000 }),
      )
      bootstraps.push(
        await startBootstrap({
          dataDir,
          region: name,
          certPath,
          authority: authority.id,
          listen: ['/ip4/127.0.0.1/tcp/0', '/ip4/127.0.0.1/tcp/0/ws'],
          bootstrap: bootstraps.map((b) => b.node.getMultiaddrs()[0]!.toString()),
          allowPrivateAddresses: true,
          httpPort: 0,
          logger,
        }),
      )
    }
    await Promise.all(bootstraps.map((b) => b.announce().catch(() => {})))
    const bootstrapAddrs = bootstraps.map((b) => b.node.getMultiaddrs()[0]!.toString())
    const modelPath = join(options.dataDir, 'models', 'garage-tiny.gguf')
    if (!(await exists(modelPath))) {
      await mkdir(join(options.dataDir, 'models'), { recursive: true })
      await writeTinyModel(modelPath)
    }
    for (let i = 0; i < options.nodes; i++) {
      const node = await createMeshNode({
        privateKey: await generateKeyPair('Ed25519'),
        listen: ['/ip4/127.0.0.1/tcp/0'],
        bootstrap: bootstrapAddrs,
        allowPrivateAddresses: true,
      })
      const discovery = new RegionDiscovery(node, { authority: authority.id })
      const engine = new LlamaCppEngine()
      nodes.push({ node, discovery, engine, chosen: null, handle: null })
    }
    await Promise.all(
      nodes.map(async (n) => {
        n.discovery.start()
        n.chosen = await n.discovery.choose().catch(() => null)
        // One thread per engine: a devnet's engines share this machine's cores.
        n.handle = await n.engine.start({
          model: modelPath,
          servedModelName: devnetModelName,
          threads: 1,
          parallel: 2,
        })
      }),
    )
    const info: DevnetInfo = {
      authority: authority.id,
      regions: bootstraps.map((b, i) => ({
        name: b.region,
        headPeerId: b.peerId.toString(),
        bootstrapAddr: bootstrapAddrs[i]!,
        metricsUrl: `${b.http.url}/metrics`,
        healthUrl: `${b.http.url}/health`,
      })),
      model: { path: modelPath, servedModelName: devnetModelName },
      nodes: nodes.map((n) => ({
        peerId: n.node.peerId.toString(),
        region: n.chosen?.region ?? null,
        head: n.chosen?.peerId ?? null,
        rttMs: n.chosen?.rttMs ?? null,
        engineUrl: n.handle!.baseUrl,
        engineKey: n.handle!.apiKey,
      })),
    }
    // It holds engine keys: readable by this user only.
    await writeFile(join(options.dataDir, 'devnet.json'), `${JSON.stringify(info, null, 2)}\n`, {
      mode: 0o600,
    })
    return { info, stop }
  } catch (err) {
    await stop()
    throw err
  }
}

function positiveInt(text: string, what: string): number {
  const n = Number(text)
  if (!Number.isInteger(n) || n < 0 || n > 1000)
    throw new UsageError(`${what} must be a whole number from 0 to 1000`)
  return n
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    regions: { type: 'string', default: '1' },
    nodes: { type: 'string', default: '2' },
    'data-dir': { type: 'string' },
  })
  const dataDir = values['data-dir'] ?? join(defaultDataDir(ctx.env), 'devnet')
  await mkdir(dataDir, { recursive: true, mode: 0o700 })
  const regions = positiveInt(values.regions, '--regions')
  if (regions < 1) throw new UsageError('--regions must be at least 1')
  print(ctx.stderr, `starting devnet: ${regions} region(s), ${values.nodes} node(s), data in ${dataDir}`)
  const devnet = await startDevnet({ dataDir, regions, nodes: positiveInt(values.nodes, '--nodes') })
  const { info } = devnet
  const lines = [
    '',
    'Garage devnet is up.',
    `  authority   ${info.authority}`,
    ...info.regions.flatMap((r) => [
      `  region      ${r.name}  head ${r.headPeerId}`,
      `    bootstrap ${r.bootstrapAddr}`,
      `    metrics   ${r.metricsUrl}`,
    ]),
    `  model       ${info.model.servedModelName} (${info.model.path})`,
    ...info.nodes.flatMap((n) => [
      `  node        ${n.peerId} -> ${n.region ?? 'no region found'}${n.rttMs != null ? ` (${n.rttMs} ms)` : ''}`,
      `    engine    ${n.engineUrl} (embedded llama.cpp, loopback only)`,
    ]),
    '',
    'Try:',
    `  npx garage regions --allow-private --authority ${info.authority} --bootstrap ${info.regions[0]!.bootstrapAddr}`,
    `  curl -s ${info.nodes[0]?.engineUrl ?? 'http://127.0.0.1:PORT'}/v1/chat/completions -H "Authorization: Bearer $(jq -r '.nodes[0].engineKey' ${join(dataDir, 'devnet.json')})" \\`,
    `    -H 'Content-Type: application/json' -d '{"model":"${info.model.servedModelName}","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'`,
    '',
    `Written to ${join(dataDir, 'devnet.json')}. Ctrl-C stops the devnet.`,
  ]
  print(ctx.stdout, lines.join('\n'))
  await new Promise<void>((resolve) => {
    if (ctx.shutdown.aborted) resolve()
    ctx.shutdown.addEventListener('abort', () => resolve(), { once: true })
  })
  print(ctx.stderr, 'stopping devnet')
  await devnet.stop()
  return 0
}
