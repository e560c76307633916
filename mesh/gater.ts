import { lookup } from 'node:dns/promises'
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
  // ::/96 also covers the deprecated IPv4-compatible form ::a.b.c.d (::127.0.0.1)
  ['::', 96],
  ['fc00::', 7],
  ['fe80::', 10],
  ['ff00::', 8],
] as const) {
  nonPublicRanges.addSubnet(net, prefix, 'ipv6')
}

/** The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d) or NAT64 (64:ff9b::/96) IPv6 address. */
function embeddedIpv4(ip: string): string | undefined {
  const dotted = /^(?:::ffff:|64:ff9b::)(\d+\.\d+\.\d+\.\d+)$/i.exec(ip)
  if (dotted?.[1] != null) return dotted[1]
  const hex = /^(?:::ffff:|64:ff9b::)([0-9a-f]{1,4}):([0-9a-f]{1,4})$/i.exec(ip)
  if (hex?.[1] == null || hex[2] == null) return undefined
  const hi = Number.parseInt(hex[1], 16)
  const lo = Number.parseInt(hex[2], 16)
  return `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`
}

/** True for loopback, private, link-local, CGNAT and other addresses not routable on the internet. */
export function isNonPublicIp(ip: string): boolean {
  if (isIPv4(ip)) return nonPublicRanges.check(ip, 'ipv4')
  if (isIPv6(ip)) {
    const v4 = embeddedIpv4(ip)
    if (v4 != null) return nonPublicRanges.check(v4, 'ipv4')
    return nonPublicRanges.check(ip, 'ipv6')
  }
  return false
}

/** The host a dial to this multiaddr connects to first: for a relayed address, the relay's. */
export function firstHost(
  addr: Multiaddr,
): { kind: 'ip' | 'dns'; host: string; port: string | undefined } | undefined {
  const components = addr.getComponents()
  const i = components.findIndex((c) => ['ip4', 'ip6', 'dns', 'dns4', 'dns6', 'dnsaddr'].includes(c.name))
  const c = components[i]
  if (c?.value == null) return undefined
  const next = components[i + 1]
  const port = next?.name === 'tcp' || next?.name === 'udp' ? next.value : undefined
  return { kind: c.name.startsWith('ip') ? 'ip' : 'dns', host: c.value, port }
}

export interface MeshGaterInit {
  /** LAN, devnet and tests: dial private and loopback addresses like any other. */
  allowPrivateAddresses: boolean
  /** Addresses the operator configured (bootstrap list): dialled even when private. */
  trustedAddresses?: Multiaddr[]
  /** Name resolution for DNS multiaddrs; tests pass their own. */
  resolve?: (name: string) => Promise<string[]>
  resolveTimeoutMs?: number
}

const defaultResolve = async (name: string): Promise<string[]> =>
  (await lookup(name, { all: true })).map((a) => a.address)

/**
 * In public mode, refuse to dial non-public addresses: a hostile peer could otherwise announce
 * 192.168.x.y, or a DNS name that resolves there, and make every gamer's daemon probe its own LAN.
 * DNS names are resolved and every answer checked; a name that does not resolve in time is refused.
 * (A name that changes its answer between this check and the connect can still slip through; the
 * gater cannot pin the resolution libp2p's transport makes.)
 */
export function meshConnectionGater(init: MeshGaterInit): ConnectionGater {
  const key = (h: { host: string; port: string | undefined }): string =>
    `${h.host.toLowerCase()}:${h.port ?? ''}`
  const trusted = new Set(
    (init.trustedAddresses ?? []).map((a) => firstHost(a)).flatMap((h) => (h == null ? [] : [key(h)])),
  )
  const resolve = init.resolve ?? defaultResolve
  const resolveTimeoutMs = init.resolveTimeoutMs ?? 2_000
  return {
    async denyDialMultiaddr(addr: Multiaddr): Promise<boolean> {
      if (init.allowPrivateAddresses) return false
      const h = firstHost(addr)
      if (h == null) return false
      if (trusted.has(key(h))) return false
      if (h.kind === 'ip') return isNonPublicIp(h.host)
      const name = h.host.toLowerCase().replace(/\.$/, '')
      if (name === 'localhost' || name.endsWith('.localhost')) return true
      let timer: NodeJS.Timeout | undefined
      const answers = await Promise.race([
        resolve(name).catch(() => [] as string[]),
        new Promise<null>((r) => {
          timer = setTimeout(() => r(null), resolveTimeoutMs)
        }),
      ]).finally(() => clearTimeout(timer))
      if (answers == null || answers.length === 0) return true
      return answers.some((ip) => isNonPublicIp(ip))
    },
  }
}
