import { describe, expect, it } from 'vitest'
import { federationMetrics } from '../../federation/metrics.ts'
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
})
