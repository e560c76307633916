import { runCommand as run } from './fault-netns.ts'

/**
 * A home network behind a MASQUERADE router, for NAT tests (made here, undone by the caller's undo
 * steps, in reverse order, whatever happened):
 *
 *   root ns: relay, head, gateway ── veth ── ns router (MASQUERADE) ── veth ── ns home: the NAT'd node
 *   <publicNet>.1                            <publicNet>.2 | <homeNet>.1       <homeNet>.2
 *
 * The root namespace has no route into the home /24 (an `unreachable` route keeps the SYNs of a
 * failing direct dial off the host's default gateway), so the home side can only dial out. Needs
 * root (CAP_NET_ADMIN), iproute2 and iptables.
 */
export interface NatTopology {
  publicNet: string
  homeNet: string
  /** The root namespace's address on the "internet" side: listen here to be reachable from home. */
  publicIp: string
  homeIp: string
  ns: { router: string; home: string }
  /** argv prefix that runs a command in the home namespace. */
  atHome(argv: string[]): string[]
}

export interface UndoStep {
  what: string
  fn: () => void | Promise<void>
}

/** Two free /24s in 10.231.0.0/16, chosen from the pid, skipping any third octet already in use here. */
function pickSubnets(): { publicNet: string; homeNet: string } {
  const inUse = `${run('ip', ['-4', '-o', 'addr'])}\n${run('ip', ['-4', 'route'])}`
  const used = new Set([...inUse.matchAll(/10\.231\.(\d+)\./g)].map((m) => Number(m[1])))
  for (let i = 0; i < 127; i++) {
    const base = ((process.pid + i) % 127) * 2
    if (!used.has(base) && !used.has(base + 1)) {
      return { publicNet: `10.231.${base}`, homeNet: `10.231.${base + 1}` }
    }
  }
  throw new Error('no free /24 pair in 10.231.0.0/16')
}

/**
 * Builds the topology; `tag` (a few characters, unique per test file and process) names its
 * namespaces and links. Throws NatUnavailableError when namespaces cannot be made here (the only
 * reason a caller may skip); every later failure is a real one.
 */
export function buildNatTopology(tag: string, undo: UndoStep[]): NatTopology {
  const ns = { router: `${tag}r`, home: `${tag}h` }
  const veth = { root: `${tag}a`, routerPublic: `${tag}b`, routerHome: `${tag}c`, home: `${tag}d` }
  try {
    run('ip', ['netns', 'add', ns.router])
  } catch (err) {
    throw new NatUnavailableError(
      `cannot create network namespaces (needs root / CAP_NET_ADMIN): ${(err as Error).message}`,
    )
  }
  undo.push({ what: `delete netns ${ns.router}`, fn: () => void run('ip', ['netns', 'del', ns.router]) })
  run('ip', ['netns', 'add', ns.home])
  undo.push({ what: `delete netns ${ns.home}`, fn: () => void run('ip', ['netns', 'del', ns.home]) })

  const { publicNet, homeNet } = pickSubnets()
  const publicIp = `${publicNet}.1`
  const homeIp = `${homeNet}.2`

  // root <-> router: the "internet" side.
  run('ip', [
    ...['link', 'add', veth.root, 'type', 'veth'],
    ...['peer', 'name', veth.routerPublic, 'netns', ns.router],
  ])
  undo.push({
    what: `delete link ${veth.root}`,
    fn: () => {
      // Usually gone already with the router namespace; only delete it if it is still there.
      if (run('ip', ['-o', 'link', 'show']).includes(`${veth.root}@`)) run('ip', ['link', 'del', veth.root])
    },
  })
  run('ip', ['addr', 'add', `${publicIp}/24`, 'dev', veth.root])
  run('ip', ['link', 'set', veth.root, 'up'])
  run('ip', ['-n', ns.router, 'addr', 'add', `${publicNet}.2/24`, 'dev', veth.routerPublic])
  run('ip', ['-n', ns.router, 'link', 'set', veth.routerPublic, 'up'])
  run('ip', ['-n', ns.router, 'link', 'set', 'lo', 'up'])

  // router <-> home: the private LAN behind the NAT.
  run('ip', [
    ...['-n', ns.router, 'link', 'add', veth.routerHome, 'type', 'veth'],
    ...['peer', 'name', veth.home, 'netns', ns.home],
  ])
  run('ip', ['-n', ns.router, 'addr', 'add', `${homeNet}.1/24`, 'dev', veth.routerHome])
  run('ip', ['-n', ns.router, 'link', 'set', veth.routerHome, 'up'])
  run('ip', ['-n', ns.home, 'addr', 'add', `${homeIp}/24`, 'dev', veth.home])
  run('ip', ['-n', ns.home, 'link', 'set', veth.home, 'up'])
  run('ip', ['-n', ns.home, 'link', 'set', 'lo', 'up'])
  run('ip', ['-n', ns.home, 'route', 'add', 'default', 'via', `${homeNet}.1`])

  run('ip', ['netns', 'exec', ns.router, 'sysctl', '-q', '-w', 'net.ipv4.ip_forward=1'])
  run('ip', [
    ...['netns', 'exec', ns.router, 'iptables', '-t', 'nat', '-A', 'POSTROUTING'],
    ...['-s', `${homeNet}.0/24`, '-o', veth.routerPublic, '-j', 'MASQUERADE'],
  ])

  // No inbound: the home LAN is not routable from the root namespace (as a private range on the
  // internet). Without this the failing dial's SYNs would leave through the host's default route.
  run('ip', ['route', 'add', 'unreachable', `${homeNet}.0/24`])
  undo.push({
    what: `delete unreachable route ${homeNet}.0/24`,
    fn: () => void run('ip', ['route', 'del', 'unreachable', `${homeNet}.0/24`]),
  })
  return {
    publicNet,
    homeNet,
    publicIp,
    homeIp,
    ns,
    atHome: (argv) => ['ip', 'netns', 'exec', ns.home, ...argv],
  }
}

export class NatUnavailableError extends Error {
  override name = 'NatUnavailableError'
}

/** Runs the undo steps in reverse order, each whatever the others did. */
export async function undoAll(undo: UndoStep[], what: string): Promise<void> {
  for (const step of undo.splice(0).reverse()) {
    try {
      await step.fn()
    } catch (err) {
      console.warn(`${what} cleanup: ${step.what} failed: ${(err as Error).message}`)
    }
  }
}
