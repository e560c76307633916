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
import { initAuthority } from '../mesh/authority.ts'
import { issueRegionCertificate } from '../mesh/certificate.ts'
import { loadOrCreateIdentity } from '../mesh/identity.ts'
import { percentile, progress, table, writeResult } from './report.ts'

/**
 * What the mesh hop costs: the same requests sent straight to a node's engine and through the
 * regional head (client → head HTTP → libp2p /garage/infer/1.0.0 → node daemon → engine), side by
 * side in one run. Latency with max_tokens 1 (the engine's work is minimal), then streamed
 * throughput with long answers.
 */
const latencyConcurrencies = [1, 16]
const latencyRounds = 12
const requestsPerWorker = 8
const streamRounds = 7
const streamTokens = 256
const parallel = 16
const contextLength = 512
const tinyModel = 'garage-tiny'
const garageBin = fileURLToPath(new URL('../bin/garage.js', import.meta.url))

interface Target {
  url: string
  key: string
}

const agent = new Agent({ keepAlive: true, maxSockets: 64 })

function post(
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

/** `concurrency` workers each sending `requestsPerWorker` one-token completions; their latencies. */
async function latencyBatch(target: Target, concurrency: number, round: number): Promise<number[]> {
  const out: number[] = []
  await Promise.all(
    Array.from({ length: concurrency }, async (_, w) => {
      for (let i = 0; i < requestsPerWorker; i++) {
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

/** One long streamed completion; completion tokens per second. */
async function streamOnce(target: Target, round: number): Promise<number> {
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

function median(xs: number[]): number {
  return percentile(xs, 50)
}

/** Spawns `garage ARGS` and resolves with its stdout lines once one of them matches `ready`. */
async function spawnGarage(args: string[], ready: RegExp, children: ChildProcess[]): Promise<string[]> {
  const child = spawn(process.execPath, [garageBin, ...args], {
    env: { ...process.env, GARAGE_LOG_LEVEL: 'warn' },
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

export async function run(): Promise<Record<string, unknown>> {
  const dir = await mkdtemp(join(tmpdir(), 'garage-bench-proxy-'))
  const children: ChildProcess[] = []
  const direct = new LlamaCppEngine()
  try {
    // The head and the node run as the real commands, each in its own process, as on real machines;
    // this process is only the client.
    progress('starting a bootstrap node with its regional head, and one node, as garage processes')
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
          parallel,
          contextLength,
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
        '--data-dir',
        headDir,
      ],
      /head api/,
      children,
    )
    const headUrl = field(head, 'head api').replace(/\/v1$/, '')
    const headToken = (await readFile(join(headDir, 'head-api.token'), 'utf8')).trim()
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
        field(head, 'address'),
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
    // "Direct" is an identical engine (same model, slots, context, threads) the client calls itself.
    const handle = await direct.start({
      model: modelPath,
      servedModelName: tinyModel,
      parallel,
      contextLength,
      threads: 1,
    })
    const directTarget: Target = { url: handle.baseUrl, key: handle.apiKey }
    const viaHead: Target = { url: headUrl, key: headToken }
    // Warm both paths: connections, the engine's buffers, the router's view of the node.
    await latencyBatch(directTarget, 4, -1)
    await latencyBatch(viaHead, 4, -1)

    const rows: Array<Record<string, number>> = []
    for (const c of latencyConcurrencies) {
      const d: number[] = []
      const h: number[] = []
      for (let r = 0; r < latencyRounds; r++) {
        // alternate the order so drift on a noisy machine hits both sides alike
        if (r % 2 === 0) {
          d.push(...(await latencyBatch(directTarget, c, r)))
          h.push(...(await latencyBatch(viaHead, c, r)))
        } else {
          h.push(...(await latencyBatch(viaHead, c, r)))
          d.push(...(await latencyBatch(directTarget, c, r)))
        }
      }
      const row = {
        concurrency: c,
        requests: d.length,
        direct_p50_ms: Number(percentile(d, 50).toFixed(2)),
        direct_p99_ms: Number(percentile(d, 99).toFixed(2)),
        via_head_p50_ms: Number(percentile(h, 50).toFixed(2)),
        via_head_p99_ms: Number(percentile(h, 99).toFixed(2)),
        added_p50_ms: 0,
        added_p99_ms: 0,
      }
      row.added_p50_ms = Number((row.via_head_p50_ms - row.direct_p50_ms).toFixed(2))
      row.added_p99_ms = Number((row.via_head_p99_ms - row.direct_p99_ms).toFixed(2))
      rows.push(row)
      progress(`concurrency ${c}: added p50 ${row.added_p50_ms} ms, p99 ${row.added_p99_ms} ms`)
    }

    const ratios: number[] = []
    const directTps: number[] = []
    const headTps: number[] = []
    for (let r = 0; r < streamRounds; r++) {
      const order = r % 2 === 0 ? [directTarget, viaHead] : [viaHead, directTarget]
      const got = new Map<Target, number>()
      for (const t of order) got.set(t, await streamOnce(t, r))
      directTps.push(got.get(directTarget)!)
      headTps.push(got.get(viaHead)!)
      ratios.push(got.get(viaHead)! / got.get(directTarget)!)
      progress(`stream round ${r + 1}/${streamRounds}: ratio ${ratios.at(-1)!.toFixed(3)}`)
    }
    const c16 = rows.find((r) => r.concurrency === 16)!
    const streamRatio = Number(median(ratios).toFixed(3))
    const goalMet = c16.added_p50_ms! <= 1 && c16.added_p99_ms! <= 5 && streamRatio >= 0.95
    const result = {
      latency: rows,
      stream: {
        max_tokens: streamTokens,
        direct_tokens_per_s: Math.round(median(directTps)),
        via_head_tokens_per_s: Math.round(median(headTps)),
      },
      stream_tokens_per_s_ratio: streamRatio,
      goal: {
        added_p50_ms: '<= 1 at concurrency 16',
        added_p99_ms: '<= 5 at concurrency 16',
        stream_tokens_per_s_ratio: '>= 0.95',
      },
      goal_met: goalMet,
    }
    const path = await writeResult('mesh-proxy', result)
    process.stdout.write(
      `\nmesh-proxy: one-token completions straight to the engine vs through head and node\n${table([
        ...rows.flatMap(
          (r) =>
            [
              [`c=${r.concurrency} direct_p50_ms / p99`, `${r.direct_p50_ms} / ${r.direct_p99_ms}`, ''],
              [`c=${r.concurrency} via_head_p50_ms / p99`, `${r.via_head_p50_ms} / ${r.via_head_p99_ms}`, ''],
              [
                `c=${r.concurrency} added_p50_ms / p99`,
                `${r.added_p50_ms} / ${r.added_p99_ms}`,
                r.concurrency === 16 ? '<= 1 / <= 5' : '',
              ],
            ] as Array<[string, string, string]>,
        ),
        ['stream_tokens_per_s_ratio', String(streamRatio), '>= 0.95'],
      ])}\n${goalMet ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    agent.destroy()
    await direct.stop()
    // SIGTERM: the node drains and leaves, the head stops; both exit on their own.
    await Promise.all(
      children.map(
        (c) =>
          new Promise<void>((resolve) => {
            if (c.exitCode != null) return resolve()
            c.once('exit', () => resolve())
            c.kill('SIGTERM')
          }),
      ),
    )
    await rm(dir, { recursive: true, force: true })
  }
}
