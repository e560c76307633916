import { CID } from 'multiformats/cid'
import * as raw from 'multiformats/codecs/raw'
import { sha256 } from 'multiformats/hashes/sha2'

/** Provider-record keys: one per region, and one every region's bootstrap nodes announce under. */
async function keyFor(name: string): Promise<CID> {
  return CID.createV1(raw.code, await sha256.digest(new TextEncoder().encode(name)))
}

export function regionKey(region: string): Promise<CID> {
  return keyFor(`/garage/region/${region}`)
}

export function allRegionsKey(): Promise<CID> {
  return keyFor('/garage/regions/all')
}
