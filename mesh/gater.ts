import { BlockList, isIPv4, isIPv6 } from 'node:net'
import type { ConnectionGater } from '@libp2p/interface'
import type { Multiaddr } from '@multiformats/multiaddr'

/** Ranges a public-mode node never dials when a peer announces them: LAN, loopback, link-local, CGNAT. */
const nonPublicRanges = new BlockList()
for (const [net, prefix] of [
  ['0.0.0.0', 8],
  ['10.0.0.0', 8],
  ['100.64.0.0', 10],
  ['127.0.0.0', 8],
  ['169.254.0.0', 16],
  ['172.16.0.0', 12],
  ['192.0.0.0', 24],
  ['192.168.0.0', 16],
  ['198.18.0.0', 15],
  ['224.0.0.0', 4],
  ['240.0.0.0', 4],
] as const) {
  nonPublicRanges.addSubnet(net, prefix, 'ipv4')
}
for (const [net, prefix] of [
  ['::', 128],
  ['::1', 128],
  ['fc00::', 7],
  ['fe80::', 10],
  ['ff00::', 8],
] as const) {
  nonPublicRanges.addSubnet(net, prefix, 'ipv6')
}

/** True for loopback, private, link-local, CGNAT and other addresses not routable on the internet. */
export function isNonPublicIp(ip: string): boolean {
  if (isIPv4(ip)) return nonPublicRanges.check(ip, 'ipv4')
  if (isIPv6(ip)) {
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip)
    if (mapped?.[1] != null) return nonPublicRanges.check(mapped[1], 'ipv4')
    return nonPublicRanges.check(ip, 'ipv6')
  }
  return false
}

/** The first IP in a multiaddr: for a relayed address that is the relay's, which is what we dial. */
export function firstIp(addr: Multiaddr): string | undefined {
  for (const c of addr.getComponents()) {
    if ((c.name === 'ip4' || c.name === 'ip6') && c.value != null) return c.value
    if (c.name === 'dns' || c.name === 'dns4' || c.name === 'dns6' || c.name === 'dnsaddr') {
      return c.value === 'localhost' ? '127.0.0.1' : undefined
    }
  }
  return undefined
}

export interface MeshGaterInit {
  /** LAN, devnet and tests: dial private and loopback addresses like any other. */
  allowPrivateAddresses: boolean
  /** Addresses the operator configured (bootstrap list): dialled even when private. */
  trustedAddresses?: Multiaddr[]
}

/**
 * In public mode, refuse to dial non-public addresses: a hostile peer could otherwise announce
 * 192.168.x.y and make every gamer's daemon probe its own LAN.
 */
export function meshConnectionGater(init: MeshGaterInit): ConnectionGater {
  const trusted = new Set((init.trustedAddresses ?? []).map((a) => firstIp(a)).filter((ip) => ip != null))
  return {
    denyDialMultiaddr(addr: Multiaddr): boolean {
      if (init.allowPrivateAddresses) return false
      const ip = firstIp(addr)
      if (ip == null) return false
      if (trusted.has(ip)) return false
      return isNonPublicIp(ip)
    },
  }
}
