import { execFileSync } from 'node:child_process'

/**
 * A network namespace joined to this one by a veth pair, for a node that must be cut off from its
 * head without stopping it:
 *
 *   root ns: hostIp (hostVeth) ──── veth ──── (nsVeth) nsIp: ns
 *
 * `partition()` drops every packet on the namespace's side of the link (iptables, both directions):
 * TCP connections stay open and go silent, as on a real network split; `heal()` lets traffic through
 * again. Needs root (CAP_NET_ADMIN), iproute2 and iptables.
 */
export interface NetnsLink {
  ns: string
  hostVeth: string
  nsVeth: string
  hostIp: string
  nsIp: string
  readonly partitioned: boolean
  /** argv prefix that runs a command inside the namespace. */
  exec(argv: string[]): string[]
  partition(): void
  heal(): void
  /** Deletes the namespace and the veth pair; processes inside must be gone first. */
  destroy(): void
}

export class NetnsCommandError extends Error {
  override name = 'NetnsCommandError'
}

export function runCommand(cmd: string, args: string[], timeoutMs = 10_000): string {
  try {
    return execFileSync(cmd, args, {
      timeout: timeoutMs,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
    })
  } catch (err) {
    const e = err as { stderr?: string; message: string }
    throw new NetnsCommandError(`${cmd} ${args.join(' ')}: ${e.stderr?.trim() || e.message}`)
  }
}

/** A /24 in 10.233.0.0/16 no interface or route here uses yet. */
function pickSubnet(seed: number): string {
  const inUse = `${runCommand('ip', ['-4', '-o', 'addr'])}\n${runCommand('ip', ['-4', 'route'])}`
  const used = new Set([...inUse.matchAll(/10\.233\.(\d+)\./g)].map((m) => Number(m[1])))
  for (let i = 0; i < 254; i++) {
    const octet = ((seed + i) % 254) + 1
    if (!used.has(octet)) return `10.233.${octet}`
  }
  throw new NetnsCommandError('no free /24 in 10.233.0.0/16')
}

/** Namespaces this process made, by name: `ip netns list` is checked against them after cleanup. */
export function listNamespaces(): string[] {
  return runCommand('ip', ['netns', 'list'])
    .split('\n')
    .map((l) => l.trim().split(/\s+/)[0] ?? '')
    .filter((n) => n !== '')
}

export function linkExists(name: string): boolean {
  try {
    runCommand('ip', ['link', 'show', name])
    return true
  } catch {
    return false
  }
}

/**
 * Why network namespaces cannot be made here (not root), or null when they can. Only a missing
 * permission is a reason to skip; anything else (no iproute2, no iptables) fails where it is used.
 */
export function namespacePermissionProblem(): string | null {
  const probe = `gfprobe${process.pid % 100_000}`
  try {
    runCommand('ip', ['netns', 'add', probe])
  } catch (err) {
    const message = (err as Error).message
    return /not permitted|permission denied/i.test(message) ? message : null
  }
  runCommand('ip', ['netns', 'del', probe])
  return null
}

/** `tag` (a few letters and digits) names the namespace and links; interface names stay under 15 characters. */
export function createNetnsLink(tag: string): NetnsLink {
  const ns = `${tag}ns`
  const hostVeth = `${tag}h`
  const nsVeth = `${tag}n`
  const net = pickSubnet(process.pid)
  const hostIp = `${net}.1`
  const nsIp = `${net}.2`
  const undo: Array<() => void> = []
  let partitioned = false
  const inNs = (args: string[]): string => runCommand('ip', ['netns', 'exec', ns, ...args])
  const drop = (op: '-I' | '-D'): void => {
    inNs(['iptables', op, 'INPUT', ...(op === '-I' ? ['1'] : []), '-i', nsVeth, '-j', 'DROP'])
    inNs(['iptables', op, 'OUTPUT', ...(op === '-I' ? ['1'] : []), '-o', nsVeth, '-j', 'DROP'])
  }
  const destroy = (): void => {
    for (const step of undo.splice(0).reverse()) {
      try {
        step()
      } catch {
        // best effort: the checks after cleanup name whatever is left
      }
    }
  }
  try {
    runCommand('ip', ['netns', 'add', ns])
    undo.push(() => runCommand('ip', ['netns', 'del', ns]))
    runCommand('ip', ['link', 'add', hostVeth, 'type', 'veth', 'peer', 'name', nsVeth, 'netns', ns])
    // Usually gone with the namespace (its peer end lives there); deleted here when it is not.
    undo.push(() => {
      if (linkExists(hostVeth)) runCommand('ip', ['link', 'del', hostVeth])
    })
    runCommand('ip', ['addr', 'add', `${hostIp}/24`, 'dev', hostVeth])
    runCommand('ip', ['link', 'set', hostVeth, 'up'])
    runCommand('ip', ['-n', ns, 'addr', 'add', `${nsIp}/24`, 'dev', nsVeth])
    runCommand('ip', ['-n', ns, 'link', 'set', nsVeth, 'up'])
    runCommand('ip', ['-n', ns, 'link', 'set', 'lo', 'up'])
    // Prove the rules work before anything depends on them (a missing iptables fails here, not mid-run).
    drop('-I')
    drop('-D')
  } catch (err) {
    destroy()
    throw err
  }
  return {
    ns,
    hostVeth,
    nsVeth,
    hostIp,
    nsIp,
    get partitioned() {
      return partitioned
    },
    exec: (argv) => ['ip', 'netns', 'exec', ns, ...argv],
    partition() {
      if (partitioned) return
      drop('-I')
      partitioned = true
    },
    heal() {
      if (!partitioned) return
      drop('-D')
      partitioned = false
    },
    destroy,
  }
}
