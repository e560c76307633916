import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import {
  issueTicket,
  LeaseSlots,
  readTicket,
  type TicketClaims,
  TicketError,
  TicketVerifier,
  ticketMaxChars,
} from '../../mesh/ticket.ts'

const key = new Uint8Array(randomBytes(32))
const claims: TicketClaims = { node: 'node-a', holder: 'gateway-1', lease: 7, exp: 1_000_000, slots: 2 }

function problem(f: () => unknown): string {
  try {
    f()
  } catch (err) {
    expect(err).toBeInstanceOf(TicketError)
    expect((err as TicketError).code).toBe('ticket_invalid')
    return (err as TicketError).problem
  }
  throw new Error('no TicketError')
}

describe('direct-path tickets', () => {
  it('verifies what the head issued, for this node, from the holder it names, until it expires', () => {
    const t = issueTicket(key, claims)
    expect(t.length).toBeLessThan(ticketMaxChars)
    expect(readTicket(t)).toEqual(claims)
    let now = 999_000
    const v = new TicketVerifier({ key, self: 'node-a', now: () => now })
    expect(v.check(t, 'gateway-1')).toEqual(claims)
    now = 1_000_000
    expect(problem(() => v.check(t, 'gateway-1'))).toBe('expired')
  })

  it("uses the head's clock: a node whose clock is off by minutes still checks expiry right", () => {
    const t = issueTicket(key, claims)
    // This machine is 5 minutes behind the head: at local 700,000 the head's clock reads 1,000,000.
    const v = new TicketVerifier({ key, self: 'node-a', clockOffsetMs: 300_000, now: () => 700_000 })
    expect(problem(() => v.check(t, 'gateway-1'))).toBe('expired')
    const fine = new TicketVerifier({ key, self: 'node-a', clockOffsetMs: 300_000, now: () => 699_000 })
    expect(fine.check(t, 'gateway-1').lease).toBe(7)
  })

  it('names each refusal: forged, for another node, for another holder, malformed, missing', () => {
    const v = new TicketVerifier({ key, self: 'node-a', now: () => 0 })
    const t = issueTicket(key, claims)
    expect(problem(() => v.check(issueTicket(new Uint8Array(randomBytes(32)), claims), 'gateway-1'))).toBe(
      'forged',
    )
    // The payload changed under the old MAC (more slots): forged.
    const [, mac] = t.split('.')
    const more = issueTicket(key, { ...claims, slots: 99 }).split('.')[0]
    expect(problem(() => v.check(`${more}.${mac}`, 'gateway-1'))).toBe('forged')
    expect(problem(() => v.check(issueTicket(key, { ...claims, node: 'node-b' }), 'gateway-1'))).toBe(
      'wrong_node',
    )
    expect(problem(() => v.check(t, 'gateway-2'))).toBe('wrong_holder')
    expect(problem(() => v.check('not a ticket', 'gateway-1'))).toBe('malformed')
    expect(problem(() => v.check(`${Buffer.from('{}').toString('base64url')}.x`, 'gateway-1'))).toBe(
      'malformed',
    )
    expect(problem(() => v.check('x'.repeat(ticketMaxChars + 1), 'gateway-1'))).toBe('malformed')
    expect(problem(() => v.check(undefined, 'gateway-1'))).toBe('malformed')
    expect(() => new TicketVerifier({ key: new Uint8Array(8), self: 'node-a' })).toThrow(TicketError)
  })

  it('a cached ticket is still checked for holder and expiry every time', () => {
    let now = 0
    const v = new TicketVerifier({ key, self: 'node-a', now: () => now })
    const t = issueTicket(key, claims)
    v.check(t, 'gateway-1')
    expect(problem(() => v.check(t, 'gateway-2'))).toBe('wrong_holder')
    now = claims.exp
    expect(problem(() => v.check(t, 'gateway-1'))).toBe('expired')
  })

  it("runs at most a lease's slots at once, per lease", () => {
    const slots = new LeaseSlots()
    const other = { ...claims, lease: 8, slots: 1 }
    expect(slots.take(claims)).toBe(true)
    expect(slots.take(claims)).toBe(true)
    expect(slots.take(claims)).toBe(false)
    expect(slots.take(other)).toBe(true)
    expect(slots.take(other)).toBe(false)
    slots.give(claims)
    expect(slots.take(claims)).toBe(true)
  })
})
