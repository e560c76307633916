import type { PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'

/**
 * PeerIds parsed once: a PeerId from a string costs a base58 decode and a key, on every request a
 * head or the federation routes. Bounded: past `maxEntries` it starts over.
 */
export class PeerIdCache {
  readonly #ids = new Map<string, PeerId>()
  readonly #maxEntries: number

  constructor(maxEntries = 4096) {
    this.#maxEntries = maxEntries
  }

  get(id: string): PeerId {
    let peer = this.#ids.get(id)
    if (peer == null) {
      if (this.#ids.size >= this.#maxEntries) this.#ids.clear()
      peer = peerIdFromString(id) as PeerId
      this.#ids.set(id, peer)
    }
    return peer
  }

  delete(id: string): void {
    this.#ids.delete(id)
  }
}
