import { multiaddr } from '@multiformats/multiaddr'
import { describe, expect, it } from 'vitest'
import { isNonPublicIp, meshConnectionGater } from '../../mesh/gater.ts'

const peer = '12D3KooWRHB6MBRzE4ZrS4Cvo91fUsMQFcCsHPaQRyw9otbLwQVv'

describe('public-mode connection gater', () => {
  it('classifies loopback, private, link-local and CGNAT addresses as non-public', () => {
    for (const ip of [
      '127.0.0.1',
      '10.1.2.3',
      '172.20.0.1',
      '192.168.1.5',
      '169.254.1.1',
      '100.64.0.1',
      '0.0.0.0',
      '::1',
      'fe80::1',
      'fd00::1',
      '::ffff:192.168.1.1',
    ]) {
      expect(isNonPublicIp(ip), ip).toBe(true)
    }
    for (const ip of ['8.8.8.8', '1.1.1.1', '172.32.0.1', '2001:4860:4860::8888', '::ffff:8.8.8.8']) {
      expect(isNonPublicIp(ip), ip).toBe(false)
    }
  })

  it('refuses to dial private and loopback addresses learned from peers', () => {
    const gater = meshConnectionGater({ allowPrivateAddresses: false })
    expect(gater.denyDialMultiaddr?.(multiaddr('/ip4/192.168.1.20/tcp/4001'))).toBe(true)
    expect(gater.denyDialMultiaddr?.(multiaddr('/ip4/127.0.0.1/tcp/4001/ws'))).toBe(true)
    expect(gater.denyDialMultiaddr?.(multiaddr('/ip6/::1/tcp/4001'))).toBe(true)
    expect(gater.denyDialMultiaddr?.(multiaddr('/ip4/203.0.113.9/tcp/4001'))).toBe(false)
    // a relayed address is dialled through the relay: the relay's address is what counts
    expect(gater.denyDialMultiaddr?.(multiaddr(`/ip4/10.0.0.7/tcp/4001/p2p/${peer}/p2p-circuit`))).toBe(true)
    expect(gater.denyDialMultiaddr?.(multiaddr(`/ip4/198.51.100.1/tcp/4001/p2p/${peer}/p2p-circuit`))).toBe(
      false,
    )
  })

  it('still dials bootstrap addresses the operator configured, even private ones', () => {
    const gater = meshConnectionGater({
      allowPrivateAddresses: false,
      trustedAddresses: [multiaddr(`/ip4/192.168.1.2/tcp/4001/p2p/${peer}`)],
    })
    expect(gater.denyDialMultiaddr?.(multiaddr('/ip4/192.168.1.2/tcp/4001'))).toBe(false)
    expect(gater.denyDialMultiaddr?.(multiaddr('/ip4/192.168.1.3/tcp/4001'))).toBe(true)
  })

  it('allows everything when the LAN/devnet switch is on', () => {
    const gater = meshConnectionGater({ allowPrivateAddresses: true })
    expect(gater.denyDialMultiaddr?.(multiaddr('/ip4/192.168.1.20/tcp/4001'))).toBe(false)
    expect(gater.denyDialMultiaddr?.(multiaddr('/ip4/127.0.0.1/tcp/4001'))).toBe(false)
  })
})
