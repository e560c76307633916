import { defaultBootstrapHttpPort, startBootstrap } from '../../bootstrap/bootstrap-node.ts'
import { createLogger } from '../../mesh/logger.ts'
import {
  type CommandContext,
  defaultDataDir,
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
  })
  if (values.region == null) throw new UsageError('--region is required')
  if (values.cert == null) throw new UsageError('--cert is required')
  const http = parseHostPort(values.http ?? `127.0.0.1:${defaultBootstrapHttpPort}`, '--http')
  const maxReservations = values['max-reservations'] != null ? Number(values['max-reservations']) : undefined
  if (maxReservations != null && !(Number.isInteger(maxReservations) && maxReservations >= 0)) {
    throw new UsageError('--max-reservations must be a whole number')
  }
  const listen = splitList(values.listen)
  const announce = splitList(values.announce)
  const logger = createLogger()
  const node = await startBootstrap({
    dataDir: values['data-dir'] ?? defaultDataDir(ctx.env),
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
  process.on('SIGHUP', onHup)
  const cert = node.certificate()
  print(ctx.stdout, 'bootstrap node ready')
  print(ctx.stdout, `  region     ${node.region}`)
  print(ctx.stdout, `  peer id    ${node.peerId.toString()}`)
  for (const a of node.node.getMultiaddrs()) print(ctx.stdout, `  address    ${a.toString()}`)
  print(ctx.stdout, `  metrics    ${node.http.url}/metrics`)
  print(ctx.stdout, `  health     ${node.http.url}/health`)
  print(ctx.stdout, `  cert until ${cert.expiresAt.toISOString()}`)
  await new Promise<void>((resolve) => {
    if (ctx.shutdown.aborted) resolve()
    ctx.shutdown.addEventListener('abort', () => resolve(), { once: true })
  })
  process.off('SIGHUP', onHup)
  print(ctx.stderr, 'stopping bootstrap node')
  await node.stop()
  return 0
}
