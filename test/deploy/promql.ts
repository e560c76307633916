import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { parser } from '@prometheus-io/lezer-promql'
import { parse as parseYaml } from 'yaml'
import { repoRoot } from './manifests.ts'

/** The PromQL that deploy/monitoring queries: every dashboard target and alert rule, and the metrics they name. */

export const monitoringDir = join(repoRoot, 'deploy/monitoring')
export const rulesFile = join(monitoringDir, 'prometheus/garage.rules.yaml')
export const rulesTestFile = join(monitoringDir, 'prometheus/garage.rules.test.yaml')

export interface Query {
  /** "dashboard garage-federation.json: Requests by status" or "alert GarageHeadDown". */
  where: string
  expr: string
}

interface Panel {
  title?: string
  targets?: Array<{ expr?: string }>
  panels?: Panel[]
}

export function dashboardFiles(): string[] {
  return readdirSync(join(monitoringDir, 'dashboards'))
    .filter((f) => f.endsWith('.json'))
    .sort()
}

export function dashboard(file: string): {
  uid: string
  title: string
  panels: Panel[]
  templating: { list: Array<{ name: string; query?: unknown }> }
} {
  return JSON.parse(readFileSync(join(monitoringDir, 'dashboards', file), 'utf8'))
}

/**
 * A Grafana query as Prometheus receives it: Grafana's interval variables become durations, and
 * template variables (used in label matchers only) a regex that matches anything.
 */
export function asPrometheusSees(expr: string): string {
  return expr
    .replaceAll('$__rate_interval', '5m')
    .replaceAll('$__range', '1h')
    .replaceAll('$__interval', '1m')
    .replace(/\$\{?[a-z_]+\}?/g, '.*')
}

export function dashboardQueries(): Query[] {
  const out: Query[] = []
  for (const file of dashboardFiles()) {
    const d = dashboard(file)
    const visit = (panels: Panel[]): void => {
      for (const p of panels) {
        for (const t of p.targets ?? [])
          if (t.expr != null) out.push({ where: `dashboard ${file}: ${p.title}`, expr: t.expr })
        visit(p.panels ?? [])
      }
    }
    visit(d.panels)
    // Variable queries: label_values(metric{...}, label).
    for (const v of d.templating.list) {
      const q = typeof v.query === 'string' ? v.query : (v.query as { query?: string } | undefined)?.query
      const m = /^label_values\((.+),\s*[a-z_]+\)$/.exec(q ?? '')
      if (m != null) out.push({ where: `dashboard ${file}: variable ${v.name}`, expr: m[1]! })
    }
  }
  return out
}

export function ruleQueries(): Query[] {
  const rules = parseYaml(readFileSync(rulesFile, 'utf8')) as {
    groups: Array<{ rules: Array<{ alert?: string; record?: string; expr: string }> }>
  }
  return rules.groups.flatMap((g) =>
    g.rules.map((r) => ({ where: `alert ${r.alert ?? r.record}`, expr: r.expr })),
  )
}

/** The metric names a PromQL expression selects; throws on a syntax error (Prometheus' own grammar). */
export function metricNames(expr: string): string[] {
  const text = asPrometheusSees(expr)
  const tree = parser.parse(text)
  const names: string[] = []
  let error: number | null = null
  tree.iterate({
    enter(n) {
      if (n.type.isError && error == null) error = n.from
      if (n.name === 'VectorSelector') {
        const id = n.node.getChild('Identifier')
        if (id != null) names.push(text.slice(id.from, id.to))
      }
    },
  })
  if (error != null) throw new SyntaxError(`PromQL syntax error at ${error}: ${text}`)
  if (names.length === 0) throw new SyntaxError(`no metric in ${text}`)
  return names
}
