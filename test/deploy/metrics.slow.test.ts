import { copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Devnet, devnetModelName, startDevnet } from '../../cli/commands/devnet.ts'
import { startFederation } from '../../federation/gateway.ts'
import { identityFileName } from '../../mesh/identity.ts'
import { podTemplates, renderOverlay } from './manifests.ts'
import { dashboardQueries, metricNames, ruleQueries } from './promql.ts'

/**
 * A devnet (authority, one region's bootstrap node and head, one node on the embedded engine, the
 * gateway) answers a request; then every metric a dashboard panel, a dashboard variable or an alert
 * rule queries must be on the /metrics of the gateway, the bootstrap node, the head or the node's
 * engine, and the /health the manifests probe must answer 200 on each server.
 */

const requestTimeoutMs = 10_000

async function chat(url: string, key: string): Promise<number> {
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model: devnetModelName,
      messages: [{ role: 'user', content: 'Hello' }],
      max_tokens: 4,
    }),
    signal: AbortSignal.timeout(requestTimeoutMs),
  })
  await res.arrayBuffer()
  return res.status
}

/** Metric names one /metrics page exports: each family, with a histogram's and summary's series. */
async function exported(url: string): Promise<Set<string>> {
  const res = await fetch(url, { signal: AbortSignal.timeout(requestTimeoutMs) })
  expect(res.status, url).toBe(200)
  const names = new Set<string>()
  for (const m of (await res.text()).matchAll(/^# TYPE (\S+) (\S+)$/gm)) {
    const [, name, type] = m as unknown as [string, string, string]
    names.add(name)
    if (type === 'histogram') for (const s of ['_bucket', '_sum', '_count']) names.add(`${name}${s}`)
    if (type === 'summary') for (const s of ['_sum', '_count']) names.add(`${name}${s}`)
  }
  return names
}

describe('deploy/monitoring against a running devnet', () => {
  let dir: string
  let devnet: Devnet
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-monitoring-'))
    devnet = await startDevnet({ dataDir: dir, regions: 1, nodes: 1, embeddingNodes: 0, port: 0 })
    // One answered request, so the request, token and per-key series have samples too.
    expect(await chat(devnet.info.federation.url, devnet.info.federation.apiKey)).toBe(200)
  })
  afterAll(async () => {
    await devnet?.stop()
    if (dir != null) await rm(dir, { recursive: true, force: true })
  })

  it('every metric the dashboards and alert rules query is exported by the gateway, a bootstrap node, a head or an engine', async () => {
    const region = devnet.info.regions[0]!
    const sources = {
      federation: await exported(`${devnet.info.federation.url}/metrics`),
      bootstrap: await exported(region.metricsUrl),
      head: await exported(`${region.headUrl}/metrics`),
      engine: await exported(`${devnet.info.nodes[0]!.engineUrl}/metrics`),
    }
    // Prometheus' own series for each target; garage_role is what the ServiceMonitors set.
    const prometheusOwn = new Set(['up'])
    const queries = [...dashboardQueries(), ...ruleQueries()]
    const missing: string[] = []
    const used = new Set<string>()
    for (const q of queries) {
      for (const name of metricNames(q.expr)) {
        used.add(name)
        if (prometheusOwn.has(name)) continue
        if (!Object.values(sources).some((s) => s.has(name))) missing.push(`${q.where}: ${name}`)
      }
    }
    expect(missing).toEqual([])
    // Each source is queried somewhere: the dashboards cover every part.
    for (const [source, names] of Object.entries(sources))
      expect(
        [...used].some((n) => names.has(n)),
        `a query on the ${source}'s metrics`,
      ).toBe(true)
    // The answered request is on the per-key series, under the devnet key's name; refused ones on
    // the errors by their codes.
    const refused = await fetch(`${devnet.info.federation.url}/v1/models`, {
      headers: { authorization: 'Bearer gk_wrong' },
    })
    expect(refused.status).toBe(401)
    await refused.body?.cancel()
    const text = await (await fetch(`${devnet.info.federation.url}/metrics`)).text()
    expect(text).toMatch(/^garage_federation_errors_total\{code="invalid_api_key"\} 1$/m)
    expect(text).toMatch(/^garage_federation_key_tokens_total\{key="devnet",kind="completion"\} [1-9]/m)
  })

  it('the garage_role values the alert rules match on are the ones the ServiceMonitors set', async () => {
    const roles = new Set<string>()
    for (const overlay of ['region-example', 'federation-example']) {
      for (const o of await renderOverlay(overlay)) {
        if (o.kind !== 'ServiceMonitor') continue
        const endpoints = (
          o.spec as { endpoints: Array<{ relabelings: Array<{ targetLabel: string; replacement: string }> }> }
        ).endpoints
        for (const e of endpoints)
          for (const r of e.relabelings) if (r.targetLabel === 'garage_role') roles.add(r.replacement)
      }
    }
    const matched = new Set<string>()
    for (const q of [...dashboardQueries(), ...ruleQueries()])
      for (const m of q.expr.matchAll(/garage_role=~?"([^"]+)"/g))
        for (const r of m[1]!.split('|')) matched.add(r)
    expect([...matched].sort()).toEqual([...roles].sort())
  })

  it('the /health the manifests probe answers 200 on the bootstrap node, the head and the gateway', async () => {
    const region = devnet.info.regions[0]!
    const byPort: Record<string, string> = {
      'bootstrap-http': region.healthUrl.replace(/\/health$/, ''),
      'head-http': region.headUrl,
      http: devnet.info.federation.url,
    }
    const probed: string[] = []
    for (const overlay of ['region-example', 'federation-example']) {
      for (const o of await renderOverlay(overlay)) {
        for (const { template } of podTemplates(o)) {
          for (const c of template.spec.containers) {
            for (const probe of [c.startupProbe, c.readinessProbe, c.livenessProbe]) {
              if (probe?.httpGet == null) continue
              const base = byPort[String(probe.httpGet.port)]
              expect(base, `a devnet server for port ${probe.httpGet.port}`).toBeDefined()
              const res = await fetch(`${base}${probe.httpGet.path}`, {
                signal: AbortSignal.timeout(requestTimeoutMs),
              })
              expect(res.status, `${base}${probe.httpGet.path}`).toBe(200)
              await res.body?.cancel()
              probed.push(String(probe.httpGet.port))
            }
          }
        }
      }
    }
    expect(new Set(probed)).toEqual(new Set(['bootstrap-http', 'head-http', 'http']))
  })

  it("two gateways on the Deployment's one identity (one PeerId the head allows) are both served, at once", async () => {
    // The second replica: another process' data dir with the same identity key, as the init container copies it.
    const replicaDir = join(dir, 'federation-replica')
    await mkdir(replicaDir, { recursive: true, mode: 0o700 })
    await copyFile(join(dir, 'federation', identityFileName), join(replicaDir, identityFileName))
    const replica = await startFederation({
      dataDir: replicaDir,
      authority: devnet.info.authority,
      bootstrap: [devnet.info.regions[0]!.bootstrapAddr],
      listen: ['/ip4/127.0.0.1/tcp/0'],
      allowPrivateAddresses: true,
      httpPort: 0,
    })
    try {
      expect(replica.peerId.toString()).toBe(devnet.info.federation.peerId)
      await replica.directory.refresh()
      // Without a shared PostgreSQL store each replica keeps its own keys: one for this one.
      const key = (await replica.keys.create({ name: 'replica' })).key
      const statuses = await Promise.all([
        ...Array.from({ length: 3 }, () => chat(devnet.info.federation.url, devnet.info.federation.apiKey)),
        ...Array.from({ length: 3 }, () => chat(replica.url, key)),
      ])
      expect(statuses).toEqual([200, 200, 200, 200, 200, 200])
    } finally {
      await replica.stop()
    }
  })
})
