import { describe, expect, it } from 'vitest'
import { validateDhtModel } from '../../bench/scale/dht-real.ts'
import { measureHeadLoad } from '../../bench/scale/head-load.ts'

describe('the scale bench on the real stack', () => {
  // GARAGE_DHT_RUNS=20 repeats it (each run a fresh mesh with another seed): every lookup must find
  // the record every time.
  const runs = Number(process.env.GARAGE_DHT_RUNS ?? 1)
  it(
    'predicts what real kad-dht lookups do over the same routing tables; every lookup finds the record',
    async () => {
      for (let run = 0; run < runs; run++) {
        const v = await validateDhtModel({
          servers: 16,
          clients: 4,
          modelRuns: 20,
          seed: 11 + run,
          table: { kBucketSize: 4, prefixLength: 2 },
        })
        expect(v.kadDht).toEqual({ k: 4, alpha: 10, disjointPaths: 10 })
        expect(v.realHolders).toBeGreaterThan(0)
        // Once the servers' buckets are refreshed (as kad-dht does every 5 min), a lookup from either
        // half of the key space reaches the record's holders: no lookup misses, real or modelled.
        expect(v.real.foundShare, `run ${run}: ${v.real.queryErrors} real requests failed`).toBe(1)
        expect(v.model.foundShare, `run ${run}`).toBe(1)
        // Same tables, same key, same holders: the same walk, up to the order answers arrive in.
        expect(Math.abs(v.model.hops.mean - v.real.hops.mean)).toBeLessThanOrEqual(1)
        expect(v.model.messages.mean).toBeGreaterThan(v.real.messages.mean * 0.6)
        expect(v.model.messages.mean).toBeLessThan(v.real.messages.mean * 1.6)
        // Each client stays connected to the servers it asked.
        expect(v.connectionsKeptShare).toBeGreaterThan(0.9)
      }
    },
    60_000 + runs * 30_000,
  )

  it("measures a real head's cost per connection, join, report and request", async () => {
    const load = await measureHeadLoad({
      nodes: 6,
      reportsPerNode: 4,
      warmReportsPerNode: 2,
      directReports: 20,
      lookupsPerNode: 2,
      refreshPools: [0, 200],
    })
    expect(load.connectCpuMsPerNode).toBeGreaterThan(0)
    expect(load.joinCpuMsPerJoin).toBeGreaterThan(0)
    expect(load.telemetry.reports).toBe(24)
    expect(load.telemetry.cpuUsPerReport).toBeGreaterThan(0)
    expect(load.memoryKiBPerNode.heap).toBeGreaterThan(0)
    // The direct path: the head leased every joined node to the gateway and took its reports.
    expect(load.direct.leases).toBe(6)
    expect(load.direct.recordsPerReport).toBe(12)
    expect(load.direct.cpuUsPerEmptyReport).toBeGreaterThan(0)
    expect(Number.isFinite(load.direct.cpuUsPerRecord)).toBe(true)
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
