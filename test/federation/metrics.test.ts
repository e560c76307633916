import { describe, expect, it } from 'vitest'
import { errorCodeLabel, federationMetrics, maxKeyLabels, otherKeyLabel } from '../../federation/metrics.ts'
import type { RegionDirectory } from '../../federation/regions.ts'

describe('federation metrics', () => {
  it("names prom-client's process and Node.js metrics once: garage_federation_process_*, not _process_process_*", async () => {
    const { registry } = federationMetrics({ regions: () => [] } as unknown as RegionDirectory)
    const text = await registry.metrics()
    expect(text).toMatch(/^garage_federation_process_cpu_user_seconds_total /m)
    expect(text).toMatch(/^garage_federation_process_resident_memory_bytes /m)
    expect(text).toMatch(/^garage_federation_nodejs_eventloop_lag_seconds /m)
    expect(text).not.toMatch(/process_process_/)
    // Every metric is the federation's own.
    const names = [...text.matchAll(/^# TYPE (\S+)/gm)].map((m) => m[1]!)
    expect(names.filter((n) => !n.startsWith('garage_federation_'))).toEqual([])
  })

  it('labels per-key usage by key name for the first maxKeyLabels names, and "other" after: /metrics stays bounded', async () => {
    const metrics = federationMetrics({ regions: () => [] } as unknown as RegionDirectory)
    for (let i = 0; i < maxKeyLabels; i++) expect(metrics.keyLabel(`key-${i}`)).toBe(`key-${i}`)
    expect(metrics.keyLabel('one-too-many')).toBe(otherKeyLabel)
    // A name seen before keeps its own series.
    expect(metrics.keyLabel('key-0')).toBe('key-0')
    for (let i = 0; i < 3 * maxKeyLabels; i++)
      metrics.keyTokens.inc({ key: metrics.keyLabel(`more-${i}`), kind: 'completion' }, 1)
    metrics.keyTokens.inc({ key: metrics.keyLabel('key-1'), kind: 'completion' }, 2)
    const values = (await metrics.keyTokens.get()).values
    expect(values.map((v) => [v.labels.key, v.value])).toEqual([
      [otherKeyLabel, 3 * maxKeyLabels],
      ['key-1', 2],
    ])
  })

  it("labels errors by Garage's own error codes only: a code a head made up is counted as other", () => {
    expect(errorCodeLabel('no_capacity')).toBe('no_capacity')
    expect(errorCodeLabel('rate_limit_exceeded')).toBe('rate_limit_exceeded')
    expect(errorCodeLabel('invalid_api_key')).toBe('invalid_api_key')
    expect(errorCodeLabel('made_up_by_a_head')).toBe('other')
    expect(errorCodeLabel('')).toBe('none')
  })
})
