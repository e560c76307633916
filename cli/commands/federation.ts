import { createLogger } from '../../core/logger.ts'
import { defaultFederationPort, startFederation } from '../../federation/gateway.ts'
import {
  copyStore,
  databaseOption,
  databaseUrlVar,
  FederationStoreUrlError,
  federationDataDir,
  federationDbPath,
  openStore,
  redactUrl,
} from '../../federation/store.ts'
import {
  authorityOption,
  bootstrapOption,
  type CommandContext,
  parseHostPort,
  parseOptions,
  print,
  splitList,
  UsageError,
} from '../io.ts'

export const usage = `Usage: garage federation --authority ID --bootstrap MULTIADDR [options]
       garage federation migrate-store --to postgres://... [--data-dir DIR]

Runs the federation gateway: the public OpenAI-compatible API. It authenticates API keys ('garage keys
create'), applies their limits, finds the regions' heads through the DHT (certificates checked against
the pinned authority), keeps each region's models and load up to date, sends each request to the best
region over the mesh (failing over to another before the first byte) and records usage per key and
credits per node ('garage ledger'). Each region's head must allow this gateway's PeerId
('garage bootstrap --federation PEER_ID'), printed at start. SIGINT or SIGTERM stop it.

Keys, the ledger and rate limits live in SQLite in the data dir, or, with --database, in PostgreSQL:
then several gateways behind a load balancer share them, and each key's limits hold for all of them
together. migrate-store copies a data dir's SQLite store (keys with their hashes, the ledger) into an
empty PostgreSQL database; run it again and it says the data is already there.

Options:
  --authority ID         the federation authority's id to trust (required; default: $GARAGE_AUTHORITY)
  --bootstrap MULTIADDR  a bootstrap node, repeatable (required; default: $GARAGE_BOOTSTRAP)
  --http HOST:PORT       the API (default: 127.0.0.1:${defaultFederationPort}; put TLS in front for the public)
  --listen MULTIADDR     libp2p listen address, repeatable (default: TCP on a random port)
  --allow-private        dial private and loopback addresses (LAN, devnet, tests)
  --no-direct            send every request through its region's head (default: straight to the
                         nodes each head leases this gateway, the head path as the fallback)
  --data-dir DIR         keys, ledger, admin token, identity (default: <Garage data dir>/federation)
  --database URL         keys, ledger, rate limits in PostgreSQL: postgres://USER:PASSWORD@HOST:5432/DB
                         (default: $${databaseUrlVar}; unset: SQLite in the data dir)
  --to URL               migrate-store: the PostgreSQL database to copy into`

function database(value: string | undefined, env: NodeJS.ProcessEnv): string | undefined {
  try {
    return databaseOption(value, env)
  } catch (err) {
    if (err instanceof FederationStoreUrlError) throw new UsageError(err.message)
    throw err
  }
}

/** garage federation migrate-store: the data dir's SQLite store into an empty PostgreSQL database. */
async function migrateStore(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, { to: { type: 'string' }, 'data-dir': { type: 'string' } })
  if (values.to == null) throw new UsageError('migrate-store needs --to postgres://...')
  const to = database(values.to, {})!
  const dataDir = federationDataDir(ctx.env, values['data-dir'])
  const from = await openStore({ dataDir, create: false })
  try {
    print(ctx.stderr, `connecting to ${redactUrl(to)}`)
    const target = await openStore({ dataDir, database: to })
    try {
      const outcome = await copyStore(from, target, (m) => print(ctx.stderr, m))
      const what = `${outcome.keys} keys, ${outcome.usageRows} usage rows, ${outcome.creditRows} credit rows`
      print(
        ctx.stdout,
        outcome.alreadyThere
          ? `${target.location} already holds ${federationDbPath(dataDir)} (${what}): nothing to do`
          : `copied ${what} from ${federationDbPath(dataDir)} to ${target.location}`,
      )
      print(
        ctx.stderr,
        `start the gateways with --database (or ${databaseUrlVar}); ${federationDbPath(dataDir)} is left as it was`,
      )
      return 0
    } finally {
      await target.close()
    }
  } finally {
    await from.close()
  }
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  if (argv[0] === 'migrate-store') return migrateStore(argv.slice(1), ctx)
  const { values } = parseOptions(argv, {
    authority: { type: 'string' },
    bootstrap: { type: 'string', multiple: true },
    http: { type: 'string' },
    listen: { type: 'string', multiple: true },
    'allow-private': { type: 'boolean', default: false },
    'no-direct': { type: 'boolean', default: false },
    'data-dir': { type: 'string' },
    database: { type: 'string' },
  })
  const authority = authorityOption(values.authority, ctx.env)
  const bootstrap = bootstrapOption(values.bootstrap, ctx.env)
  const http = parseHostPort(values.http ?? `127.0.0.1:${defaultFederationPort}`, '--http')
  const listen = splitList(values.listen)
  const dataDir = federationDataDir(ctx.env, values['data-dir'])
  const databaseUrl = database(values.database, ctx.env)
  const federation = await startFederation({
    dataDir,
    ...(databaseUrl != null ? { database: databaseUrl } : {}),
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
  print(ctx.stdout, `  store      ${federation.store.kind} ${federation.store.location}`)
  print(ctx.stdout, `  admin      token in ${dataDir}/admin.token`)
  await new Promise<void>((resolve) => {
    if (ctx.shutdown.aborted) resolve()
    ctx.shutdown.addEventListener('abort', () => resolve(), { once: true })
  })
  print(ctx.stderr, 'stopping federation gateway')
  await federation.stop()
  return 0
}
