import { execFile } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { describe, expect, it } from 'vitest'
import { parse as parseYaml, stringify } from 'yaml'
import { kustomizeBuild } from '../helpers/kustomize.ts'
import {
  asPrometheusSees,
  dashboard,
  dashboardFiles,
  dashboardQueries,
  metricNames,
  monitoringDir,
  ruleQueries,
  rulesFile,
  rulesTestFile,
} from './promql.ts'

const run = promisify(execFile)

/** promtool from Debian's prometheus package (.ci/run installs it); its absence fails, never skips. */
async function promtool(args: string[]): Promise<{ stdout: string; stderr: string }> {
  try {
    return await run('promtool', args, { cwd: monitoringDir, timeout: 60_000 })
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stdout?: string; stderr?: string }
    if (e.code === 'ENOENT')
      throw new Error('promtool is not installed: apt-get install prometheus (Debian ships promtool in it)')
    throw new Error(`promtool ${args.join(' ')} failed:\n${e.stdout ?? ''}${e.stderr ?? ''}`)
  }
}

describe('deploy/monitoring', () => {
  it('promtool check rules passes on the alert rules', async () => {
    const { stdout } = await promtool(['check', 'rules', rulesFile])
    expect(stdout).toMatch(/SUCCESS: \d+ rules found/)
  })

  it('promtool test rules: each alert fires on what should fire it, after its `for`, and not on the healthy series', async () => {
    const { stdout } = await promtool(['test', 'rules', rulesTestFile])
    expect(stdout).toContain('SUCCESS')
  })

  it('alerts for a region with no capacity, a head without telemetry, error rates and certificate expiry', () => {
    const alerts = ruleQueries().map((q) => q.where)
    expect(alerts).toEqual(
      expect.arrayContaining([
        'alert GarageRegionNoCapacity',
        'alert GarageHeadDown',
        'alert GarageHeadErrorRate',
        'alert GarageFederationErrorRate',
        'alert GarageRegionCertificateExpiresSoon',
        'alert GarageRegionCertificateExpiring',
      ]),
    )
  })

  it('every dashboard is a Grafana dashboard with a unique uid, a Prometheus data source variable and panels with queries', () => {
    const files = dashboardFiles()
    expect(files).toEqual(['garage-federation.json', 'garage-node.json', 'garage-region.json'])
    const uids = files.map((f) => dashboard(f).uid)
    expect(new Set(uids).size).toBe(files.length)
    for (const f of files) {
      const d = dashboard(f)
      expect(d.title).toMatch(/^Garage \/ /)
      expect(d.templating.list.find((v) => v.name === 'datasource')).toMatchObject({
        type: 'datasource',
        query: 'prometheus',
      })
      expect(d.panels.filter((p) => (p.targets ?? []).length > 0).length).toBeGreaterThan(5)
    }
  })

  it("every dashboard query parses with Prometheus' grammar and passes promtool (as recording rules)", async () => {
    const queries = dashboardQueries()
    expect(queries.length).toBeGreaterThan(50)
    for (const q of queries) expect(() => metricNames(q.expr), q.where).not.toThrow()
    // promtool parses with Prometheus' own Go parser: each query as a recording rule.
    const dir = await mkdtemp(join(tmpdir(), 'garage-dashboards-'))
    try {
      const file = join(dir, 'dashboards.rules.yaml')
      const rules = queries.map((q, i) => ({
        record: `garage:dashboard_query:${i}`,
        expr: asPrometheusSees(q.expr),
      }))
      await writeFile(file, stringify({ groups: [{ name: 'dashboards', rules }] }))
      const { stdout } = await promtool(['check', 'rules', file])
      expect(stdout).toContain(`SUCCESS: ${rules.length} rules found`)
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('the dashboards cover what the issue lists', () => {
    const titles = (file: string) =>
      dashboardQueries().filter((q) => q.where.startsWith(`dashboard ${file}:`))
    const names = (file: string) => new Set(titles(file).flatMap((q) => metricNames(q.expr)))
    expect([...names('garage-federation.json')]).toEqual(
      expect.arrayContaining([
        'garage_federation_requests_total',
        'garage_federation_errors_total',
        'garage_federation_time_to_first_byte_seconds_bucket',
        'garage_federation_request_duration_seconds_bucket',
        'garage_federation_tokens_total',
        'garage_federation_key_tokens_total',
        'garage_federation_key_requests_total',
        'garage_federation_regions',
      ]),
    )
    expect([...names('garage-region.json')]).toEqual(
      expect.arrayContaining([
        'garage_head_nodes',
        'garage_head_node_verified_tokens',
        'garage_head_node_flagged',
        'garage_head_retries_total',
        'garage_head_group_serving',
        'garage_head_group_members',
      ]),
    )
    expect([...names('garage-node.json')].every((n) => n.startsWith('vllm:'))).toBe(true)
  })

  it('deploy/monitoring as kustomize renders it: the same rules as a PrometheusRule, the dashboards as ConfigMaps for the Grafana sidecar', async () => {
    const objects = await kustomizeBuild(monitoringDir)
    const rule = objects.find((o) => o.kind === 'PrometheusRule')!
    expect(rule.spec).toEqual(parseYaml(readFileSync(rulesFile, 'utf8')))
    for (const file of dashboardFiles()) {
      const name = `garage-dashboard-${file.replace(/^garage-|\.json$/g, '')}`
      const cm = objects.find((o) => o.kind === 'ConfigMap' && o.metadata.name === name)!
      expect(cm.metadata.labels).toMatchObject({ grafana_dashboard: '1' })
      expect(cm.data).toEqual({ [file]: readFileSync(join(monitoringDir, 'dashboards', file), 'utf8') })
    }
  })
})
