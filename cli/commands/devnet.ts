import { access, mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { type BootstrapNode, startBootstrap } from '../../bootstrap/bootstrap-node.ts'
import { type RegionalHead, startRegionalHead } from '../../bootstrap/head/head.ts'
import { parseRegionPolicy, type RegionPolicy } from '../../bootstrap/head/policy.ts'
import { createLogger } from '../../core/logger.ts'
import { defaultDataDir } from '../../core/paths.ts'
import { type ControlServer, startControlServer } from '../../daemon/control/server.ts'
import { writeTinyModel } from '../../daemon/engines/llamacpp/tiny-model.ts'
import { probeHardware } from '../../daemon/hardware/probe.ts'
import { NodeDaemon } from '../../daemon/node-daemon.ts'
import { type Federation, startFederation } from '../../federation/gateway.ts'
import { type Authority, initAuthority, loadAuthority } from '../../mesh/authority.ts'
import { issueRegionCertificate } from '../../mesh/certificate.ts'
import { loadOrCreateIdentity } from '../../mesh/identity.ts'
import { type CommandContext, parseOptions, print, UsageError } from '../io.ts'

export const usage = `Usage: garage devnet [--regions N] [--nodes N] [--embedding-nodes N] [--port N] [--data-dir DIR]

Runs a whole Garage mesh on this machine, on loopback, with no GPU and no network: a federation
authority, one bootstrap node and regional head per region (regions "local", "local-2", ...) with
certificates it issues, and N nodes that discover their region through the DHT, join its head and
serve the tiny model the project generates (made on first run) on the embedded llama.cpp engine,
and the federation gateway on 127.0.0.1:<port> with a fresh dev API key: any OpenAI SDK pointed at
it reaches the nodes through a head and the mesh. Prints a banner and writes the same facts to
<data dir>/devnet.json (mode 0600: it holds keys). Ctrl-C or SIGTERM stops everything.

Options:
  --regions N     regions to run (default: 1)
  --nodes N       nodes serving the chat model (default: 2)
  --embedding-nodes N
                  nodes serving the tiny embedding model (garage-tiny-embed) in the first
                  region, for /v1/embeddings (default: 1; 0: none)
  --port N        the federation's port on 127.0.0.1 (default: 8080; 0 picks a free one)
  --data-dir DIR  where devnet keys and state live (default: <Garage data dir>/devnet)`

export interface DevnetInfo {
  /** The public API: base URL (…/v1 is the OpenAI base), a dev API key, the admin token. */
  federation: { url: string; apiKey: string; adminToken: string; peerId: string }
  authority: string
  regions: Array<{
    name: string
    headPeerId: string
    bootstrapAddr: string
    metricsUrl: string
    healthUrl: string
    /** The head's OpenAI API (bearer headToken). */
    headUrl: string
    headToken: string
  }>
  /** The tiny model the chat nodes' embedded engines serve. */
  model: { path: string; servedModelName: string }
  /** The tiny embedding model, when embedding nodes run. */
  embeddingModel: { servedModelName: string } | null
  nodes: Array<{
    peerId: string
    region: string | null
    head: string | null
    rttMs: number | null
    model: string | null
    engineUrl: string
    engineKey: string
    /** The node's control API and dashboard (open `${controlUrl}/#token=${controlToken}`). */
    controlUrl: string
    controlToken: string
  }>
}

/**
 * The devnet's region policy: its chat nodes serve the tiny model on the embedded engine, and its
 * embedding nodes (if any) the tiny embedding model. Replicas are exact, so the head assigns each
 * joining node the model that still lacks one, whatever order they join in.
 */
export function devnetPolicy(region: string, nodes: number, embeddingNodes = 0): RegionPolicy {
  const tiny = { engine: ['llamacpp'], minVramMiB: 0, minRamMiB: 16, contextLength: 4096 }
  return parseRegionPolicy({
    region,
    models: [
      {
        ...tiny,
        name: devnetModelName,
        source: { gguf: 'garage-tiny' },
        replicas: Math.max(1, nodes),
        parallel: 2,
      },
      ...(embeddingNodes > 0
        ? [
            {
              ...tiny,
              name: devnetEmbeddingModelName,
              source: { gguf: 'garage-tiny-embed' },
              replicas: embeddingNodes,
              task: 'embed',
            },
          ]
        : []),
    ],
    ray: { enabled: false },
  })
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  )
}

export interface Devnet {
  info: DevnetInfo
  federation: Federation
  bootstraps: BootstrapNode[]
  heads: RegionalHead[]
  nodes: NodeDaemon[]
  stop(): Promise<void>
}

/** Name of the API key each devnet start makes (the previous one is revoked). */
export const devnetKeyName = 'devnet'

export const devnetModelName = 'garage-tiny'
export const devnetEmbeddingModelName = 'garage-tiny-embed'

/** Starts the devnet; the CLI and tests share this. */
export async function startDevnet(options: {
  dataDir: string
  regions: number
  /** Nodes serving the chat model, spread over the regions. */
  nodes: number
  /** Nodes serving the tiny embedding model, in the first region (default 0). */
  embeddingNodes?: number
  /** Federation port on 127.0.0.1; 0 picks a free one. */
  port: number
}): Promise<Devnet> {
  const embeddingNodes = options.embeddingNodes ?? 0
  // The banner is the devnet's output; logs only when something goes wrong (GARAGE_LOG_LEVEL=info for more).
  const logger = createLogger('garage-devnet', 'warn')
  const authorityDir = join(options.dataDir, 'authority')
  const authority: Authority = (await exists(join(authorityDir, 'authority.key')))
    ? await loadAuthority(authorityDir)
    : await initAuthority(authorityDir)
  const bootstraps: BootstrapNode[] = []
  const heads: RegionalHead[] = []
  const nodes: NodeDaemon[] = []
  const controls: ControlServer[] = []
  let federation: Federation | null = null
  const stop = async (): Promise<void> => {
    await federation?.stop().catch(() => {})
    await Promise.allSettled(nodes.map((n) => n.stop({ graceMs: 5_000 })))
    await Promise.allSettled(controls.map((c) => c.close()))
    await Promise.allSettled(heads.map((h) => h.stop()))
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
      heads.push(
        await startRegionalHead({
          node: bootstraps[i]!.node,
          region: name,
          // Exact replicas: the chat nodes spread over the regions in turn, embedding ones in the first.
          policy: devnetPolicy(
            name,
            Math.floor(options.nodes / options.regions) + (i < options.nodes % options.regions ? 1 : 0),
            i === 0 ? embeddingNodes : 0,
          ),
          dataDir,
          httpPort: 0,
          logger,
        }),
      )
    }
    await Promise.all(bootstraps.map((b) => b.announce().catch(() => {})))
    const bootstrapAddrs = bootstraps.map((b) => b.node.getMultiaddrs()[0]!.toString())
    federation = await startFederation({
      dataDir: join(options.dataDir, 'federation'),
      authority: authority.id,
      bootstrap: bootstrapAddrs,
      listen: ['/ip4/127.0.0.1/tcp/0'],
      allowPrivateAddresses: true,
      httpPort: options.port,
      logger,
    })
    for (const h of heads) h.allowFederation(federation.peerId.toString())
    for (const k of await federation.keys.list())
      if (k.name === devnetKeyName && k.revokedAt == null) await federation.keys.revoke(k.id)
    const devKey = await federation.keys.create({ name: devnetKeyName })
    const modelPath = join(options.dataDir, 'models', 'garage-tiny.gguf')
    if (!(await exists(modelPath))) {
      await mkdir(join(options.dataDir, 'models'), { recursive: true })
      await writeTinyModel(modelPath)
    }
    // One probe for every node: they all share this machine.
    const hardware = await probeHardware({ dataDir: options.dataDir, otherGpus: false })
    for (let i = 0; i < options.nodes + embeddingNodes; i++) {
      nodes.push(
        new NodeDaemon({
          dataDir: join(options.dataDir, `node-${i + 1}`),
          modelsDir: join(options.dataDir, 'models'),
          authority: authority.id,
          bootstrap: bootstrapAddrs,
          // Spread over the regions in turn, so each region has nodes (all RTTs are equal here);
          // embedding nodes join the first region, whose policy has a place for them.
          region: bootstraps[i < options.nodes ? i % bootstraps.length : 0]!.region,
          listen: ['/ip4/127.0.0.1/tcp/0'],
          allowPrivateAddresses: true,
          hardware,
          // One thread per engine: a devnet's engines share this machine's cores.
          threads: 1,
          logger,
        }),
      )
    }
    for (const [i, n] of nodes.entries()) {
      controls.push(await startControlServer(n, { dataDir: join(options.dataDir, `node-${i + 1}`), logger }))
    }
    await Promise.all(nodes.map((n) => n.start()))
    // The gateway sees the regions' models at its next refresh; the devnet is up once it does.
    await federation.directory.refresh()
    const info: DevnetInfo = {
      federation: {
        url: federation.url,
        apiKey: devKey.key,
        adminToken: federation.adminToken,
        peerId: federation.peerId.toString(),
      },
      authority: authority.id,
      regions: bootstraps.map((b, i) => ({
        name: b.region,
        headPeerId: b.peerId.toString(),
        bootstrapAddr: bootstrapAddrs[i]!,
        metricsUrl: `${b.http.url}/metrics`,
        healthUrl: `${b.http.url}/health`,
        headUrl: heads[i]!.url,
        headToken: heads[i]!.apiToken,
      })),
      model: { path: modelPath, servedModelName: devnetModelName },
      embeddingModel: embeddingNodes > 0 ? { servedModelName: devnetEmbeddingModelName } : null,
      nodes: nodes.map((n, index) => {
        const i = n.info()
        const control = controls[index]!
        return {
          peerId: i.peerId!,
          region: i.region,
          head: i.head,
          rttMs: i.rttMs,
          model: i.model,
          engineUrl: i.engineUrl!,
          engineKey: i.engineKey!,
          controlUrl: control.url,
          controlToken: control.token,
        }
      }),
    }
    // It holds engine keys and head tokens: readable by this user only.
    await writeFile(join(options.dataDir, 'devnet.json'), `${JSON.stringify(info, null, 2)}\n`, {
      mode: 0o600,
    })
    return { info, federation, bootstraps, heads, nodes, stop }
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

/** One status line: nodes by state and the tokens per second they report. */
function statusLine(devnet: Devnet): string {
  let serving = 0
  let other = 0
  let tps = 0
  for (const h of devnet.heads) {
    for (const n of h.registry.nodes()) {
      if (n.state === 'serving') serving++
      else other++
      tps += n.telemetry?.tokensPerSecond ?? 0
    }
  }
  return `nodes: ${serving} serving${other > 0 ? `, ${other} other` : ''} | ${tps.toFixed(1)} tok/s`
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    regions: { type: 'string', default: '1' },
    nodes: { type: 'string', default: '2' },
    'embedding-nodes': { type: 'string', default: '1' },
    port: { type: 'string', default: '8080' },
    'data-dir': { type: 'string' },
  })
  const dataDir = values['data-dir'] ?? join(defaultDataDir(ctx.env), 'devnet')
  await mkdir(dataDir, { recursive: true, mode: 0o700 })
  const regions = positiveInt(values.regions, '--regions')
  if (regions < 1) throw new UsageError('--regions must be at least 1')
  const port = Number(values.port)
  if (!Number.isInteger(port) || port < 0 || port > 65_535) throw new UsageError('--port must be 0-65535')
  print(ctx.stderr, `starting devnet: ${regions} region(s), ${values.nodes} node(s), data in ${dataDir}`)
  const devnet = await startDevnet({
    dataDir,
    regions,
    nodes: positiveInt(values.nodes, '--nodes'),
    embeddingNodes: positiveInt(values['embedding-nodes'], '--embedding-nodes'),
    port,
  })
  const { info } = devnet
  const base = `${info.federation.url}/v1`
  const lines = [
    '',
    'Garage devnet is up.',
    '',
    `  OpenAI base URL  ${base}`,
    `  API key          ${info.federation.apiKey}`,
    `  model            ${info.model.servedModelName}`,
    ...(info.embeddingModel != null ? [`  embedding model  ${info.embeddingModel.servedModelName}`] : []),
    '',
    '  curl:',
    `    curl -s ${base}/chat/completions -H "Authorization: Bearer ${info.federation.apiKey}" \\`,
    `      -H 'Content-Type: application/json' -d '{"model":"${info.model.servedModelName}","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'`,
    '  any OpenAI SDK:',
    `    OPENAI_BASE_URL=${base} OPENAI_API_KEY=${info.federation.apiKey}`,
    '',
    `  authority   ${info.authority}`,
    ...info.regions.flatMap((r) => [
      `  region      ${r.name}  head ${r.headPeerId}`,
      `    bootstrap ${r.bootstrapAddr}`,
      `    head api  ${r.headUrl}/v1  metrics ${r.metricsUrl}`,
    ]),
    ...info.nodes.flatMap((n) => [
      `  node        ${n.peerId} -> ${n.region ?? 'no region found'}${n.rttMs != null ? ` (${n.rttMs} ms)` : ''}`,
      `    engine    ${n.engineUrl} (embedded llama.cpp, loopback only)`,
      `    dashboard ${n.controlUrl}/#token=${n.controlToken}`,
    ]),
    `  ledger      npx garage ledger --data-dir ${join(dataDir, 'federation')}`,
    '',
    `Written to ${join(dataDir, 'devnet.json')}. Ctrl-C stops the devnet.`,
  ]
  print(ctx.stdout, lines.join('\n'))
  // A live status line where a person watches; nothing in logs or pipes.
  const live = (ctx.stderr as NodeJS.WriteStream).isTTY === true
  const timer = live
    ? setInterval(() => ctx.stderr.write(`\r\x1b[2K${statusLine(devnet)}`), 2_000)
    : undefined
  await new Promise<void>((resolve) => {
    if (ctx.shutdown.aborted) resolve()
    ctx.shutdown.addEventListener('abort', () => resolve(), { once: true })
  })
  clearInterval(timer)
  if (live) ctx.stderr.write('\n')
  print(ctx.stderr, 'stopping devnet')
  await devnet.stop()
  return 0
}
