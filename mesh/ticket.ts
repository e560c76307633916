import { createHmac, timingSafeEqual } from 'node:crypto'
import { decodeCanonical, encodeCanonical } from '../core/cbor.ts'
import { GarageError } from '../core/errors.ts'
import { isPlainObject } from '../core/guards.ts'

/**
 * Direct-path tickets: what lets a node serve a request that did not come through its head. The
 * head, which still picks where each request goes, hands the federation a lease per node; the
 * lease's ticket is an HMAC-SHA256, under a key the head and that node agreed at join, over
 * `{ v, n: node, h: holder, l: lease id, x: expiry (head's clock, ms), s: slots }`. The node checks
 * it on every request (≈ 2 µs, and once per ticket thanks to a small cache): its own PeerId, the
 * peer that sent it (the connection's authenticated PeerId), the expiry, the MAC; and it runs at
 * most `s` of the lease's requests at once. docs/mesh.md has the wire format.
 */

/** The header that carries a ticket to the node (never forwarded to the engine). */
export const ticketHeader = 'x-garage-ticket'
/** Bytes of a per-node ticket key. */
export const ticketKeyBytes = 32
/** A ticket is at most this long on the wire (a PeerId is ≤ 64 characters). */
export const ticketMaxChars = 512

export interface TicketClaims {
  /** PeerId of the node the ticket is for. */
  node: string
  /** PeerId of the peer allowed to spend it (the federation gateway). */
  holder: string
  /** Lease id, unique per head and node. */
  lease: number
  /** Expiry, Unix ms on the head's clock. */
  exp: number
  /** Requests of this lease the node runs at once. */
  slots: number
}

export type TicketProblem = 'malformed' | 'forged' | 'expired' | 'wrong_node' | 'wrong_holder' | 'no_key'

/** The node refuses a ticket; `problem` says which check failed. */
export class TicketError extends GarageError {
  readonly problem: TicketProblem
  constructor(problem: TicketProblem, message: string) {
    super(message, 'ticket_invalid')
    this.problem = problem
  }
}

function mac(key: Uint8Array, payload: Uint8Array): Buffer {
  return createHmac('sha256', key).update(payload).digest()
}

/** The ticket for `claims` under the node's key: `base64url(payload).base64url(mac)`. */
export function issueTicket(key: Uint8Array, claims: TicketClaims): string {
  const payload = encodeCanonical({
    v: 1,
    n: claims.node,
    h: claims.holder,
    l: claims.lease,
    x: claims.exp,
    s: claims.slots,
  })
  return `${Buffer.from(payload).toString('base64url')}.${mac(key, payload).toString('base64url')}`
}

/** Reads a ticket's claims without checking its MAC (the holder's view: expiry and slots). */
export function readTicket(ticket: string): TicketClaims {
  if (typeof ticket !== 'string' || ticket.length > ticketMaxChars)
    throw new TicketError('malformed', `a ticket is a string of at most ${ticketMaxChars} characters`)
  const dot = ticket.indexOf('.')
  if (dot <= 0) throw new TicketError('malformed', 'a ticket is payload.mac in base64url')
  let value: unknown
  try {
    value = decodeCanonical(Buffer.from(ticket.slice(0, dot), 'base64url'))
  } catch (err) {
    throw new TicketError(
      'malformed',
      `the ticket's payload is not canonical CBOR: ${(err as Error).message}`,
    )
  }
  if (!isPlainObject(value) || value.v !== 1 || Object.keys(value).length !== 6)
    throw new TicketError('malformed', "the ticket's payload is not { v: 1, n, h, l, x, s }")
  const { n, h, l, x, s } = value
  const uint = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0
  if (typeof n !== 'string' || typeof h !== 'string' || !uint(l) || !uint(x) || !uint(s) || s < 1)
    throw new TicketError('malformed', "the ticket's fields have the wrong types")
  return { node: n, holder: h, lease: l, exp: x, slots: s }
}

/** How long a checked ticket's MAC stays remembered (its expiry is still checked every time). */
const verifiedCacheSize = 256

/**
 * The node's side: checks tickets under the key of its current join. `clockOffsetMs` is the head's
 * clock minus this machine's, measured at join, so a gamer's clock that is off does not expire
 * every ticket.
 */
export class TicketVerifier {
  readonly #key: Uint8Array
  readonly #self: string
  readonly #offsetMs: number
  readonly #now: () => number
  readonly #checked = new Map<string, TicketClaims>()

  constructor(init: { key: Uint8Array; self: string; clockOffsetMs?: number; now?: () => number }) {
    if (init.key.byteLength !== ticketKeyBytes)
      throw new TicketError('no_key', `a ticket key has ${ticketKeyBytes} bytes`)
    this.#key = init.key
    this.#self = init.self
    this.#offsetMs = init.clockOffsetMs ?? 0
    this.#now = init.now ?? Date.now
  }

  /** The ticket's claims, or TicketError saying which check failed. */
  check(ticket: string | undefined, holder: string): TicketClaims {
    if (ticket == null || ticket === '')
      throw new TicketError('malformed', `a request that does not come from the head needs ${ticketHeader}`)
    let claims = this.#checked.get(ticket)
    if (claims == null) {
      claims = readTicket(ticket)
      const dot = ticket.indexOf('.')
      const want = mac(this.#key, Buffer.from(ticket.slice(0, dot), 'base64url'))
      const got = Buffer.from(ticket.slice(dot + 1), 'base64url')
      if (got.byteLength !== want.byteLength || !timingSafeEqual(got, want))
        throw new TicketError('forged', "the ticket's MAC does not verify under this node's key")
      if (this.#checked.size >= verifiedCacheSize) this.#checked.clear()
      this.#checked.set(ticket, claims)
    }
    if (claims.node !== this.#self)
      throw new TicketError('wrong_node', `the ticket is for node ${claims.node}, not this one`)
    if (claims.holder !== holder)
      throw new TicketError('wrong_holder', `the ticket is for ${claims.holder}, not the peer that sent it`)
    const headNow = this.#now() + this.#offsetMs
    if (headNow >= claims.exp)
      throw new TicketError('expired', `the ticket expired ${Math.round(headNow - claims.exp)} ms ago`)
    return claims
  }
}

/**
 * Concurrent requests per lease at a node: at most the lease's slots run at once. Leases are
 * forgotten once idle, so the map holds only leases with requests running.
 */
export class LeaseSlots {
  readonly #running = new Map<number, number>()

  /** Takes a slot of `claims`' lease; false when all are taken. */
  take(claims: TicketClaims): boolean {
    const n = this.#running.get(claims.lease) ?? 0
    if (n >= claims.slots) return false
    this.#running.set(claims.lease, n + 1)
    return true
  }

  give(claims: TicketClaims): void {
    const n = (this.#running.get(claims.lease) ?? 0) - 1
    if (n <= 0) this.#running.delete(claims.lease)
    else this.#running.set(claims.lease, n)
  }
}
