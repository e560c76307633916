/**
 * The real head's costs, measured on the real stack: a head in its own process (head-child.ts) and
 * up to a few hundred real mesh nodes on loopback TCP that connect, join with signed reports, send
 * telemetry, look up a DHT key and fetch GET /v1/models as a federation gateway does. CPU is the
 * head process's own (user + system), so the nodes' side does not count; the machine's other load
 * slows the wall clock, not these figures (much).
 */
import { type ChildProcess, fork } from 'node:child_process'
import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PeerId, PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey, peerIdFromString } from '@libp2p/peer-id'
import { multiaddr } from '@multiformats/multiaddr'
import { parseRegionModels } from '../../federation/regions.ts'
import { signCapabilityReport } from '../../mesh/capability-report.ts'
import { regionKey } from '../../mesh/dht-keys.ts'
import { sendInferRequest } from '../../mesh/infer-protocol.ts'
import { requestJoin } from '../../mesh/join-protocol.ts'
import { requestLeases } from '../../mesh/lease-protocol.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { sendTelemetry } from '../../mesh/telemetry-protocol.ts'
import type { HeadCommand, HeadUsage } from './head-child.ts'
import { benchModel, benchRegion, benchReport, benchTelemetry } from './region-fixture.ts'

export class HeadProcessError extends Error {
  override name = 'HeadProcessError'
}

/** The forked head and a request/answer channel to it. */
class HeadProcess {
  readonly child: ChildProcess
  readonly peerId: PeerId
  readonly addr: string
  #next = 1
  readonly #waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>()

  private constructor(child: ChildProcess, peerId: string, addr: string) {
    this.child = child
    this.peerId = peerIdFromString(peerId)
    this.addr = addr.includes('/p2p/') ? addr : `${addr}/p2p/${peerId}`
    child.on('message', (m: { id: number; ok: boolean; value?: unknown; error?: string }) => {
      const w = this.#waiting.get(m.id)
      if (w == null) return
      this.#waiting.delete(m.id)
      if (m.ok) w.resolve(m.value)
      else w.reject(new HeadProcessError(m.error ?? 'head command failed'))
    })
    child.on('exit', () => {
      for (const w of this.#waiting.values()) w.reject(new HeadProcessError('head process exited'))
      this.#waiting.clear()
    })
  }

  static async start(): Promise<HeadProcess> {
    const child = fork(new URL('./head-child.ts', import.meta.url).pathname, [], {
      execArgv: ['--expose-gc', '--disable-warning=ExperimentalWarning'],
      stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
    })
    const ready = await new Promise<{ peerId: string; addr: string }>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new HeadProcessError('head process did not start in 30 s')),
        30_000,
      )
      child.once('message', (m: { value: { peerId: string; addr: string } }) => {
        clearTimeout(timer)
        resolve(m.value)
      })
      child.once('exit', (code) => {
        clearTimeout(timer)
        reject(new HeadProcessError(`head process exited with ${code} before it was ready`))
      })
    }).catch((err: unknown) => {
      child.kill()
      throw err
    })
    return new HeadProcess(child, ready.peerId, ready.addr)
  }

  call<T>(cmd: HeadCommand['cmd'], args?: HeadCommand['args']): Promise<T> {
    const id = this.#next++
    return new Promise<T>((resolve, reject) => {
      this.#waiting.set(id, { resolve: resolve as (v: unknown) => void, reject })
      this.child.send({ id, cmd, ...(args != null ? { args } : {}) } satisfies HeadCommand)
    })
  }

  usage(gc = false): Promise<HeadUsage> {
    return this.call<HeadUsage>('usage', { gc })
  }

  async stop(): Promise<void> {
    if (this.child.exitCode != null) return
    const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()))
    await Promise.race([
      this.call('stop').catch(() => {}),
      new Promise((resolve) => setTimeout(resolve, 10_000)),
    ])
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 10_000)
    await exited
    clearTimeout(timer)
  }
}

export interface HeadLoad {
  nodes: number
  /** Head CPU per node connecting: TCP accept, noise, yamux, identify, kad and ping bookkeeping. */
  connectCpuMsPerNode: number
  /** Head CPU per join: the stream, the signed report's verification, the assignment. */
  joinCpuMsPerJoin: number
  telemetry: {
    reports: number
    /** Head CPU per report: a new stream, multistream-select, the CBOR report, registry and router update, the answer. */
    cpuUsPerReport: number
    /** Bytes the head read and wrote per report (syscalls: TCP payload, noise and yamux framing). */
    bytesInPerReport: number | null
    bytesOutPerReport: number | null
  }
  /**
   * The direct path's cost at the head: a gateway's lease report (every 250 ms) over
   * /garage/lease/1.0.0, empty, and with one done record and one in-flight entry per node.
   */
  direct: {
    reports: number
    cpuUsPerEmptyReport: number
    cpuUsPerRecord: number
    recordsPerReport: number
    leases: number
  }
  /** Head memory per joined node, with its connection: RSS, V8 heap and memory outside the heap. */
  memoryKiBPerNode: { rss: number; heap: number; external: number }
  /** Head CPU per GET_PROVIDERS it answered as a DHT server. */
  dht: { requests: number; cpuUsPerRequest: number }
  /** GET /v1/models over /garage/infer/1.0.0, as the federation asks it every 3 s, by router pool size. */
  refresh: Array<{
    routerNodes: number
    requests: number
    headCpuMsPerRequest: number
    gatewayCpuMsPerRequest: number
    responseBytes: number
  }>
  /** Head router memory per pooled node (the synthetic pool of the refresh runs). */
  routerBytesPerNode: number | null
  wallMs: number
}

async function meshNode(privateKey: PrivateKey, bootstrap: string): Promise<MeshNode> {
  return createMeshNode({
    privateKey,
    listen: [],
    bootstrap: [bootstrap],
    allowPrivateAddresses: true,
    relayReservation: false,
  })
}

/** Polls the head until `test` holds; the head reports its own state, so nothing is guessed. */
async function headUntil(
  head: HeadProcess,
  test: (u: HeadUsage) => boolean,
  what: string,
  timeoutMs: number,
): Promise<HeadUsage> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    const u = await head.usage()
    if (test(u)) return u
    if (performance.now() > deadline) throw new HeadProcessError(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

/** Head CPU spent beyond its idle background during a phase, in µs. */
function busyUs(before: HeadUsage, after: HeadUsage, wallMs: number, idleUsPerMs: number): number {
  return Math.max(0, after.cpuUs - before.cpuUs - idleUsPerMs * wallMs)
}

/** Below this share of a core over a window the head counts as idle. */
const quietCpuShare = 0.03
const quietWindowMs = 250

/**
 * Resolves once the head is idle: work a phase set off (identify, DHT self-queries of new peers)
 * goes on after the phase's last answer and belongs to it. Returns the idle rate, µs per ms.
 */
async function quiet(
  head: HeadProcess,
  timeoutMs = 15_000,
): Promise<{ usage: HeadUsage; idleUsPerMs: number }> {
  const deadline = performance.now() + timeoutMs
  let a = await head.usage()
  let at = performance.now()
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, quietWindowMs))
    const b = await head.usage()
    const now = performance.now()
    const rate = (b.cpuUs - a.cpuUs) / (now - at)
    if (rate < quietCpuShare * 1000 || now > deadline)
      return { usage: b, idleUsPerMs: Math.min(rate, quietCpuShare * 1000) }
    a = b
    at = now
  }
}

/** Runs `task` for every item with at most `limit` running at once. */
async function eachLimited<T>(items: T[], limit: number, task: (item: T) => Promise<void>): Promise<void> {
  let next = 0
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) await task(items[next++]!)
    }),
  )
}

export async function measureHeadLoad(
  options: {
    nodes?: number
    reportsPerNode?: number
    /** Telemetry reports per node before the measured ones (the head's code compiled). */
    warmReportsPerNode?: number
    /** Lease reports per measured phase. */
    directReports?: number
    lookupsPerNode?: number
    refreshPools?: number[]
    progress?: (text: string) => void
  } = {},
): Promise<HeadLoad> {
  const started = performance.now()
  const count = options.nodes ?? 100
  const reportsPerNode = options.reportsPerNode ?? 10
  const lookupsPerNode = options.lookupsPerNode ?? 5
  const pools = options.refreshPools ?? [0, 1_000, 10_000, 100_000]
  const say = options.progress ?? (() => {})
  const head = await HeadProcess.start()
  const nodes: MeshNode[] = []
  try {
    const keys = await Promise.all(Array.from({ length: count }, () => generateKeyPair('Ed25519')))
    const envelopesFor = (): Promise<Uint8Array[]> =>
      Promise.all(
        keys.map((k) => signCapabilityReport(k, benchReport(peerIdFromPrivateKey(k).toString(), Date.now()))),
      )
    const base = await head.usage(true)
    let idle = (await quiet(head)).idleUsPerMs

    // Each phase: from a quiet head, through the phase, until the head is quiet again.
    const phase = async (
      task: () => Promise<void>,
    ): Promise<{ us: number; before: HeadUsage; after: HeadUsage }> => {
      const before = await head.usage()
      const t = performance.now()
      await task()
      const settled = await quiet(head)
      const us = busyUs(before, settled.usage, performance.now() - t, idle)
      idle = settled.idleUsPerMs
      return { us, before, after: settled.usage }
    }

    say(`head: ${count} nodes connecting`)
    const connect = await phase(async () => {
      for (let i = 0; i < count; i += 10) {
        nodes.push(...(await Promise.all(keys.slice(i, i + 10).map((k) => meshNode(k, head.addr)))))
      }
      // createMeshNode dials its bootstrap list in the background, once: on a loaded machine a dial
      // can time out, so make sure of each connection (dial() returns the open one if there is one).
      const addr = multiaddr(head.addr)
      await eachLimited(nodes, 16, async (n) => {
        await n.dial(addr, { signal: AbortSignal.timeout(60_000) })
      })
      await headUntil(head, (u) => u.connections >= count, `${count} connections`, 60_000)
    })

    say('head: joins')
    const envelopes = await envelopesFor()
    const join = await phase(() =>
      eachLimited(
        nodes.map((n, i) => [n, envelopes[i]!] as const),
        32,
        async ([n, envelope]) => {
          await requestJoin(n, head.peerId, envelope, { signal: AbortSignal.timeout(30_000) })
        },
      ),
    )

    // Warm: the head's telemetry path compiled (a head that has run a while), then measured.
    const warmReports = options.warmReportsPerNode ?? 20
    say(`head: ${count * warmReports} telemetry reports to warm up, then ${count * reportsPerNode} measured`)
    const sendReports = (from: number, n: number) =>
      Promise.all(
        nodes.map(async (node) => {
          for (let seq = from; seq < from + n; seq++) {
            // Honest nodes: they claim no tokens the head has not seen (a liar is flagged and leased nothing).
            const report = { ...benchTelemetry(seq), tokensTotal: 0, promptTokensTotal: 0 }
            await sendTelemetry(node, head.peerId, report, { signal: AbortSignal.timeout(30_000) })
          }
        }),
      )
    await sendReports(1, warmReports)
    await quiet(head)
    const reports = count * reportsPerNode
    const telemetry = await phase(async () => {
      await sendReports(1 + warmReports, reportsPerNode)
    })
    const mem = await head.usage(true)

    say('head: direct-path lease reports from a gateway')
    const holder = await meshNode(await generateKeyPair('Ed25519'), head.addr)
    nodes.push(holder)
    await holder.dial(multiaddr(head.addr), { signal: AbortSignal.timeout(60_000) })
    await head.call('allowFederation', { peerId: holder.peerId.toString() })
    const grant = await requestLeases(holder, head.peerId, { models: [benchModel], done: [], inflight: [] })
    const leased = grant.leases.map((l) => l.node)
    const report = (full: boolean) =>
      requestLeases(holder, head.peerId, {
        models: [],
        done: full
          ? leased.map((node) => ({ node, ok: true, completionTokens: 300, decodeMs: 10_000, unseen: 0 }))
          : [],
        inflight: full ? leased.map((node) => ({ node, requests: 1, budget: 512 })) : [],
      })
    const directReports = options.directReports ?? 200
    for (let i = 0; i < 100; i++) await report(i % 2 === 0)
    await quiet(head)
    const empty = await phase(async () => {
      for (let i = 0; i < directReports; i++) await report(false)
    })
    const full = await phase(async () => {
      for (let i = 0; i < directReports; i++) await report(true)
    })
    const records = 2 * leased.length
    const direct = {
      reports: directReports,
      cpuUsPerEmptyReport: empty.us / directReports,
      cpuUsPerRecord: records > 0 ? Math.max(0, full.us - empty.us) / directReports / records : Number.NaN,
      recordsPerReport: records,
      leases: leased.length,
    }

    say(`head: ${count * lookupsPerNode} DHT lookups answered by the head`)
    const cid = await regionKey(benchRegion)
    await head.call('provide', { cid: cid.toString() })
    let requests = 0
    const lookups = await phase(async () => {
      await Promise.all(
        nodes.map(async (n) => {
          for (let i = 0; i < lookupsPerNode; i++) {
            for await (const e of n.services.dht.findProviders(cid, {
              signal: AbortSignal.timeout(30_000),
            })) {
              if (e.name === 'SEND_QUERY' && e.to.equals(head.peerId)) requests++
            }
          }
        }),
      )
    })
    await Promise.allSettled(nodes.splice(0).map((n) => n.stop()))

    say('head: GET /v1/models as a federation gateway, by pool size')
    const gateway = await meshNode(await generateKeyPair('Ed25519'), head.addr)
    nodes.push(gateway)
    await gateway.dial(multiaddr(head.addr), { signal: AbortSignal.timeout(60_000) })
    await head.call('allowFederation', { peerId: gateway.peerId.toString() })
    const refresh: HeadLoad['refresh'] = []
    let routerBytesPerNode: number | null = null
    const ask = async (): Promise<number> => {
      const response = await sendInferRequest(
        gateway,
        head.peerId,
        { method: 'GET', path: '/v1/models', headers: [] },
        { signal: AbortSignal.timeout(60_000) },
      )
      const chunks: Uint8Array[] = []
      for await (const chunk of response.body) chunks.push(chunk)
      const body = Buffer.concat(chunks)
      parseRegionModels(JSON.parse(body.toString('utf8')), benchRegion)
      return body.byteLength
    }
    for (const pool of pools) {
      const before = await head.usage(true)
      await head.call('populate', { count: pool })
      const after = await head.usage(true)
      if (pool > 0 && after.routerNodes > before.routerNodes) {
        routerBytesPerNode = Math.round(
          (after.heapUsedBytes - before.heapUsedBytes) / (after.routerNodes - before.routerNodes),
        )
      }
      await ask()
      const n = pool >= 100_000 ? 5 : pool >= 10_000 ? 10 : 40
      const { usage: r0, idleUsPerMs } = await quiet(head)
      const g0 = process.cpuUsage()
      const w = performance.now()
      let bytes = 0
      for (let i = 0; i < n; i++) bytes = await ask()
      const g1 = process.cpuUsage(g0)
      const r1 = await head.usage()
      refresh.push({
        routerNodes: after.routerNodes,
        requests: n,
        headCpuMsPerRequest: busyUs(r0, r1, performance.now() - w, idleUsPerMs) / n / 1000,
        gatewayCpuMsPerRequest: (g1.user + g1.system) / n / 1000,
        responseBytes: bytes,
      })
    }

    const t0 = telemetry.before.io
    const t1 = telemetry.after.io
    return {
      nodes: count,
      connectCpuMsPerNode: connect.us / count / 1000,
      joinCpuMsPerJoin: join.us / count / 1000,
      telemetry: {
        reports,
        cpuUsPerReport: telemetry.us / reports,
        bytesInPerReport: t0 == null || t1 == null ? null : (t1.readBytes - t0.readBytes) / reports,
        bytesOutPerReport: t0 == null || t1 == null ? null : (t1.writtenBytes - t0.writtenBytes) / reports,
      },
      direct,
      memoryKiBPerNode: {
        rss: (mem.rssBytes - base.rssBytes) / count / 1024,
        heap: (mem.heapUsedBytes - base.heapUsedBytes) / count / 1024,
        external: (mem.externalBytes - base.externalBytes) / count / 1024,
      },
      dht: { requests, cpuUsPerRequest: requests > 0 ? lookups.us / requests : Number.NaN },
      refresh,
      routerBytesPerNode,
      wallMs: Math.round(performance.now() - started),
    }
  } finally {
    await Promise.allSettled(nodes.map((n) => n.stop()))
    await head.stop()
  }
}
