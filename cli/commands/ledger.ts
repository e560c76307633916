import { ApiKeyStore } from '../../federation/keys.ts'
import { LedgerDateError, parseLedgerDay, UsageLedger } from '../../federation/ledger.ts'
import { databaseUrlVar } from '../../federation/store.ts'
import { type CommandContext, parseOptions, print, UsageError } from '../io.ts'
import { formatTable, storeOptions, withStore } from './keys.ts'

export const usage = `Usage: garage ledger [--since DATE] [--until DATE] [--key ID|PREFIX|NAME] [--node PEER_ID]
                     [--json] [--data-dir DIR | --database URL]

The federation gateway's ledger: usage per API key and model (requests, prompt and completion
tokens), and credits per node, region and model (requests, and the completion tokens the node
served as its head and the gateway counted them). A node a region's head quarantined (its answers
failed integrity checks) is listed as held: its unverified credits, since when, and why. Days are
UTC; both ends are included.
With --key only, it shows usage; with --node only, credits.

Options:
  --since DATE       first day, e.g. 2025-01-01 (default: the first day recorded)
  --until DATE       last day, e.g. 2025-01-31 (default: the last day recorded)
  --key KEY          one key: its id, prefix or name
  --node PEER_ID     one node
  --json             as JSON: { since, until, usage, credits, totals }
  --data-dir DIR     the federation's data dir (default: <data dir>/federation, as garage federation)
  --database URL     the gateways' PostgreSQL, postgres://USER:PASSWORD@HOST:5432/DB
                     (default: $${databaseUrlVar}; unset: SQLite in the data dir)`

function day(text: string | undefined, option: string): string | undefined {
  if (text == null) return undefined
  try {
    return parseLedgerDay(text)
  } catch (err) {
    if (err instanceof LedgerDateError) throw new UsageError(`${option}: ${err.message}`)
    throw err
  }
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    since: { type: 'string' },
    until: { type: 'string' },
    key: { type: 'string' },
    node: { type: 'string' },
    json: { type: 'boolean', default: false },
    ...storeOptions,
  })
  const since = day(values.since, '--since')
  const until = day(values.until, '--until')
  if (since != null && until != null && since > until)
    throw new UsageError(`--since ${since} is after --until ${until}`)
  const range = { ...(since != null ? { since } : {}), ...(until != null ? { until } : {}) }
  const showUsage = values.key != null || values.node == null
  const showCredits = values.node != null || values.key == null

  return withStore(values, ctx, false, async (store) => {
    const ledger = new UsageLedger(store)
    const keyId = values.key != null ? (await new ApiKeyStore(store).find(values.key)).id : undefined
    const usage = showUsage ? await ledger.usageByKey({ ...range, ...(keyId != null ? { keyId } : {}) }) : []
    const credits = showCredits
      ? await ledger.creditsByNode({ ...range, ...(values.node != null ? { node: values.node } : {}) })
      : []
    if (values.json) {
      const totals = values.key == null && values.node == null ? await ledger.totals(range) : null
      print(
        ctx.stdout,
        JSON.stringify({ since: since ?? null, until: until ?? null, usage, credits, totals }, null, 2),
      )
      return 0
    }
    const span =
      since == null && until == null ? 'all days' : `${since ?? 'first day'} to ${until ?? 'last day'}`
    const blocks: string[] = []
    if (showUsage) {
      const sum = (f: (u: (typeof usage)[number]) => number): string =>
        String(usage.reduce((s, u) => s + f(u), 0))
      blocks.push(
        `Usage by key, ${span} (UTC)`,
        usage.length === 0
          ? '  (none)'
          : formatTable([
              ['KEY', 'NAME', 'MODEL', 'REQUESTS', 'PROMPT TOKENS', 'COMPLETION TOKENS'],
              ...usage.map((u) => [
                u.keyId,
                u.keyName ?? '?',
                u.model,
                String(u.requests),
                String(u.promptTokens),
                String(u.completionTokens),
              ]),
              [
                'total',
                '',
                '',
                sum((u) => u.requests),
                sum((u) => u.promptTokens),
                sum((u) => u.completionTokens),
              ],
            ]),
      )
    }
    if (showCredits) {
      const sum = (f: (c: (typeof credits)[number]) => number): string =>
        String(credits.reduce((s, c) => s + f(c), 0))
      if (blocks.length > 0) blocks.push('')
      blocks.push(
        `Credits by node, ${span} (UTC)`,
        credits.length === 0
          ? '  (none)'
          : formatTable([
              ['NODE', 'REGION', 'MODEL', 'REQUESTS', 'PROMPT TOKENS', 'TOKENS SERVED'],
              ...credits.map((c) => [
                c.node,
                c.region,
                c.model,
                String(c.requests),
                String(c.promptTokens),
                String(c.completionTokens),
              ]),
              [
                'total',
                '',
                '',
                sum((c) => c.requests),
                sum((c) => c.promptTokens),
                sum((c) => c.completionTokens),
              ],
            ]),
      )
      // Nodes a head quarantined: their credits not yet verified are held, and why.
      const held = [
        ...new Map(credits.filter((c) => c.held != null).map((c) => [`${c.node} ${c.region}`, c])).values(),
      ]
      for (const c of held)
        blocks.push(
          `  held: ${c.node} (${c.region}) since ${c.held!.since}, ${c.held!.tokens} unverified tokens: ${c.held!.reason}`,
        )
    }
    print(ctx.stdout, blocks.join('\n'))
    return 0
  })
}
