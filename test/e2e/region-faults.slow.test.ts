import { type ChildProcess, spawn } from 'node:child_process'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromString } from '@libp2p/peer-id'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { serveInferOverMesh } from '../../daemon/infer-handler.ts'
import type { NodeDaemon } from '../../daemon/node-daemon.ts'
import { capabilityFromHardware } from '../../daemon/node-daemon.ts'
import { signCapabilityReport } from '../../mesh/capability-report.ts'
import { sendInferRequest } from '../../mesh/infer-protocol.ts'
import { requestJoin } from '../../mesh/join-protocol.ts'
import { createMeshNode } from '../../mesh/node.ts'
import { INFER_PROTOCOL } from '../../mesh/protocols.ts'
import { sendTelemetry, type TelemetryAck } from '../../mesh/telemetry-protocol.ts'
import { abandonedStreamAllowanceTokens } from '../../openai/usage.ts'
import { garageBin } from '../helpers/cli.ts'
import { dialAddr, TestMesh, waitForEvent } from '../helpers/mesh.ts'
import { startTestRegion, type TestRegion, tinyModel } from '../helpers/region.ts'

interface Outcome {
  node: string
  status: number
  firstByte: boolean
  done: boolean
  error: string | null
  tokens: number
}

/** A streamed completion through the head, with a hard timeout: a hang fails the test, never stalls it. */
async function stream(region: TestRegion, prompt: string, maxTokens: number): Promise<Outcome> {
  const res = await fetch(`${region.head.url}/v1/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${region.head.apiToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model: tinyModel,
      prompt,
      max_tokens: maxTokens,
      stream: true,
      stream_options: { include_usage: true },
    }),
    signal: AbortSignal.timeout(30_000),
  })
  const outcome: Outcome = {
    node: res.headers.get('x-garage-node') ?? '',
    status: res.status,
    firstByte: false,
    done: false,
    error: null,
    tokens: 0,
  }
  if (res.status !== 200) {
    outcome.error = await res.text()
    return outcome
  }
  const text = await new Response(res.body).text()
  outcome.firstByte = text.length > 0
  for (const event of text.split('\n\n')) {
    const data = event.replace(/^data: /, '')
    if (data === '') continue
    if (data === '[DONE]') {
      outcome.done = true
      continue
    }
    const json = JSON.parse(data) as { error?: { message: string }; usage?: { completion_tokens: number } }
    if (json.error != null) outcome.error = json.error.message
    if (json.usage != null) outcome.tokens = json.usage.completion_tokens
  }
  return outcome
}

describe('a region under faults and hostile peers', () => {
  const mesh = new TestMesh()
  let region: TestRegion
  let honest: NodeDaemon
  const children: ChildProcess[] = []
  beforeAll(async () => {
    region = await startTestRegion(mesh, 'eu-faults')
    honest = await region.addNode({ maxTokensPerSecond: 80 })
  }, 120_000)
  afterAll(async () => {
    for (const c of children) c.kill('SIGKILL')
    await mesh.cleanup()
  })

  it('a node SIGKILLed under load: unstarted requests succeed elsewhere, its streams end with an error event, it is evicted', async () => {
    // The victim is a real `garage node` process, so SIGKILL takes its whole daemon down at once.
    const dataDir = await mesh.tempDir('garage-victim-')
    const child = spawn(
      process.execPath,
      [
        garageBin,
        'node',
        '--authority',
        region.authority.id,
        '--bootstrap',
        dialAddr(region.bootstrap),
        '--listen',
        '/ip4/127.0.0.1/tcp/0',
        '--allow-private',
        '--threads',
        '1',
        '--max-tokens-per-second',
        '40',
        '--data-dir',
        dataDir,
      ],
      { env: { ...process.env, GARAGE_LOG_LEVEL: 'warn' }, stdio: ['ignore', 'pipe', 'pipe'] },
    )
    children.push(child)
    let stderr = ''
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString()
    })
    const joined = await waitForEvent<{ peerId: string }>(
      region.head.registry,
      'node:joined',
      () => true,
      60_000,
    ).catch((err: Error) => {
      throw new Error(`${err.message}; node stderr: ${stderr}`)
    })
    const victim = joined.peerId
    await region.nodeState(victim, 'serving')

    // Steady load: 8 workers, 48 streamed requests of 40 tokens (about a second each).
    const outcomes: Outcome[] = []
    let next = 0
    let killedAt = 0
    let evictedAt = 0
    const evicted = waitForEvent<{ peerId: string; reason: string }>(
      region.head.registry,
      'node:left',
      (d) => {
        if (d.peerId === victim) evictedAt = Date.now()
        return d.peerId === victim
      },
      60_000,
    )
    const workers = Array.from({ length: 8 }, async () => {
      while (next < 48) {
        const i = next++
        if (i === 16 && killedAt === 0) {
          killedAt = Date.now()
          child.kill('SIGKILL')
        }
        outcomes.push(await stream(region, `load ${i}`, 40))
      }
    })
    await Promise.all(workers)
    const left = await evicted
    const evictionMs = evictedAt - killedAt
    process.stdout.write(`victim evicted (${left.reason}) ${evictionMs} ms after SIGKILL\n`)

    expect(outcomes).toHaveLength(48)
    // Every request ended: done, or an error event after its first byte; none hung (30 s timeout).
    const interrupted = outcomes.filter((o) => o.error != null)
    for (const o of interrupted) {
      expect(o.node).toBe(victim)
      expect(o.firstByte).toBe(true)
      expect(o.done).toBe(true)
    }
    const succeeded = outcomes.filter((o) => o.error == null)
    for (const o of succeeded) {
      expect(o.status).toBe(200)
      expect(o.done).toBe(true)
      expect(o.tokens).toBe(40)
    }
    expect(succeeded.length).toBeGreaterThanOrEqual(48 - 8)
    // The eviction deadline is 7 s of silence; a dropped connection may end it sooner.
    expect(evictionMs).toBeLessThanOrEqual(7_000 + 2_000)
    expect(region.head.registry.get(victim)).toBeUndefined()
  })

  it('flags a node that reports more tokens than the head proxied for it', async () => {
    // A "node" that serves honestly (through the honest node's engine) but inflates its telemetry.
    const privateKey = await generateKeyPair('Ed25519')
    const liar = await createMeshNode({
      privateKey,
      listen: ['/ip4/127.0.0.1/tcp/0'],
      bootstrap: [dialAddr(region.bootstrap)],
      allowPrivateAddresses: true,
    })
    mesh.track(async () => {
      await liar.stop()
    })
    const head = region.bootstrap.peerId
    const report = capabilityFromHardware(liar.peerId.toString(), 'eu-faults', region.hardware, {
      daemonVersion: 'test',
    })
    const assignment = await requestJoin(liar, head, await signCapabilityReport(privateKey, report), {
      signal: AbortSignal.timeout(10_000),
    })
    expect(assignment.model).toBe(tinyModel)
    const stop = await serveInferOverMesh(liar, {
      allowedHeads: () => new Set([head.toString()]),
      engine: () => {
        const i = honest.info()
        return { baseUrl: i.engineUrl!, apiKey: i.engineKey! }
      },
    })
    mesh.track(() => stop.stop())
    let seq = 0
    const claim = (tokensTotal: number): Promise<TelemetryAck> =>
      sendTelemetry(
        liar,
        head,
        {
          v: 1,
          seq: ++seq,
          state: 'serving',
          model: tinyModel,
          tokensTotal,
          promptTokensTotal: 0,
          tokensPerSecond: 0,
          running: 0,
          waiting: 0,
          kvCacheUsage: 0,
        },
        { signal: AbortSignal.timeout(5_000) },
      )
    expect(await claim(0)).toBe('ok')
    // Heartbeats, as a real node sends them, so the head keeps it in the region.
    let claimed = 0
    const heartbeat = setInterval(() => void claim(claimed).catch(() => {}), 1_000)
    mesh.track(async () => clearInterval(heartbeat))
    await region.nodeState(liar.peerId.toString(), 'serving')
    // Traffic until the liar has served some of it.
    let served = 0
    const seen: string[] = []
    for (let i = 0; i < 60 && served < 3; i++) {
      const o = await stream(region, `liar ${i}`, 10)
      seen.push(`${o.status} ${o.node.slice(-6)} ${o.error ?? ''}`)
      if (o.node === liar.peerId.toString()) served += 1
    }
    if (served === 0) process.stdout.write(`liar never served: ${seen.slice(0, 5).join(' | ')}\n`)
    expect(served).toBeGreaterThan(0)
    const verified = region.head.verified.verified(liar.peerId.toString())
    expect(verified).toBe(served * 10)
    claimed = verified
    expect(await claim(claimed)).toBe('ok')
    expect(region.head.verified.flagged(liar.peerId.toString())).toBe(false)
    // Within what the head allows for unseen tails (one cut stream per slot at its join): not flagged.
    const joinAllowance = (assignment.engineArgs.parallel ?? 1) * abandonedStreamAllowanceTokens
    claimed = verified + joinAllowance
    expect(await claim(claimed)).toBe('ok')
    expect(region.head.verified.flagged(liar.peerId.toString())).toBe(false)
    // Past it (and past 10% and 20 tokens): flagged.
    claimed = Math.ceil((verified + joinAllowance) * 1.1) + 50
    expect(await claim(claimed)).toBe('ok')
    expect(region.head.verified.flagged(liar.peerId.toString())).toBe(true)
    const health = (await (await fetch(`${region.head.url}/health`)).json()) as { flagged: string[] }
    expect(health.flagged).toContain(liar.peerId.toString())
    expect(region.head.verified.flagged(honest.peerId!)).toBe(false)
  })

  it('a peer that is not its head cannot make a node infer; garbage frames reset the stream', async () => {
    const stranger = await createMeshNode({
      privateKey: await generateKeyPair('Ed25519'),
      listen: ['/ip4/127.0.0.1/tcp/0'],
      bootstrap: [dialAddr(region.bootstrap)],
      allowPrivateAddresses: true,
    })
    mesh.track(async () => {
      await stranger.stop()
    })
    const target = peerIdFromString(honest.peerId!)
    await stranger.dial(honest.meshNode!.getMultiaddrs()[0]!)
    const body = new TextEncoder().encode(JSON.stringify({ model: tinyModel, prompt: 'x', max_tokens: 4 }))
    const err = await sendInferRequest(
      stranger,
      target,
      { method: 'POST', path: '/v1/completions', headers: [['content-type', 'application/json']], body },
      { firstByteTimeoutMs: 5_000 },
    ).catch((e: Error) => e)
    expect(err).toBeInstanceOf(Error)

    // Garbage from the head itself (the one peer the node reads from) resets only that stream.
    const garbage = await region.bootstrap.node.dialProtocol(target, INFER_PROTOCOL)
    garbage.send(new Uint8Array([5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb]))
    const ended = await (async () => {
      try {
        for await (const _ of garbage) {
          // nothing is expected
        }
        return 'closed'
      } catch (e) {
        return (e as Error).name
      }
    })()
    expect(ended).toMatch(/Reset|Abort/)

    // The node still serves its head.
    const after = await stream(region, 'still serving', 6)
    expect(after.error).toBeNull()
    expect(after.done).toBe(true)
  })
})
