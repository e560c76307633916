import { defaultBootstrapHttpPort, startBootstrap } from '../../bootstrap/bootstrap-node.ts'
import {
  defaultHeadHttpPort,
  type RegionalHead,
  type RegionalHeadOptions,
  startRegionalHead,
} from '../../bootstrap/head/head.ts'
import type { TrustedEngine } from '../../bootstrap/head/integrity.ts'
import { loadRegionPolicy, type RegionPolicy } from '../../bootstrap/head/policy.ts'
import { RayHead } from '../../bootstrap/head/ray-head.ts'
import { vllmImage } from '../../containers/images.ts'
import { createLogger } from '../../core/logger.ts'
import { defaultDataDir } from '../../core/paths.ts'
import { readSecretIfPresent } from '../../core/secret-file.ts'
import { VllmEngine } from '../../daemon/engines/vllm/engine.ts'
import {
  type CommandContext,
  parseDuration,
  parseHostPort,
  parseOptions,
  print,
  splitList,
  UsageError,
} from '../io.ts'

export const defaultBootstrapListen = ['/ip4/0.0.0.0/tcp/4001', '/ip4/0.0.0.0/tcp/4002/ws']

export const usage = `Usage: garage bootstrap --region NAME --cert FILE [options]

Runs a bootstrap node for region NAME: a kad-dht server, a circuit relay v2 server with bounded
reservations, the region's announcement in the DHT (refreshed), its certificate on
/garage/region/1.0.0, and /metrics and /health over HTTP. The certificate must name this node's
PeerId (see 'garage id'). SIGHUP re-reads the certificate; SIGINT or SIGTERM stop cleanly.

With --policy FILE the node is also the region's head: it admits nodes (/garage/join/1.0.0) with
assignments from the policy, keeps their telemetry, and routes OpenAI requests to them through the
mesh; its HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /metrics, /health) needs the
token in <data dir>/head-api.token. docs/region.md describes the policy file.

Options:
  --region NAME          the region this node announces (must match the certificate)
  --cert FILE            region certificate from 'garage authority issue'
  --authority ID         verify the certificate against this authority at start
  --listen MULTIADDR     listen address, repeatable (default: ${defaultBootstrapListen.join(', ')})
  --announce MULTIADDR   public address to announce instead, repeatable
  --bootstrap MULTIADDR  another bootstrap node of the federation, repeatable
  --http HOST:PORT       metrics and health endpoint (default: 127.0.0.1:${defaultBootstrapHttpPort})
  --max-reservations N   relay reservations held at once (default: 256)
  --announce-interval D  how often to re-announce the region (default: 10m)
  --policy FILE          also run the regional head with this region policy (JSON)
  --head-http HOST:PORT  the head's OpenAI API (default: 127.0.0.1:${defaultHeadHttpPort})
  --ray-address ADDRESS  where the policy runs a Ray cluster: the address workers reach its head at
  --ray-image IMAGE      the image of the region's Ray cluster (head and workers; default the pinned
                         rayproject/ray build)
  --vllm-image IMAGE     the image of the pipeline groups' vLLM (default the pinned vllm/vllm-openai)
  --federation PEER_ID   a federation gateway allowed to send requests to this head, repeatable
  --integrity-rate R     share of an established node's answers re-scored (default 0.02; 0 turns
                         result integrity checks off: docs/integrity.md)
  --trusted-engine URL   an OpenAI-compatible engine the coordinator runs (vLLM, or the embedded one)
                         that verifies the policy's models instead of other nodes; its bearer key
                         in --trusted-engine-key-file FILE (0600)
  --no-direct            lease no nodes to the federation: every request comes through this head
  --allow-private        dial private and loopback addresses (LAN, devnet, tests)
  --data-dir DIR         where the identity key lives (default: $GARAGE_DATA_DIR or the OS's data folder)`

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    region: { type: 'string' },
    cert: { type: 'string' },
    authority: { type: 'string' },
    listen: { type: 'string', multiple: true },
    announce: { type: 'string', multiple: true },
    bootstrap: { type: 'string', multiple: true },
    http: { type: 'string' },
    'max-reservations': { type: 'string' },
    'announce-interval': { type: 'string', default: '10m' },
    'allow-private': { type: 'boolean', default: false },
    'data-dir': { type: 'string' },
    'ray-image': { type: 'string' },
    'vllm-image': { type: 'string' },
    policy: { type: 'string' },
    'head-http': { type: 'string' },
    'ray-address': { type: 'string' },
    federation: { type: 'string', multiple: true },
    'integrity-rate': { type: 'string' },
    'trusted-engine': { type: 'string' },
    'trusted-engine-key-file': { type: 'string' },
    'no-direct': { type: 'boolean', default: false },
  })
  if (values.region == null) throw new UsageError('--region is required')
  if (values.cert == null) throw new UsageError('--cert is required')
  const http = parseHostPort(values.http ?? `127.0.0.1:${defaultBootstrapHttpPort}`, '--http')
  const maxReservations = values['max-reservations'] != null ? Number(values['max-reservations']) : undefined
  if (maxReservations != null && !(Number.isInteger(maxReservations) && maxReservations >= 0)) {
    throw new UsageError('--max-reservations must be a whole number')
  }
  const headHttp = parseHostPort(values['head-http'] ?? `127.0.0.1:${defaultHeadHttpPort}`, '--head-http')
  const policy = values.policy != null ? await loadRegionPolicy(values.policy) : null
  if (policy != null && policy.region !== values.region) {
    throw new UsageError(`the policy ${values.policy} is for region ${policy.region}, not ${values.region}`)
  }
  const integrity = await integrityOptions(values, policy)
  const listen = splitList(values.listen)
  const announce = splitList(values.announce)
  const logger = createLogger()
  const dataDir = values['data-dir'] ?? defaultDataDir(ctx.env)
  const node = await startBootstrap({
    dataDir,
    region: values.region,
    certPath: values.cert,
    ...(values.authority != null ? { authority: values.authority } : {}),
    listen: listen.length > 0 ? listen : defaultBootstrapListen,
    ...(announce.length > 0 ? { announce } : {}),
    bootstrap: splitList(values.bootstrap),
    allowPrivateAddresses: values['allow-private'],
    ...(maxReservations != null ? { relay: { maxReservations } } : {}),
    httpHost: http.host,
    httpPort: http.port,
    announceIntervalMs: parseDuration(values['announce-interval'], '--announce-interval'),
    logger,
  })
  const onHup = (): void => {
    node
      .reloadCertificate()
      .catch((err: Error) =>
        logger.error({ err: err.message }, 'certificate reload failed; keeping the old one'),
      )
  }
  let head: RegionalHead | null = null
  let ray: RayHead | null = null
  if (policy != null) {
    try {
      if (policy.ray.enabled) {
        // The region's Ray head runs in a container beside the head; its token goes only into
        // assignments to nodes that opted in, when the policy marks the cluster trusted.
        ray = new RayHead({
          nodePeerId: node.peerId.toString(),
          dataDir,
          ...(values['ray-address'] != null ? { nodeIpAddress: values['ray-address'] } : {}),
          ...(values['ray-image'] != null ? { image: values['ray-image'] } : {}),
          ...(policy.ray.port != null ? { gcsPort: policy.ray.port } : {}),
          logger,
        })
        const started = await ray.start()
        print(ctx.stderr, `Ray head ready at ${started.address}`)
      }
      const headPeerId = node.peerId.toString()
      head = await startRegionalHead({
        ray,
        // A pipeline group's vLLM runs beside the Ray head, as the cluster's driver (no GPU of its own).
        groupEngine: (group) =>
          new VllmEngine({
            nodePeerId: headPeerId,
            dataDir,
            image: values['vllm-image'] ?? vllmImage,
            gpu: 'none',
            role: 'vllm-group',
            rayCluster: {
              address: group.cluster.address,
              token: group.cluster.token,
              pipelineParallel: group.pipelineParallel,
              tensorParallel: group.tensorParallel,
            },
            logger,
          }),
        federationPeers: splitList(values.federation),
        directPath: !values['no-direct'],
        node: node.node,
        region: node.region,
        policy,
        dataDir,
        httpHost: headHttp.host,
        httpPort: headHttp.port,
        integrity,
        logger,
      })
      const started = head
      // `garage regions` shows each region's nodes and the ones the integrity check holds back.
      node.setRegionStatus(() => ({
        nodes: started.registry.size,
        quarantined: started.integrity?.quarantined().length ?? 0,
      }))
    } catch (err) {
      await ray?.stop()
      await node.stop()
      throw err
    }
  }
  process.on('SIGHUP', onHup)
  const cert = node.certificate()
  print(ctx.stdout, 'bootstrap node ready')
  print(ctx.stdout, `  region     ${node.region}`)
  print(ctx.stdout, `  peer id    ${node.peerId.toString()}`)
  for (const a of node.node.getMultiaddrs()) print(ctx.stdout, `  address    ${a.toString()}`)
  print(ctx.stdout, `  metrics    ${node.http.url}/metrics`)
  print(ctx.stdout, `  health     ${node.http.url}/health`)
  print(ctx.stdout, `  cert until ${cert.expiresAt.toISOString()}`)
  if (head != null) {
    print(ctx.stdout, `  head api   ${head.url}/v1 (token in ${dataDir}/head-api.token)`)
    print(ctx.stdout, `  models     ${policy!.models.map((m) => m.name).join(', ')}`)
  }
  await new Promise<void>((resolve) => {
    if (ctx.shutdown.aborted) resolve()
    ctx.shutdown.addEventListener('abort', () => resolve(), { once: true })
  })
  process.off('SIGHUP', onHup)
  print(ctx.stderr, 'stopping bootstrap node')
  await head?.stop()
  await ray?.stop()
  await node.stop()
  return 0
}

/** The head's result integrity checks from the command line: the rate, a trusted engine. */
async function integrityOptions(
  values: { 'integrity-rate'?: string; 'trusted-engine'?: string; 'trusted-engine-key-file'?: string },
  policy: RegionPolicy | null,
): Promise<RegionalHeadOptions['integrity']> {
  const rateText = values['integrity-rate']
  const rate = rateText != null ? Number(rateText) : null
  if (rateText != null && (!/^\d*\.?\d+$/.test(rateText) || rate == null || !(rate >= 0 && rate <= 1)))
    throw new UsageError(`--integrity-rate must be a number from 0 to 1, not ${JSON.stringify(rateText)}`)
  if (rate === 0) return false
  const url = values['trusted-engine']
  const keyFile = values['trusted-engine-key-file']
  if ((url == null) !== (keyFile == null))
    throw new UsageError('--trusted-engine and --trusted-engine-key-file go together')
  let trusted: TrustedEngine | null = null
  if (url != null && keyFile != null) {
    if (!/^https?:\/\/[^\s]+$/.test(url))
      throw new UsageError(`--trusted-engine must be an http(s) URL, not ${url}`)
    const apiKey = await readSecretIfPresent(keyFile, 'the trusted engine key', (m) => new UsageError(m))
    if (apiKey == null) throw new UsageError(`--trusted-engine-key-file ${keyFile} is missing or empty`)
    trusted = { url, apiKey, models: (policy?.models ?? []).map((m) => m.name) }
  }
  return { ...(rate != null ? { sampleRate: rate } : {}), ...(trusted != null ? { trusted } : {}) }
}
