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
    for (const ip of [
      '8.8.8.8',
      '1.1.1.1',
      '172.32.0.1',
      '2001:4860:4860::8888',
      '::ffff:8.8.8.8',
      '64:ff9b::8.8.8.8',
    ]) {
      expect(isNonPublicIp(ip), ip).toBe(false)
    }
  })

  it('refuses to dial private and loopback addresses learned from peers', async () => {
    const gater = meshConnectionGater({ allowPrivateAddresses: false })
    expect(await gater.denyDialMultiaddr?.(multiaddr('/ip4/192.168.1.20/tcp/4001'))).toBe(true)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/ip4/127.0.0.1/tcp/4001/ws'))).toBe(true)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/ip6/::1/tcp/4001'))).toBe(true)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/ip4/203.0.113.9/tcp/4001'))).toBe(false)
    // a relayed address is dialled through the relay: the relay's address is what counts
    expect(await gater.denyDialMultiaddr?.(multiaddr(`/ip4/10.0.0.7/tcp/4001/p2p/${peer}/p2p-circuit`))).toBe(
      true,
    )
    expect(
      await gater.denyDialMultiaddr?.(multiaddr(`/ip4/198.51.100.1/tcp/4001/p2p/${peer}/p2p-circuit`)),
    ).toBe(false)
  })

  it('still dials bootstrap addresses the operator configured, even private ones', async () => {
    const gater = meshConnectionGater({
      allowPrivateAddresses: false,
      trustedAddresses: [multiaddr(`/ip4/192.168.1.2/tcp/4001/p2p/${peer}`)],
    })
    expect(await gater.denyDialMultiaddr?.(multiaddr('/ip4/192.168.1.2/tcp/4001'))).toBe(false)
    // trust is for the configured address, not every port of its host
    expect(await gater.denyDialMultiaddr?.(multiaddr('/ip4/192.168.1.2/tcp/22'))).toBe(true)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/ip4/192.168.1.3/tcp/4001'))).toBe(true)
  })

  it('allows everything when the LAN/devnet switch is on', async () => {
    const gater = meshConnectionGater({ allowPrivateAddresses: true })
    expect(await gater.denyDialMultiaddr?.(multiaddr('/ip4/192.168.1.20/tcp/4001'))).toBe(false)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/ip4/127.0.0.1/tcp/4001'))).toBe(false)
  })

  it('resolves DNS names announced by peers and refuses those that point inside', async () => {
    const answers: Record<string, string[]> = {
      'eu-north.example.net': ['203.0.113.7'],
      '127.0.0.1.nip.io': ['127.0.0.1'],
      'mixed.example.net': ['203.0.113.8', '10.0.0.8'],
    }
    const gater = meshConnectionGater({
      allowPrivateAddresses: false,
      resolve: async (name) => {
        const a = answers[name]
        if (a == null) throw new Error('ENOTFOUND')
        return a
      },
    })
    expect(await gater.denyDialMultiaddr?.(multiaddr('/dns4/eu-north.example.net/tcp/4001'))).toBe(false)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/dns4/127.0.0.1.nip.io/tcp/22'))).toBe(true)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/dns4/mixed.example.net/tcp/4001'))).toBe(true)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/dns4/localhost./tcp/80'))).toBe(true)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/dns6/printer.localhost/tcp/80'))).toBe(true)
    expect(await gater.denyDialMultiaddr?.(multiaddr('/dns4/nowhere.invalid/tcp/80'))).toBe(true)
  })

  it('refuses a name whose resolution hangs, within the resolve timeout', async () => {
    const gater = meshConnectionGater({
      allowPrivateAddresses: false,
      resolve: () => new Promise(() => {}),
      resolveTimeoutMs: 50,
    })
    expect(await gater.denyDialMultiaddr?.(multiaddr('/dns4/slow.example.net/tcp/4001'))).toBe(true)
  })
})
