import { defaultDataDir } from '../../core/paths.ts'
import { ControlClient } from '../../daemon/control/client.ts'
import type { NodeStatus } from '../../daemon/control/types.ts'
import { type CommandContext, parseOptions, print } from '../io.ts'

export const usage = `Usage: garage status [--json] [--data-dir DIR]

Shows the running node's state (serving, paused and why, ...), its GPU, model and region, and its
tokens per second, tokens and credits today. It asks the daemon's control API, found through
<data dir>/control.json and control.token.

Options:
  --json           the status as JSON (the control API's GET /status)
  --data-dir DIR   the node's data dir (default: $GARAGE_DATA_DIR or the OS's data folder)`

function duration(seconds: number): string {
  const d = Math.floor(seconds / 86_400)
  const h = Math.floor((seconds % 86_400) / 3_600)
  const m = Math.floor((seconds % 3_600) / 60)
  if (d > 0) return `${d}d ${h}h`
  if (h > 0) return `${h}h ${m}m`
  return m > 0 ? `${m}m ${seconds % 60}s` : `${seconds}s`
}

/** `paused (paused by you, until 18:00)` and the like: the state with why and until when. */
export function describeState(status: NodeStatus): string {
  const extra = [
    status.reason,
    status.pausedUntil != null ? `until ${new Date(status.pausedUntil).toLocaleString()}` : null,
  ].filter((x) => x != null)
  return extra.length > 0 ? `${status.state} (${extra.join(', ')})` : status.state
}

export function formatStatus(s: NodeStatus): string {
  const gpu =
    s.gpu == null
      ? 'none (CPU)'
      : [
          s.gpu.name,
          `${s.gpu.vramMiB} MiB`,
          s.gpu.utilizationPct != null ? `${s.gpu.utilizationPct}% busy` : null,
          s.gpu.temperatureC != null ? `${s.gpu.temperatureC} °C` : null,
        ]
          .filter((x) => x != null)
          .join(', ')
  const rows: Array<[string, string]> = [
    ['state', describeState(s)],
    ['model', s.model ?? '-'],
    ['engine', s.engine != null ? `${s.engine.kind}${s.engine.url != null ? ` ${s.engine.url}` : ''}` : '-'],
    ...(s.engine?.detail != null && s.engine.failed.length === 0
      ? [['', s.engine.detail] as [string, string]]
      : []),
    ...(s.engine?.failed ?? []).map((f): [string, string] => ['', `${f.engine} failed: ${f.reason}`]),
    ['gpu', gpu],
    ['region', s.region != null ? `${s.region}${s.head != null ? ` (head ${s.head})` : ''}` : '-'],
    ['peer id', s.peerId ?? '-'],
    ['speed', `${s.tokensPerSecond} tok/s`],
    ['today', `${s.tokensToday} tokens, ${s.creditsToday} credits`],
    ...(s.integrity != null
      ? [
          [
            'checks',
            s.integrity.state === 'quarantined'
              ? `QUARANTINED by the head: ${s.integrity.reason}. No traffic, credits held back; restart the node to appeal (docs/integrity.md)`
              : `appealing: ${s.integrity.reason}`,
          ] as [string, string],
        ]
      : []),
    ['uptime', duration(s.uptimeSeconds)],
  ]
  return rows.map(([k, v]) => `${k.padEnd(8)} ${v}`).join('\n')
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    json: { type: 'boolean', default: false },
    'data-dir': { type: 'string' },
  })
  const client = await ControlClient.connect(values['data-dir'] ?? defaultDataDir(ctx.env))
  const status = await client.status({ signal: ctx.shutdown })
  print(ctx.stdout, values.json ? JSON.stringify(status, null, 2) : formatStatus(status))
  return 0
}
