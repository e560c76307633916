import { Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { VerifiedThroughput } from '../../openai/usage.ts'
import type { RegionalRouter } from '../../routing/node-router.ts'
import type { GroupView, RayGroups } from './groups.ts'
import type { NodeRegistry } from './registry.ts'

/** The head's /metrics: requests, retries, timings, tokens, and each node's numbers. */
export interface HeadMetrics {
  registry: Registry
  requests: Counter<'model' | 'status'>
  retries: Counter<'reason'>
  streamErrors: Counter
  ttft: Histogram<'model'>
  duration: Histogram<'model'>
  regionTokens: Counter<'model'>
  /** Integrity checks by what they counted: pass, fail, inconclusive, no_verifier, dropped. */
  integrityChecks: Counter<'result'>
}

export function headMetrics(
  registry: NodeRegistry,
  router: RegionalRouter,
  verified: VerifiedThroughput,
  groups?: RayGroups,
): HeadMetrics {
  const metrics = new Registry()
  const out: HeadMetrics = {
    registry: metrics,
    requests: new Counter({
      name: 'garage_head_requests_total',
      help: 'OpenAI requests the head answered, by model and HTTP status',
      labelNames: ['model', 'status'] as const,
      registers: [metrics],
    }),
    retries: new Counter({
      name: 'garage_head_retries_total',
      help: 'Requests moved to another node before their first byte, by reason',
      labelNames: ['reason'] as const,
      registers: [metrics],
    }),
    streamErrors: new Counter({
      name: 'garage_head_stream_errors_total',
      help: 'Responses that failed after their first byte (ended with an SSE error event)',
      registers: [metrics],
    }),
    ttft: new Histogram({
      name: 'garage_head_time_to_first_byte_seconds',
      help: 'From the request reaching the head to the first response byte from a node',
      labelNames: ['model'] as const,
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers: [metrics],
    }),
    duration: new Histogram({
      name: 'garage_head_request_duration_seconds',
      help: 'Whole request, first byte in to last byte out',
      labelNames: ['model'] as const,
      buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
      registers: [metrics],
    }),
    regionTokens: new Counter({
      name: 'garage_head_completion_tokens_total',
      help: 'Completion tokens the head proxied and verified, by model',
      labelNames: ['model'] as const,
      registers: [metrics],
    }),
    integrityChecks: new Counter({
      name: 'garage_head_integrity_checks_total',
      help: 'Answers re-scored by a verifier, by result (pass, fail, inconclusive, no_verifier, dropped)',
      labelNames: ['result'] as const,
      registers: [metrics],
    }),
  }
  new Gauge({
    name: 'garage_head_nodes',
    help: 'Joined nodes by state',
    labelNames: ['state'] as const,
    registers: [metrics],
    collect() {
      this.reset()
      for (const [state, count] of Object.entries(registry.countByState())) this.set({ state }, count)
    },
  })
  const perNode = (name: string, help: string, value: (peer: string) => number): void => {
    new Gauge({
      name,
      help,
      labelNames: ['node', 'model'] as const,
      registers: [metrics],
      collect() {
        this.reset()
        for (const n of registry.nodes())
          this.set({ node: n.peerId, model: n.assignment.model }, value(n.peerId))
      },
    })
  }
  perNode('garage_head_node_verified_tokens', 'Completion tokens the head proxied for the node', (p) =>
    verified.verified(p),
  )
  perNode(
    'garage_head_node_reported_tokens',
    'Completion tokens the node says it generated since it joined',
    (p) => registry.get(p)?.telemetry?.tokensTotal ?? 0,
  )
  perNode('garage_head_node_flagged', '1 when the node claims over 10% more tokens than verified', (p) =>
    verified.flagged(p) ? 1 : 0,
  )
  perNode(
    'garage_head_node_quarantined',
    '1 while the node is quarantined (its answers failed integrity checks) or appealing',
    (p) => (router.held(p) ? 1 : 0),
  )
  perNode('garage_head_node_capacity_tokens_per_second', 'Capacity the head measured', (p) =>
    router.capacity(p),
  )
  perNode('garage_head_node_inflight', 'Requests the head has outstanding at the node', (p) =>
    router.inflight(p),
  )
  if (groups != null) {
    const perGroup = (
      name: string,
      help: string,
      value: (g: GroupView) => number,
      labels: string[] = [],
    ): void => {
      new Gauge({
        name,
        help,
        labelNames: ['model', ...labels],
        registers: [metrics],
        collect() {
          this.reset()
          for (const g of groups.views()) this.set({ model: g.model }, value(g))
        },
      })
    }
    perGroup('garage_head_group_members', "Members of the model's pipeline group", (g) => g.members.length)
    perGroup('garage_head_group_size', 'Pipeline stages the group needs', (g) => g.size)
    perGroup('garage_head_group_serving', "1 while the model's pipeline group serves", (g) =>
      g.state === 'serving' ? 1 : 0,
    )
    perGroup('garage_head_group_formations', 'Times the group began serving', (g) => g.formations)
    perGroup(
      'garage_head_group_form_seconds',
      'How long the last formation took',
      (g) => (g.lastFormedMs ?? 0) / 1000,
    )
    perGroup('garage_head_group_completion_tokens', 'Completion tokens the group served', (g) => g.tokens)
  }
  return out
}
