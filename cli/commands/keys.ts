import {
  ApiKeyLimitError,
  ApiKeyNameError,
  ApiKeyStore,
  authCacheTtlMs,
  type KeyInfo,
} from '../../federation/keys.ts'
import {
  databaseOption,
  databaseUrlVar,
  type FederationStore,
  FederationStoreUrlError,
  federationDataDir,
  openStore,
} from '../../federation/store.ts'
import { type CommandContext, parseOptions, print, UsageError } from '../io.ts'

export const usage = `Usage:
  garage keys create --name NAME [--rpm N] [--tpm N] [--concurrency N] [--data-dir DIR | --database URL]
  garage keys list [--json] [--data-dir DIR | --database URL]
  garage keys revoke ID|PREFIX|NAME [--data-dir DIR | --database URL]

API keys of the federation gateway (garage federation). Garage stores only a key's sha256.
  create   makes a key and prints it alone on stdout, once: KEY=$(garage keys create --name ci)
  list     every key, active and revoked (never the key itself)
  revoke   stops a key; a running gateway refuses it within ${authCacheTtlMs / 1000} seconds

Options:
  --name NAME        1-64 printable characters, unique among active keys
  --rpm N            requests per minute (default: unlimited)
  --tpm N            prompt + completion tokens per minute (default: unlimited)
  --concurrency N    requests in flight at once (default: unlimited)
  --json             list as JSON
  --data-dir DIR     the federation's data dir (default: <data dir>/federation, as garage federation)
  --database URL     the gateways' PostgreSQL, postgres://USER:PASSWORD@HOST:5432/DB
                     (default: $${databaseUrlVar}; unset: SQLite in the data dir)`

function limitOption(text: string | undefined, option: string): number | null {
  if (text == null) return null
  if (!/^\d+$/.test(text) || Number(text) < 1 || !Number.isSafeInteger(Number(text)))
    throw new UsageError(`${option} must be a whole number of at least 1, not ${JSON.stringify(text)}`)
  return Number(text)
}

function describeKey(k: KeyInfo): Record<string, unknown> {
  return {
    id: k.id,
    name: k.name,
    prefix: `gk_${k.prefix}`,
    rpm: k.limits.rpm,
    tpm: k.limits.tpm,
    concurrency: k.limits.concurrency,
    createdAt: k.createdAt.toISOString(),
    revokedAt: k.revokedAt?.toISOString() ?? null,
  }
}

/** Rows of cells as aligned columns, two spaces apart. */
export function formatTable(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)))
  return rows
    .map((r) =>
      r
        .map((c, i) => c.padEnd(widths[i]!))
        .join('  ')
        .trimEnd(),
    )
    .join('\n')
}

function keyTable(keys: KeyInfo[]): string {
  const limit = (v: number | null): string => (v == null ? '-' : String(v))
  return formatTable([
    ['ID', 'NAME', 'PREFIX', 'RPM', 'TPM', 'CONCURRENCY', 'CREATED', 'STATUS'],
    ...keys.map((k) => [
      k.id,
      k.name,
      `gk_${k.prefix}...`,
      limit(k.limits.rpm),
      limit(k.limits.tpm),
      limit(k.limits.concurrency),
      k.createdAt.toISOString().slice(0, 19).replace('T', ' '),
      k.revokedAt == null ? 'active' : `revoked ${k.revokedAt.toISOString().slice(0, 19).replace('T', ' ')}`,
    ]),
  ])
}

/** The store options every command shares: --data-dir (SQLite) and --database / $GARAGE_DATABASE_URL (PostgreSQL). */
export const storeOptions = {
  'data-dir': { type: 'string' },
  database: { type: 'string' },
} as const

/** Opens the store the options name for one command and closes it whatever happens. */
export async function withStore<T>(
  values: { 'data-dir'?: string | undefined; database?: string | undefined },
  ctx: CommandContext,
  create: boolean,
  fn: (store: FederationStore) => Promise<T>,
): Promise<T> {
  let database: string | undefined
  try {
    database = databaseOption(values.database, ctx.env)
  } catch (err) {
    if (err instanceof FederationStoreUrlError) throw new UsageError(err.message)
    throw err
  }
  const store = await openStore({ dataDir: federationDataDir(ctx.env, values['data-dir']), database, create })
  try {
    return await fn(store)
  } finally {
    await store.close()
  }
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const [sub, ...rest] = argv
  switch (sub) {
    case 'create': {
      const { values } = parseOptions(rest, {
        name: { type: 'string' },
        rpm: { type: 'string' },
        tpm: { type: 'string' },
        concurrency: { type: 'string' },
        ...storeOptions,
      })
      if (values.name == null) throw new UsageError('--name is required')
      const init = {
        name: values.name,
        rpm: limitOption(values.rpm, '--rpm'),
        tpm: limitOption(values.tpm, '--tpm'),
        concurrency: limitOption(values.concurrency, '--concurrency'),
      }
      const { created, where } = await withStore(values, ctx, true, async (store) => {
        try {
          return { created: await new ApiKeyStore(store).create(init), where: store.location }
        } catch (err) {
          if (err instanceof ApiKeyNameError || err instanceof ApiKeyLimitError)
            throw new UsageError(err.message)
          throw err
        }
      })
      print(ctx.stdout, created.key)
      print(
        ctx.stderr,
        `created key ${created.id} (${created.name}) in ${where}.\n` +
          'The key is shown only this once and Garage keeps only its hash: store it now.',
      )
      return 0
    }
    case 'list': {
      const { values } = parseOptions(rest, {
        json: { type: 'boolean', default: false },
        ...storeOptions,
      })
      const keys = await withStore(values, ctx, false, (store) => new ApiKeyStore(store).list())
      if (values.json) print(ctx.stdout, JSON.stringify(keys.map(describeKey), null, 2))
      else if (keys.length === 0)
        print(ctx.stderr, 'no keys yet; make one with: garage keys create --name NAME')
      else print(ctx.stdout, keyTable(keys))
      return 0
    }
    case 'revoke': {
      const { values, positionals } = parseOptions(rest, storeOptions, true)
      const ref = positionals[0]
      if (ref == null || positionals.length > 1)
        throw new UsageError('revoke takes one key: its id, prefix or name')
      const revoked = await withStore(values, ctx, false, (store) => new ApiKeyStore(store).revoke(ref))
      print(ctx.stdout, revoked.id)
      print(
        ctx.stderr,
        `revoked key ${revoked.id} (${revoked.name}); a running gateway refuses it within ${authCacheTtlMs / 1000} seconds`,
      )
      return 0
    }
    default:
      throw new UsageError(sub == null ? 'missing subcommand' : `unknown subcommand ${JSON.stringify(sub)}`)
  }
}
