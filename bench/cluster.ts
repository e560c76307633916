import { type ChildProcess, spawn } from 'node:child_process'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { Agent, request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { LlamaCppEngine } from '../daemon/engines/llamacpp/engine.ts'
import { writeTinyModel } from '../daemon/engines/llamacpp/tiny-model.ts'
import { daemonEnv } from '../daemon/launch.ts'
import { ApiKeyStore } from '../federation/keys.ts'
import { openStore } from '../federation/store.ts'
import { openFederationStore } from '../federation/store-sqlite.ts'
import { initAuthority } from '../mesh/authority.ts'
import { issueRegionCertificate } from '../mesh/certificate.ts'
import { loadOrCreateIdentity } from '../mesh/identity.ts'
import { percentile, progress } from './report.ts'

/**
 * The system as deployed, for benchmarks: `garage bootstrap --policy` (head), `garage node` and,
 * when asked, `garage federation`, each its own process, as on real machines; plus an identical
 * engine the benchmark calls directly. This process is only the client.
 */

export const tinyModel = 'garage-tiny'
const garageBin = fileURLToPath(new URL('../bin/garage.js', import.meta.url))

export interface Target {
  url: string
  key: string
}

export interface BenchCluster {
  /** An engine like the node's (same model, slots, context, threads), called without any hop. */
  direct: Target
  head: Target
  /** The federation gateway (the direct path on: straight to the node its head leased it). */
  federation: Target | null
  /** A second gateway with --no-direct: every request through the head (the fallback path). */
  federationViaHead: Target | null
  /**
   * With `postgres`: the SQLite gateway and a second gateway on PostgreSQL, each with a key that has
   * (unreachable) limits, so both limiters and both ledgers are on the path.
   */
  stores: { sqlite: Target & { pid: number }; postgres: Target & { pid: number } } | null
  /** The `garage node` process: its pid, and its data dir (control.json, control.token). */
  node: { pid: number; dataDir: string }
  stop(): Promise<void>
}

/** Spawns `garage ARGS` and resolves with its stdout lines once one of them matches `ready`. */
async function spawnGarage(args: string[], ready: RegExp, children: ChildProcess[]): Promise<string[]> {
  const child = spawn(process.execPath, [garageBin, ...args], {
    // Each process started the way its launcher starts it (the node daemon with its V8 options).
    env: { ...process.env, GARAGE_LOG_LEVEL: 'warn', ...(args[0] === 'node' ? daemonEnv() : {}) },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  children.push(child)
  const lines: string[] = []
  let stderr = ''
  child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString()
  })
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`garage ${args[0]} not ready: ${stderr}`)), 60_000)
    createInterface({ input: child.stdout! }).on('line', (line) => {
      lines.push(line)
      if (ready.test(line)) {
        clearTimeout(timer)
        resolve()
      }
    })
    child.once('exit', (code) => {
      clearTimeout(timer)
      reject(new Error(`garage ${args[0]} exited with ${code}: ${stderr}`))
    })
  })
  return lines
}

function field(lines: string[], name: string): string {
  const line = lines.find((l) => l.trim().startsWith(name))
  if (line == null) throw new Error(`no ${name} in ${lines.join('\n')}`)
  return line.trim().slice(name.length).trim().split(/\s+/)[0]!
}

export async function startBenchCluster(options: {
  parallel: number
  contextLength: number
  federation: boolean
  /** Also a gateway with the direct path off, beside the first. */
  federationViaHead?: boolean
  /** postgres://...: also start a gateway on this database (see BenchCluster.stores). */
  postgres?: string
}): Promise<BenchCluster> {
  const dir = await mkdtemp(join(tmpdir(), 'garage-bench-cluster-'))
  const children: ChildProcess[] = []
  const direct = new LlamaCppEngine()
  const stop = async (): Promise<void> => {
    await direct.stop()
    // SIGTERM: the node drains and leaves, the head and the gateway stop; each exits on its own.
    await Promise.all(
      children.map(
        (c) =>
          new Promise<void>((resolve) => {
            if (c.exitCode != null || c.signalCode != null) return resolve()
            c.once('exit', () => resolve())
            c.kill('SIGTERM')
          }),
      ),
    )
    await rm(dir, { recursive: true, force: true })
  }
  try {
    progress(
      `starting a head, a node${options.federation ? ' and the federation gateway' : ''} as garage processes`,
    )
    const authority = await initAuthority(join(dir, 'authority'))
    const headDir = join(dir, 'head')
    const headId = peerIdFromPrivateKey(await loadOrCreateIdentity(headDir)).toString()
    const certPath = join(headDir, 'region.cert')
    await writeFile(
      certPath,
      await issueRegionCertificate(authority.key, {
        region: 'bench',
        head: headId,
        addrs: [],
        ttlMs: 86_400_000,
      }),
    )
    const fedDir = join(dir, 'federation')
    const fedId = peerIdFromPrivateKey(await loadOrCreateIdentity(fedDir)).toString()
    const viaHeadDir = join(dir, 'federation-via-head')
    const viaHeadId = peerIdFromPrivateKey(await loadOrCreateIdentity(viaHeadDir)).toString()
    const pgDir = join(dir, 'federation-postgres')
    const pgId = peerIdFromPrivateKey(await loadOrCreateIdentity(pgDir)).toString()
    const policy = {
      region: 'bench',
      models: [
        {
          name: tinyModel,
          engine: ['llamacpp'],
          source: { gguf: 'garage-tiny' },
          replicas: 1,
          minVramMiB: 0,
          minRamMiB: 16,
          parallel: options.parallel,
          contextLength: options.contextLength,
        },
      ],
      ray: { enabled: false },
    }
    await writeFile(join(dir, 'policy.json'), JSON.stringify(policy))
    const head = await spawnGarage(
      [
        'bootstrap',
        '--region',
        'bench',
        '--cert',
        certPath,
        '--authority',
        authority.id,
        '--listen',
        '/ip4/127.0.0.1/tcp/0',
        '--allow-private',
        '--http',
        '127.0.0.1:0',
        '--policy',
        join(dir, 'policy.json'),
        '--head-http',
        '127.0.0.1:0',
        '--federation',
        fedId,
        '--federation',
        viaHeadId,
        '--federation',
        pgId,
        '--data-dir',
        headDir,
      ],
      /head api/,
      children,
    )
    const headTarget: Target = {
      url: field(head, 'head api').replace(/\/v1$/, ''),
      key: (await readFile(join(headDir, 'head-api.token'), 'utf8')).trim(),
    }
    const bootstrapAddr = field(head, 'address')
    const nodeDir = join(dir, 'node')
    await mkdir(join(nodeDir, 'models'), { recursive: true })
    const modelPath = join(nodeDir, 'models', 'garage-tiny.gguf')
    await writeTinyModel(modelPath)
    await spawnGarage(
      [
        'node',
        '--authority',
        authority.id,
        '--bootstrap',
        bootstrapAddr,
        '--listen',
        '/ip4/127.0.0.1/tcp/0',
        '--allow-private',
        '--threads',
        '1',
        '--data-dir',
        nodeDir,
      ],
      /engine/,
      children,
    )
    let federation: Target | null = null
    let stores: BenchCluster['stores'] = null
    /** Starts a gateway on that data dir (and database) and waits until it sees the region's model. */
    const startGateway = async (dataDir: string, key: string, extra: string[] = []): Promise<string> => {
      const lines = await spawnGarage(
        [
          'federation',
          '--authority',
          authority.id,
          '--bootstrap',
          bootstrapAddr,
          '--listen',
          '/ip4/127.0.0.1/tcp/0',
          '--allow-private',
          '--http',
          '127.0.0.1:0',
          '--data-dir',
          dataDir,
          ...extra,
        ],
        /admin/,
        children,
      )
      const url = field(lines, 'api').replace(/\/v1$/, '')
      const deadline = Date.now() + 30_000
      for (;;) {
        const res = await fetch(`${url}/v1/models`, { headers: { authorization: `Bearer ${key}` } })
        const body = (await res.json()) as { data?: Array<{ id: string }> }
        if (body.data?.some((m) => m.id === tinyModel)) return url
        if (Date.now() > deadline) throw new Error('the federation never saw the region')
        await new Promise((r) => setTimeout(r, 250))
      }
    }
    // Limits no benchmark reaches: the limiter runs on every request, it never refuses one.
    const limited = { name: 'bench-limited', rpm: 100_000_000, tpm: 1_000_000_000_000, concurrency: 100_000 }
    if (options.federation) {
      const store = openFederationStore(fedDir)
      const key = (await new ApiKeyStore(store).create({ name: 'bench' })).key
      const sqliteLimited = options.postgres != null ? (await new ApiKeyStore(store).create(limited)).key : ''
      await store.close()
      federation = { url: await startGateway(fedDir, key), key }
      const sqlitePid = children.at(-1)?.pid ?? 0
      if (options.postgres != null) {
        const pgStore = await openStore({ dataDir: pgDir, database: options.postgres })
        const pgKey = (await new ApiKeyStore(pgStore).create(limited)).key
        await pgStore.close()
        progress('starting a second gateway, on PostgreSQL')
        const pgUrl = await startGateway(pgDir, pgKey, ['--database', options.postgres])
        stores = {
          sqlite: { url: federation.url, key: sqliteLimited, pid: sqlitePid },
          postgres: { url: pgUrl, key: pgKey, pid: children.at(-1)?.pid ?? 0 },
        }
      }
    }
    let federationViaHead: Target | null = null
    if (options.federationViaHead) {
      const store = openFederationStore(viaHeadDir)
      const key = (await new ApiKeyStore(store).create({ name: 'bench' })).key
      await store.close()
      federationViaHead = { url: await startGateway(viaHeadDir, key, ['--no-direct']), key }
    }
    const handle = await direct.start({
      model: modelPath,
      servedModelName: tinyModel,
      parallel: options.parallel,
      contextLength: options.contextLength,
      threads: 1,
    })
    const nodePid = children.at(1)?.pid
    if (nodePid == null) throw new Error('the node process has no pid')
    return {
      direct: { url: handle.baseUrl, key: handle.apiKey },
      head: headTarget,
      federation,
      federationViaHead,
      stores,
      node: { pid: nodePid, dataDir: nodeDir },
      stop,
    }
  } catch (err) {
    await stop()
    throw err
  }
}

const agent = new Agent({ keepAlive: true, maxSockets: 128 })

/** One POST with a keep-alive client; resolves with its latency and body, rejects on non-200. */
export function post(
  target: Target,
  path: string,
  body: Record<string, unknown>,
): Promise<{ ms: number; text: string }> {
  const payload = JSON.stringify(body)
  const started = performance.now()
  return new Promise((resolve, reject) => {
    const req = request(
      `${target.url}${path}`,
      {
        method: 'POST',
        agent,
        headers: {
          authorization: `Bearer ${target.key}`,
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(payload),
        },
      },
      (res) => {
        const chunks: Buffer[] = []
        res.on('data', (c: Buffer) => chunks.push(c))
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8')
          if (res.statusCode !== 200) reject(new Error(`${target.url} answered ${res.statusCode}: ${text}`))
          else resolve({ ms: performance.now() - started, text })
        })
        res.on('error', reject)
      },
    )
    req.on('error', reject)
    req.end(payload)
  })
}

/** `concurrency` workers each sending `perWorker` one-token completions; their latencies. */
export async function latencyBatch(
  target: Target,
  concurrency: number,
  perWorker: number,
  round: number,
): Promise<number[]> {
  const out: number[] = []
  await Promise.all(
    Array.from({ length: concurrency }, async (_, w) => {
      for (let i = 0; i < perWorker; i++) {
        const r = await post(target, '/v1/completions', {
          model: tinyModel,
          prompt: `r${round} w${w} i${i}`,
          max_tokens: 1,
          temperature: 0,
        })
        out.push(r.ms)
      }
    }),
  )
  return out
}

export function closeClient(): void {
  agent.destroy()
}

/**
 * How long every latency and throughput bench drives load before it measures: V8 compiles the
 * request path's hot functions during the first ~12k requests, and figures taken before that
 * measure the compiler (a restarted head is that cold: the benches report those figures apart).
 * `GARAGE_BENCH_WARMUP_MS` overrides it.
 */
export function warmupMs(env: NodeJS.ProcessEnv = process.env): number {
  const v = Number(env.GARAGE_BENCH_WARMUP_MS ?? 10_000)
  return Number.isFinite(v) && v >= 0 ? v : 10_000
}

/** Drives one-token requests through every target in turn, `concurrency` at once, for `ms`. */
export async function warmUp(targets: Target[], concurrency: number, ms: number): Promise<number> {
  const until = performance.now() + ms
  let requests = 0
  for (let round = 0; performance.now() < until; round++) {
    for (const t of targets) requests += (await latencyBatch(t, concurrency, 4, 1_000 + round)).length
  }
  return requests
}

/** p50 and p99 of a side's latencies, and what they add over the baseline's. */
export function addedOver(
  side: number[],
  baseline: number[],
): { p50: number; p99: number; added_p50: number; added_p99: number } {
  const round = (x: number) => Number(x.toFixed(2))
  const p50 = percentile(side, 50)
  const p99 = percentile(side, 99)
  return {
    p50: round(p50),
    p99: round(p99),
    added_p50: round(p50 - percentile(baseline, 50)),
    added_p99: round(p99 - percentile(baseline, 99)),
  }
}

/**
 * Issue 18's yardstick: Garage's added latency against twice a plain nginx chain's of as many hops,
 * plus 0.5 ms (p50) or 2 ms (p99). A ratio ≤ 1 meets it.
 */
export function nginxBudgetRatios(
  garage: { added_p50: number; added_p99: number },
  nginx: { added_p50: number; added_p99: number },
): { p50_budget_ratio: number; p99_budget_ratio: number } {
  const ratio = (added: number, allowed: number) => Number((added / Math.max(0.01, allowed)).toFixed(3))
  return {
    p50_budget_ratio: ratio(garage.added_p50, 2 * Math.max(0, nginx.added_p50) + 0.5),
    p99_budget_ratio: ratio(garage.added_p99, 2 * Math.max(0, nginx.added_p99) + 2),
  }
}

/** One long streamed completion; completion tokens per second. */
export async function streamOnce(target: Target, round: number, streamTokens = 256): Promise<number> {
  const r = await post(target, '/v1/completions', {
    model: tinyModel,
    prompt: `stream ${round}`,
    max_tokens: streamTokens,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  })
  const usage = r.text
    .split('\n')
    .filter((l) => l.startsWith('data: {'))
    .map((l) => JSON.parse(l.slice(6)) as { usage?: { completion_tokens: number } })
    .find((e) => e.usage != null)?.usage
  if (usage?.completion_tokens !== streamTokens) throw new Error('the stream did not carry every token')
  return usage.completion_tokens / (r.ms / 1000)
}
