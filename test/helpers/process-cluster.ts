import { type ChildProcess, spawn } from 'node:child_process'
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { daemonEnv } from '../../daemon/launch.ts'
import { ApiKeyStore } from '../../federation/keys.ts'
import { openStore } from '../../federation/store.ts'
import { initAuthority } from '../../mesh/authority.ts'
import { issueRegionCertificate } from '../../mesh/certificate.ts'
import { loadOrCreateIdentity } from '../../mesh/identity.ts'
import { type LinkProxy, startLinkProxy } from './fault-link.ts'
import { createNetnsLink, linkExists, listNamespaces, type NetnsLink, runCommand } from './fault-netns.ts'

/**
 * A devnet-shaped Garage cluster of real processes, so that each part can be SIGKILLed and restarted
 * on its own: per region one `garage bootstrap --policy` (bootstrap node and head), `garage node`
 * processes on the embedded engine with the tiny model, and `garage federation` with API keys. One
 * node may run in a network namespace, reaching its head only through a delaying TCP proxy (a slow
 * link that can also be cut). Every process carries `GARAGE_FAULT_RUN=<runId>` in its environment
 * (children inherit it), so a scan of /proc finds whatever outlived its parent.
 */

export const tinyModel = 'garage-tiny'
export const runMarkerVar = 'GARAGE_FAULT_RUN'
const garageBin = fileURLToPath(new URL('../../bin/garage.js', import.meta.url))
const readyTimeoutMs = 90_000
const stopGraceMs = 15_000

export class GarageProcessError extends Error {
  override name = 'GarageProcessError'
}

/** One `garage ...` process: its stdout lines, a tail of its stderr, and its exit. */
export class GarageProcess {
  readonly name: string
  readonly child: ChildProcess
  readonly pid: number
  readonly stdout: string[] = []
  readonly startedAt = performance.now()
  readonly exited: Promise<void>
  private readonly stderrLines: string[] = []
  /** Every stderr line with its time, for the logs written after a failed run. */
  readonly log: string[] = []
  private readonly lineWaiters = new Set<(line: string) => void>()

  constructor(name: string, argv: string[], env: NodeJS.ProcessEnv, onStderrLine?: (line: string) => void) {
    this.name = name
    this.child = spawn(argv[0]!, argv.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] })
    if (this.child.pid == null) throw new GarageProcessError(`${name}: spawn failed`)
    this.pid = this.child.pid
    this.exited = new Promise((resolve) => this.child.once('exit', () => resolve()))
    createInterface({ input: this.child.stdout! }).on('line', (line) => {
      this.stdout.push(line)
      for (const w of this.lineWaiters) w(line)
    })
    createInterface({ input: this.child.stderr! }).on('line', (line) => {
      if (this.log.length < 50_000) this.log.push(`${Math.round(performance.now())} ${line}`)
      this.stderrLines.push(line)
      if (this.stderrLines.length > 400) this.stderrLines.splice(0, 100)
      onStderrLine?.(line)
    })
  }

  get running(): boolean {
    return this.child.exitCode == null && this.child.signalCode == null
  }

  stderrTail(lines = 40): string {
    return this.stderrLines.slice(-lines).join('\n')
  }

  /** Resolves with the first stdout line (printed already or to come) matching `pattern`. */
  line(pattern: RegExp, timeoutMs = readyTimeoutMs): Promise<string> {
    const earlier = this.stdout.find((l) => pattern.test(l))
    if (earlier != null) return Promise.resolve(earlier)
    return new Promise((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer)
        this.lineWaiters.delete(onLine)
      }
      const onLine = (line: string): void => {
        if (!pattern.test(line)) return
        done()
        resolve(line)
      }
      const timer = setTimeout(() => {
        done()
        reject(
          new GarageProcessError(`${this.name}: no ${pattern} within ${timeoutMs} ms\n${this.stderrTail()}`),
        )
      }, timeoutMs)
      this.lineWaiters.add(onLine)
      void this.exited.then(() => {
        if (!this.lineWaiters.has(onLine)) return
        done()
        reject(
          new GarageProcessError(
            `${this.name} exited (${this.child.exitCode ?? this.child.signalCode}) before ${pattern}\n${this.stderrTail()}`,
          ),
        )
      })
    })
  }

  /** The value after `label` on its banner line (`  label   value ...`). */
  field(label: string): string {
    const line = this.stdout.find((l) => l.trim().startsWith(label))
    if (line == null) throw new GarageProcessError(`${this.name}: no "${label}" in its banner`)
    return line.trim().slice(label.length).trim().split(/\s+/)[0]!
  }

  /** Sends `signal` and resolves once the process is gone; SIGKILL after `graceMs` if it lingers. */
  async stop(signal: NodeJS.Signals, graceMs = stopGraceMs): Promise<'exited' | 'killed'> {
    if (!this.running) return 'exited'
    this.child.kill(signal)
    let timer: NodeJS.Timeout | undefined
    const outcome = await Promise.race([
      this.exited.then(() => 'exited' as const),
      new Promise<'late'>((resolve) => {
        timer = setTimeout(() => resolve('late'), graceMs)
      }),
    ])
    clearTimeout(timer)
    if (outcome === 'exited') return 'exited'
    this.child.kill('SIGKILL')
    await this.exited
    return 'killed'
  }
}

export interface ClusterRegion {
  name: string
  headPeerId: string
  dir: string
  /** Fixed after the first start (port 0 then), so certificates, peer stores and proxies stay valid. */
  meshPort: number
  opsPort: number
  headPort: number
  /** `/ip4/127.0.0.1/tcp/<meshPort>/p2p/<headPeerId>` */
  addr: string
  /** Addresses the head announces: its own, and the proxy's when a node reaches it only through that. */
  announce: string[]
  headUrl: string
  proc: GarageProcess | null
}

export interface ClusterNode {
  name: string
  region: string
  dir: string
  peerId: string
  /** Runs in the namespace and reaches its head only through the link proxy. */
  isolated: boolean
  proc: GarageProcess | null
}

export interface ClusterFederation {
  dir: string
  peerId: string
  port: number
  url: string
  adminToken: string
  proc: GarageProcess | null
}

export interface ClusterKey {
  id: string
  name: string
  key: string
}

export interface ProcessClusterOptions {
  /** Put into every process's environment (runMarkerVar): the /proc scan finds leftovers by it. */
  runId: string
  /** Holds every data dir, and TMPDIR for every process: removing it removes all they wrote. */
  root: string
  regions: string[]
  nodesPerRegion: number
  /** The last node of the last region runs in a network namespace behind the link proxy. */
  isolateOneNode: boolean
  /** Each engine sequence's speed cap: answers take long enough for a kill to land mid-stream. */
  maxTokensPerSecond: number
  parallel: number
  contextLength: number
  keyNames: string[]
  /** libp2p debug namespaces for the nodes (DEBUG=...), to see dials and connection drops in their logs. */
  nodeDebug?: string
  /** The regions' policy models (default: the tiny model on the embedded engine, a replica per node). */
  models?: unknown[]
  /** More `garage node` arguments and environment for a node (e.g. --vllm-image, a PATH with a fake nvidia-smi). */
  nodeSetup?: (node: string) => { args?: string[]; env?: NodeJS.ProcessEnv; hostPolicies?: boolean }
  /** The policy's `ray` section (default: no Ray cluster). */
  ray?: unknown
  /** The regions' certificates mark their Ray cluster trusted. */
  rayTrusted?: boolean
  /** More `garage bootstrap` arguments (e.g. --ray-image, --vllm-image). */
  headArgs?: string[]
  /** Gateways to run (default 1): more need `database`, the PostgreSQL they share. */
  gateways?: number
  /** postgres://...: the gateways keep keys, ledger and limits there (--database) instead of SQLite. */
  database?: string
  /** A node logged that it joined its region (first start, or a rejoin after a loss). */
  onNodeJoined?: (node: string, at: number) => void
  progress?: (message: string) => void
}

export interface LeftoverProcess {
  pid: number
  cmdline: string
}

export interface CleanupReport {
  /** Processes that did not stop on SIGTERM within the grace period. */
  forced: string[]
  /** Processes this cluster started (every restart included) whose pid has not exited. */
  running: string[]
  /** Processes with the run's marker still alive after every known process stopped (then SIGKILLed). */
  leftovers: LeftoverProcess[]
  namespaces: string[]
  links: string[]
  rootLeft: boolean
  /** Containers labelled with one of the cluster's PeerIds. */
  containers: string[]
}

/** Processes alive now whose environment carries `runMarkerVar=runId` (zombies excluded). */
export async function markedProcesses(runId: string, also?: string): Promise<LeftoverProcess[]> {
  const out: LeftoverProcess[] = []
  const marker = `${runMarkerVar}=${runId}`
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const environ = (await readFile(`/proc/${entry}/environ`, 'latin1')).split('\0')
      if (!environ.includes(marker)) continue
      if (also != null && !environ.some((e) => e.includes(also))) continue
      const stat = await readFile(`/proc/${entry}/stat`, 'latin1')
      if (/^\d+ \(.*\) Z/.test(stat)) continue
      const cmdline = (await readFile(`/proc/${entry}/cmdline`, 'latin1')).split('\0').join(' ').trim()
      out.push({ pid: Number(entry), cmdline })
    } catch {
      // gone meanwhile, or not ours to read
    }
  }
  return out
}

/**
 * A free loopback port, for a head that must announce its own address before it starts (the OS
 * hands ports out in turn, so another taking it between close and listen is not a practical risk).
 */
async function freePort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  await new Promise<void>((resolve) => server.close(() => resolve()))
  if (address == null || typeof address === 'string') throw new GarageProcessError('no free port')
  return address.port
}

/** CPU time (user + system) a process has used, in ms (Linux counts it in 10 ms ticks); null once it is gone. */
export async function cpuTimeMs(pid: number): Promise<number | null> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'latin1')
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(fields[11]) + Number(fields[12])) * 10
  } catch {
    return null
  }
}

function portOf(url: string): number {
  return Number(new URL(url).port)
}

export class ProcessCluster {
  readonly options: ProcessClusterOptions
  readonly regions = new Map<string, ClusterRegion>()
  readonly nodes = new Map<string, ClusterNode>()
  readonly keys: ClusterKey[] = []
  authority = ''
  federation!: ClusterFederation
  /** Every gateway: `federation` first, then the others (options.gateways). */
  readonly gateways: ClusterFederation[] = []
  netns: NetnsLink | null = null
  proxy: LinkProxy | null = null
  private stopped: Promise<CleanupReport> | null = null
  /** Every process started, restarts included, in order. */
  readonly started: GarageProcess[] = []
  private readonly tmp: string

  private constructor(options: ProcessClusterOptions) {
    this.options = options
    this.tmp = join(options.root, 'tmp')
  }

  /** Nothing runs yet: start() brings the cluster up (keep the instance to stop it and read its logs). */
  static create(options: ProcessClusterOptions): ProcessCluster {
    return new ProcessCluster(options)
  }

  /** Builds and starts the whole cluster; on failure stops what started and rethrows. */
  async start(): Promise<void> {
    try {
      await this.setUp()
    } catch (err) {
      await this.stop()
      throw err
    }
  }

  private progress(message: string): void {
    this.options.progress?.(message)
  }

  private env(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    return {
      ...process.env,
      GARAGE_LOG_LEVEL: 'info',
      TMPDIR: this.tmp,
      [runMarkerVar]: this.options.runId,
      ...extra,
    }
  }

  private async setUp(): Promise<void> {
    const o = this.options
    await mkdir(this.tmp, { recursive: true })
    const authority = await initAuthority(join(o.root, 'authority'))
    this.authority = authority.id

    const fedDir = join(o.root, 'federation')
    await mkdir(fedDir, { recursive: true, mode: 0o700 })
    const fedPeerId = peerIdFromPrivateKey(await loadOrCreateIdentity(fedDir)).toString()
    const store = await openStore({ dataDir: fedDir, database: o.database })
    try {
      const keys = new ApiKeyStore(store)
      for (const name of o.keyNames) {
        const made = await keys.create({ name })
        this.keys.push({ id: made.id, name, key: made.key })
      }
    } finally {
      await store.close()
    }
    this.federation = { dir: fedDir, peerId: fedPeerId, port: 0, url: '', adminToken: '', proc: null }
    this.gateways.push(this.federation)
    for (let i = 2; i <= (o.gateways ?? 1); i++) {
      const dir = join(o.root, `federation-${i}`)
      await mkdir(dir, { recursive: true, mode: 0o700 })
      const peerId = peerIdFromPrivateKey(await loadOrCreateIdentity(dir)).toString()
      this.gateways.push({ dir, peerId, port: 0, url: '', adminToken: '', proc: null })
    }

    for (const name of o.regions) {
      const dir = join(o.root, `head-${name}`)
      await mkdir(dir, { recursive: true })
      const headPeerId = peerIdFromPrivateKey(await loadOrCreateIdentity(dir)).toString()
      await writeFile(
        join(dir, 'region.cert'),
        await issueRegionCertificate(authority.key, {
          region: name,
          head: headPeerId,
          addrs: [],
          ttlMs: 86_400_000,
          ...(o.rayTrusted === true ? { rayTrusted: true } : {}),
        }),
      )
      await writeFile(
        join(dir, 'policy.json'),
        JSON.stringify({
          region: name,
          models: o.models ?? [
            {
              name: tinyModel,
              engine: ['llamacpp'],
              source: { gguf: 'garage-tiny' },
              replicas: o.nodesPerRegion,
              minVramMiB: 0,
              minRamMiB: 16,
              parallel: o.parallel,
              contextLength: o.contextLength,
            },
          ],
          ray: o.ray ?? { enabled: false },
        }),
      )
      this.regions.set(name, {
        name,
        headPeerId,
        dir,
        meshPort: 0,
        opsPort: 0,
        headPort: 0,
        addr: '',
        announce: [],
        headUrl: '',
        proc: null,
      })
    }
    for (const [r, region] of o.regions.entries()) {
      for (let i = 0; i < o.nodesPerRegion; i++) {
        const name = `${region}-n${i + 1}`
        const dir = join(o.root, `node-${name}`)
        await mkdir(dir, { recursive: true })
        const peerId = peerIdFromPrivateKey(await loadOrCreateIdentity(dir)).toString()
        const isolated = o.isolateOneNode && r === o.regions.length - 1 && i === o.nodesPerRegion - 1
        this.nodes.set(name, { name, region, dir, peerId, isolated, proc: null })
      }
    }

    const isolated = [...this.nodes.values()].find((n) => n.isolated)
    if (isolated != null) {
      const region = this.region(isolated.region)
      this.netns = createNetnsLink(`gf${process.pid % 100_000}`)
      this.proxy = await startLinkProxy({
        listenHost: this.netns.hostIp,
        target: () => ({ host: '127.0.0.1', port: region.meshPort }),
      })
      // The head announces the address that node reaches it at, as a coordinator announces its public
      // one (README): its own port must then be known before it starts.
      region.meshPort = await freePort()
      region.announce = [
        `/ip4/127.0.0.1/tcp/${region.meshPort}`,
        `/ip4/${this.proxy.host}/tcp/${this.proxy.port}`,
      ]
    }
    // Regions one after the other: each later bootstrap joins the DHT through the earlier ones.
    for (const name of o.regions) {
      this.progress(`starting region ${name} (bootstrap and head)`)
      await this.startHead(name)
    }
    this.progress(`starting ${this.nodes.size} nodes`)
    await Promise.all([...this.nodes.keys()].map((n) => this.startNode(n)))
    this.progress(`starting ${this.gateways.length} federation gateway(s)`)
    for (const f of this.gateways) await this.startFederation(f)
  }

  region(name: string): ClusterRegion {
    const r = this.regions.get(name)
    if (r == null) throw new GarageProcessError(`no region ${name}`)
    return r
  }

  node(name: string): ClusterNode {
    const n = this.nodes.get(name)
    if (n == null) throw new GarageProcessError(`no node ${name}`)
    return n
  }

  nodeByPeerId(peerId: string): ClusterNode | undefined {
    return [...this.nodes.values()].find((n) => n.peerId === peerId)
  }

  /** (Re)starts a region's bootstrap and head on the ports of its first start. */
  async startHead(name: string): Promise<void> {
    const r = this.region(name)
    this.refuseAfterStop()
    if (r.proc?.running === true) throw new GarageProcessError(`region ${name} is running`)
    const others = [...this.regions.values()].filter((o) => o.name !== name && o.addr !== '')
    const args = [
      'bootstrap',
      ...['--region', name, '--cert', join(r.dir, 'region.cert'), '--authority', this.authority],
      ...['--listen', `/ip4/127.0.0.1/tcp/${r.meshPort}`, '--allow-private'],
      ...['--http', `127.0.0.1:${r.opsPort}`, '--head-http', `127.0.0.1:${r.headPort}`],
      ...['--policy', join(r.dir, 'policy.json')],
      ...this.gateways.flatMap((f) => ['--federation', f.peerId]),
      ...others.flatMap((o) => ['--bootstrap', o.addr]),
      ...r.announce.flatMap((a) => ['--announce', a]),
      ...['--data-dir', r.dir],
      ...(this.options.headArgs ?? []),
    ]
    const proc = new GarageProcess(`head ${name}`, [process.execPath, garageBin, ...args], this.env())
    this.started.push(proc)
    r.proc = proc
    await proc.line(/head api/)
    const addr = proc.stdout
      .filter((l) => l.trim().startsWith('address'))
      .map((l) => l.trim().split(/\s+/)[1]!)
      .find((a) => a.startsWith('/ip4/127.0.0.1/tcp/'))
    if (addr == null) throw new GarageProcessError(`head ${name}: no TCP address in its banner`)
    r.addr = addr
    r.meshPort = Number(addr.split('/')[4])
    r.opsPort = portOf(proc.field('metrics'))
    r.headUrl = proc.field('head api').replace(/\/v1$/, '')
    r.headPort = portOf(r.headUrl)
  }

  async startNode(name: string): Promise<void> {
    const n = this.node(name)
    this.refuseAfterStop()
    if (n.proc?.running === true) throw new GarageProcessError(`node ${name} is running`)
    const own = this.region(n.region)
    // Its own region's bootstrap only, as a gamer's node is set up (README): its head is all it knows.
    const bootstrap = n.isolated
      ? [`/ip4/${this.proxy!.host}/tcp/${this.proxy!.port}/p2p/${own.headPeerId}`]
      : [own.addr]
    const args = [
      'node',
      ...['--authority', this.authority, '--region', n.region],
      ...bootstrap.flatMap((b) => ['--bootstrap', b]),
      // Inside the namespace, loopback only: like a gamer behind NAT, it dials out and opens nothing.
      ...['--listen', '/ip4/127.0.0.1/tcp/0', '--allow-private', '--threads', '1'],
      ...['--max-tokens-per-second', String(this.options.maxTokensPerSecond)],
      ...['--drain-grace', '5s', '--data-dir', n.dir],
    ]
    const setup = this.options.nodeSetup?.(name) ?? {}
    if (setup.hostPolicies !== true) args.push('--no-host-policies')
    args.push(...(setup.args ?? []))
    const argv = [process.execPath, garageBin, ...args]
    const onStderr = (line: string): void => {
      if (line.includes('"msg":"joined the region"')) this.options.onNodeJoined?.(name, performance.now())
    }
    const proc = new GarageProcess(
      `node ${name}`,
      n.isolated ? this.netns!.exec(argv) : argv,
      this.env({
        ...daemonEnv(),
        ...(this.options.nodeDebug != null ? { DEBUG: this.options.nodeDebug } : {}),
        ...setup.env,
      }),
      onStderr,
    )
    this.started.push(proc)
    n.proc = proc
    await proc.line(/^\s*engine\s/)
  }

  async startFederation(f: ClusterFederation = this.federation): Promise<void> {
    this.refuseAfterStop()
    if (f.proc?.running === true) throw new GarageProcessError('the federation is running')
    const args = [
      'federation',
      '--authority',
      this.authority,
      ...[...this.regions.values()].flatMap((r) => ['--bootstrap', r.addr]),
      ...['--listen', '/ip4/127.0.0.1/tcp/0', '--allow-private'],
      ...['--http', `127.0.0.1:${f.port}`, '--data-dir', f.dir],
      ...(this.options.database != null ? ['--database', this.options.database] : []),
    ]
    const name = f === this.federation ? 'federation' : `federation ${this.gateways.indexOf(f) + 1}`
    const proc = new GarageProcess(name, [process.execPath, garageBin, ...args], this.env())
    this.started.push(proc)
    f.proc = proc
    await proc.line(/admin/)
    f.url = proc.field('api').replace(/\/v1$/, '')
    f.port = portOf(f.url)
    if (f.adminToken === '') f.adminToken = (await readFile(join(f.dir, 'admin.token'), 'utf8')).trim()
  }

  /** Writes each process's stderr (JSON logs, times in performance.now() ms) to `dir`, one file per start. */
  async writeLogs(dir: string): Promise<void> {
    await rm(dir, { recursive: true, force: true })
    await mkdir(dir, { recursive: true })
    await Promise.all(
      this.started.map((p, i) =>
        writeFile(
          join(dir, `${String(i).padStart(2, '0')}-${p.name.replace(/\s+/g, '-')}.log`),
          `${p.log.join('\n')}\n`,
        ),
      ),
    )
  }

  /** SIGKILL: the process dies at once, with whatever it held in memory. */
  async kill(proc: GarageProcess | null): Promise<void> {
    if (proc == null || !proc.running) return
    proc.child.kill('SIGKILL')
    await proc.exited
  }

  /** Live processes that outlived a killed one: its engine, found by the node's data dir in its environment. */
  orphansOf(node: string): Promise<LeftoverProcess[]> {
    return markedProcesses(this.options.runId, this.node(node).dir)
  }

  /** Stops everything (SIGTERM, then SIGKILL), removes the namespace and the files, and says what was left. */
  stop(): Promise<CleanupReport> {
    this.stopped ??= this.teardown()
    return this.stopped
  }

  get isStopped(): boolean {
    return this.stopped != null
  }

  /** A fault episode still running when the suite gives up must not start processes after cleanup. */
  private refuseAfterStop(): void {
    if (this.stopped != null) throw new GarageProcessError('the cluster is stopped')
  }

  private async teardown(): Promise<CleanupReport> {
    const forced: string[] = []
    const stopAll = async (procs: Array<GarageProcess | null>): Promise<void> => {
      await Promise.all(
        procs.map(async (p) => {
          if (p != null && (await p.stop('SIGTERM')) === 'killed') forced.push(p.name)
        }),
      )
    }
    // The gateway first (no new requests), nodes next (they leave their heads), heads last.
    await stopAll(this.gateways.map((f) => f.proc))
    await stopAll([...this.nodes.values()].map((n) => n.proc))
    await stopAll([...this.regions.values()].map((r) => r.proc))
    await this.proxy?.close()
    const running = this.started.filter((p) => p.running).map((p) => `${p.name} (pid ${p.pid})`)
    const leftovers = await markedProcesses(this.options.runId)
    for (const l of leftovers) {
      try {
        process.kill(l.pid, 'SIGKILL')
      } catch {
        // already gone
      }
    }
    const netns = this.netns
    netns?.destroy()
    const namespaces = netns != null ? listNamespaces().filter((n) => n === netns.ns) : []
    const links = netns != null && linkExists(netns.hostVeth) ? [netns.hostVeth] : []
    await rm(this.options.root, { recursive: true, force: true })
    const rootLeft = await readdir(this.options.root).then(
      () => true,
      () => false,
    )
    return { forced, running, leftovers, namespaces, links, rootLeft, containers: this.containers() }
  }

  /** Containers labelled with a PeerId of this cluster (the daemon labels every container it makes). */
  private containers(): string[] {
    const ids = new Set([...this.nodes.values()].map((n) => n.peerId))
    for (const r of this.regions.values()) ids.add(r.headPeerId)
    const out: string[] = []
    for (const tool of ['podman', 'docker']) {
      let listing: string
      try {
        listing = runCommand(tool, ['ps', '-a', '--format', '{{.ID}} {{.Labels}}'], 20_000)
      } catch {
        continue // no such tool, or no engine behind it: it cannot hold our containers either
      }
      for (const line of listing.split('\n')) {
        if ([...ids].some((id) => line.includes(id))) out.push(`${tool}: ${line.trim()}`)
      }
    }
    return out
  }
}
