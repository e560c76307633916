import { generateKeyPair } from '@libp2p/crypto/keys'
import { type DiscoveredHead, parseAuthority, pickHead, RegionDiscovery } from '../../mesh/discovery.ts'
import { createMeshNode } from '../../mesh/node.ts'
import {
  authorityOption,
  bootstrapOption,
  type CommandContext,
  parseDuration,
  parseOptions,
  print,
  UsageError,
} from '../io.ts'

export const usage = `Usage: garage regions --authority ID --bootstrap MULTIADDR... [--region NAME] [--json]

Joins the mesh with a throw-away identity, finds every regional head announced in the DHT, fetches
and verifies its certificate against the pinned authority, measures RTT (median of 3 pings) and
prints region, head, RTT, expiry, the nodes the head says it has (and how many its integrity check
quarantined) and valid/invalid with the reason. The head a node would choose
is marked with *. Exits 1 when no valid head is found.

Options:
  --authority ID         pinned federation authority (default: $GARAGE_AUTHORITY)
  --bootstrap MULTIADDR  bootstrap node, repeatable or comma-separated (default: $GARAGE_BOOTSTRAP)
  --region NAME          only this region's heads
  --timeout D            give up the lookup after D (default: 10s)
  --allow-private        dial private and loopback addresses (LAN, devnet, tests)
  --json                 machine-readable output`

export interface RegionsReport {
  chosen: string | null
  heads: Array<{
    region: string | null
    head: string
    rttMs: number | null
    expiresAt: string | null
    valid: boolean
    reason: string | null
    message: string | null
    /** What the head says of its region: joined nodes, and those quarantined by the integrity check. */
    nodes: number | null
    quarantined: number | null
  }>
}

export function toReport(heads: DiscoveredHead[], region?: string): RegionsReport {
  const chosen = pickHead(heads, region)
  return {
    chosen: chosen?.peerId ?? null,
    heads: heads.map((h) => ({
      region: h.region,
      head: h.peerId,
      rttMs: h.rttMs,
      expiresAt: h.expiresAt?.toISOString() ?? null,
      valid: h.valid,
      reason: h.reason?.name ?? null,
      message: h.reason?.message ?? null,
      nodes: h.status?.nodes ?? null,
      quarantined: h.status?.quarantined ?? null,
    })),
  }
}

function table(report: RegionsReport): string {
  const rows = [['', 'REGION', 'HEAD', 'RTT', 'EXPIRES', 'NODES', 'STATUS']]
  for (const h of report.heads) {
    rows.push([
      h.head === report.chosen ? '*' : '',
      h.region ?? '?',
      h.head,
      h.rttMs == null ? '-' : `${h.rttMs} ms`,
      h.expiresAt ?? '-',
      h.nodes == null ? '-' : `${h.nodes}${h.quarantined ? ` (${h.quarantined} quarantined)` : ''}`,
      h.valid ? 'valid' : `invalid: ${h.reason}`,
    ])
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)))
  return rows
    .map((r) =>
      r
        .map((c, i) => c.padEnd(widths[i]!))
        .join('  ')
        .trimEnd(),
    )
    .join('\n')
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    authority: { type: 'string' },
    bootstrap: { type: 'string', multiple: true },
    region: { type: 'string' },
    timeout: { type: 'string', default: '10s' },
    'allow-private': { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
  })
  const authority = authorityOption(values.authority, ctx.env)
  try {
    parseAuthority(authority)
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
  const bootstrap = bootstrapOption(values.bootstrap, ctx.env)
  const node = await createMeshNode({
    privateKey: await generateKeyPair('Ed25519'),
    listen: [],
    bootstrap,
    allowPrivateAddresses: values['allow-private'],
    relayReservation: false,
  })
  try {
    const discovery = new RegionDiscovery(node, {
      authority,
      discoveryTimeoutMs: parseDuration(values.timeout, '--timeout'),
      ...(values.region != null ? { region: values.region } : {}),
    })
    const heads = await discovery.discover({ signal: ctx.shutdown })
    const report = toReport(heads, values.region)
    if (values.json) print(ctx.stdout, JSON.stringify(report, null, 2))
    else if (heads.length === 0) print(ctx.stdout, 'no regional head is announced in the DHT')
    else print(ctx.stdout, table(report))
    return report.chosen != null ? 0 : 1
  } finally {
    await node.stop()
  }
}
