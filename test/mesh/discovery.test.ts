import { afterAll, describe, expect, it } from 'vitest'
import { RegionDiscovery } from '../../mesh/discovery.ts'
import { dialAddr, TestMesh } from '../helpers/mesh.ts'

describe('regional discovery (smoke)', () => {
  const mesh = new TestMesh()
  afterAll(() => mesh.cleanup())

  it('a node finds two regions through the DHT with valid certificates', async () => {
    const authority = await mesh.authority()
    const a = await mesh.bootstrap(authority, 'eu-north')
    const b = await mesh.bootstrap(authority, 'us-east', { bootstrap: [dialAddr(a)] })
    await b.announce()
    await a.announce()
    const node = await mesh.node([dialAddr(a), dialAddr(b)])
    const discovery = new RegionDiscovery(node, { authority: authority.id })
    const started = Date.now()
    const chosen = await discovery.choose()
    const heads = await discovery.discover()
    console.log(
      'discovery ms',
      Date.now() - started,
      heads.map((h) => [h.region, h.valid, h.rttMs, h.reason?.name]),
    )
    expect(new Set(heads.filter((h) => h.valid).map((h) => h.region))).toEqual(
      new Set(['eu-north', 'us-east']),
    )
    expect(chosen.valid).toBe(true)
  })
})
