import { createLogger } from '../../core/logger.ts'
import { defaultFederationPort, startFederation } from '../../federation/gateway.ts'
import { federationDataDir } from '../../federation/store.ts'
import {
  authorityOption,
  bootstrapOption,
  type CommandContext,
  parseHostPort,
  parseOptions,
  print,
  splitList,
} from '../io.ts'

export const usage = `Usage: garage federation --authority ID --bootstrap MULTIADDR [options]

Runs the federation gateway: the public OpenAI-compatible API. It authenticates API keys ('garage keys
create'), applies their limits, finds the regions' heads through the DHT (certificates checked against
the pinned authority), keeps each region's models and load up to date, sends each request to the best
region over the mesh (failing over to another before the first byte) and records usage per key and
credits per node ('garage ledger'). Each region's head must allow this gateway's PeerId
('garage bootstrap --federation PEER_ID'), printed at start. SIGINT or SIGTERM stop it.

Options:
  --authority ID         the federation authority's id to trust (required; default: $GARAGE_AUTHORITY)
  --bootstrap MULTIADDR  a bootstrap node, repeatable (required; default: $GARAGE_BOOTSTRAP)
  --http HOST:PORT       the API (default: 127.0.0.1:${defaultFederationPort}; put TLS in front for the public)
  --listen MULTIADDR     libp2p listen address, repeatable (default: TCP on a random port)
  --allow-private        dial private and loopback addresses (LAN, devnet, tests)
  --no-direct            send every request through its region's head (default: straight to the
                         nodes each head leases this gateway, the head path as the fallback)
  --data-dir DIR         keys, ledger, admin token, identity (default: <Garage data dir>/federation)`

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    authority: { type: 'string' },
    bootstrap: { type: 'string', multiple: true },
    http: { type: 'string' },
    listen: { type: 'string', multiple: true },
    'allow-private': { type: 'boolean', default: false },
    'no-direct': { type: 'boolean', default: false },
    'data-dir': { type: 'string' },
  })
  const authority = authorityOption(values.authority, ctx.env)
  const bootstrap = bootstrapOption(values.bootstrap, ctx.env)
  const http = parseHostPort(values.http ?? `127.0.0.1:${defaultFederationPort}`, '--http')
  const listen = splitList(values.listen)
  const dataDir = federationDataDir(ctx.env, values['data-dir'])
  const federation = await startFederation({
    dataDir,
    authority,
    bootstrap,
    ...(listen.length > 0 ? { listen } : {}),
    allowPrivateAddresses: values['allow-private'],
    directPath: !values['no-direct'],
    httpHost: http.host,
    httpPort: http.port,
    logger: createLogger(),
  })
  print(ctx.stdout, 'federation gateway ready')
  print(ctx.stdout, `  api        ${federation.url}/v1`)
  print(ctx.stdout, `  peer id    ${federation.peerId.toString()}  (heads allow it with --federation)`)
  print(ctx.stdout, `  admin      token in ${dataDir}/admin.token`)
  await new Promise<void>((resolve) => {
    if (ctx.shutdown.aborted) resolve()
    ctx.shutdown.addEventListener('abort', () => resolve(), { once: true })
  })
  print(ctx.stderr, 'stopping federation gateway')
  await federation.stop()
  return 0
}
