import type { PeerId } from '@libp2p/interface'
import { describe, expect, it } from 'vitest'
import { PendingTokens } from '../../bootstrap/head/admission.ts'
import { headMetrics } from '../../bootstrap/head/metrics.ts'
import { NodeRegistry } from '../../bootstrap/head/registry.ts'
import { HeadRoute } from '../../bootstrap/head/route.ts'
import { ApiError } from '../../core/errors.ts'
import { silentLogger } from '../../core/logger.ts'
import type { KeyInfo } from '../../federation/keys.ts'
import { federationMetrics } from '../../federation/metrics.ts'
import type { RegionDirectory } from '../../federation/regions.ts'
import { type FederationCall, RegionRoute } from '../../federation/route.ts'
import { InferConnectError, type InferResponse } from '../../mesh/infer-protocol.ts'
import { proxyWithFailover } from '../../openai/proxy.ts'
import type { AnswerSink } from '../../openai/relay.ts'
import { prepareUpstreamRequest } from '../../openai/request.ts'
import { VerifiedThroughput } from '../../openai/usage.ts'
import { RegionalRouter } from '../../routing/node-router.ts'
import { FederationRouter, type RegionModelLoad } from '../../routing/region-router.ts'

/**
 * The one failover loop as the head and the federation run it, with stand-in hops instead of
 * libp2p streams: which target each attempt goes to, what the asker sees, what gets counted.
 */

const encoder = new TextEncoder()

/** What a target answers: a status with a JSON or SSE body, or a thrown error. */
type Answer = { status: number; json?: unknown; sse?: unknown[]; headers?: Array<[string, string]> } | Error

function response(answer: Exclude<Answer, Error>): InferResponse {
  const sse = answer.sse != null
  const text = sse
    ? `${answer.sse!.map((e) => `data: ${JSON.stringify(e)}\n\n`).join('')}data: [DONE]\n\n`
    : JSON.stringify(answer.json ?? {})
  return {
    status: answer.status,
    headers: [['content-type', sse ? 'text/event-stream' : 'application/json'], ...(answer.headers ?? [])],
    body: (async function* () {
      yield encoder.encode(text)
    })(),
  }
}

class Sink implements AnswerSink {
  readonly controller = new AbortController()
  readonly gone = this.controller.signal
  status = 0
  headers: Record<string, string> = {}
  text = ''
  started = false
  async head(status: number, headers: Record<string, string>): Promise<void> {
    this.started = true
    this.status = status
    this.headers = headers
  }
  async write(chunk: Uint8Array | string): Promise<void> {
    this.text += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString()
  }
  async end(last?: Uint8Array | string): Promise<void> {
    if (last != null) await this.write(last)
  }
}

const completion = {
  id: 'chatcmpl-1',
  object: 'chat.completion',
  choices: [{ index: 0, message: { role: 'assistant', content: 'hello world' }, finish_reason: 'stop' }],
  usage: { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 },
}

function call(sink: Sink, body: Record<string, unknown> = { model: 'm', max_tokens: 16 }) {
  const prepared = prepareUpstreamRequest({ messages: [], ...body }, 'chat')
  return {
    model: prepared.model,
    path: '/v1/chat/completions',
    body: encoder.encode(JSON.stringify(prepared.body)),
    prepared,
    requestId: 'req-1',
    sink,
    started: performance.now(),
  }
}

function headRig(answers: Record<string, Answer[]>) {
  const registry = new NodeRegistry()
  const router = new RegionalRouter({ random: () => 0 })
  const verified = new VerifiedThroughput()
  const pending = new PendingTokens()
  const metrics = headMetrics(registry, router, verified)
  for (const peer of Object.keys(answers)) router.upsert(peer, { model: 'm', slots: 1, state: 'serving' })
  const route = new HeadRoute(
    { region: 'eu', maxAttempts: 3, logger: silentLogger },
    { node: null, router, verified, pending, metrics },
  )
  const tried: string[] = []
  const pendingSeen: number[] = []
  route.peerOf = (target: string) => ({ kind: 'node', peer: target as unknown as PeerId })
  route.send = async (to) => {
    const target = (to as { peer: unknown }).peer as string
    tried.push(target)
    pendingSeen.push(pending.get(target))
    const answer = answers[target]!.shift()!
    if (answer instanceof Error) throw answer
    return response(answer)
  }
  return { route, router, verified, pending, metrics, tried, pendingSeen }
}

describe("the head's failover (bootstrap/head/route.ts on openai/proxy.ts)", () => {
  it('moves past an unreachable node and a 503 to one that answers; counts what it verified', async () => {
    const rig = headRig({
      A: [new InferConnectError('connection refused')],
      B: [{ status: 503, json: { error: { message: 'draining' } } }],
      C: [{ status: 200, json: completion }],
    })
    const sink = new Sink()
    await proxyWithFailover(call(sink), rig.route)
    expect(rig.tried).toHaveLength(3)
    expect(sink.status).toBe(200)
    expect(JSON.parse(sink.text)).toEqual(completion)
    const served = rig.tried[2]!
    expect(sink.headers).toMatchObject({
      'x-garage-node': served,
      'x-garage-region': 'eu',
      'x-request-id': 'req-1',
    })
    expect(rig.verified.verified(served)).toBe(3)
    for (const failed of rig.tried.slice(0, 2))
      expect(rig.router.snapshot().find((n) => n.peerId === failed)?.consecutiveFailures).toBe(1)
    expect(rig.router.inflight(served)).toBe(0)
    const retries = await rig.metrics.retries.get()
    expect(retries.values.map((v) => v.labels.reason).sort()).toEqual(['InferConnectError', 'status_503'])
  })

  it('holds the tokens an answer may produce against its node from the moment it is sent until it ends', async () => {
    const chunk = (content: string) => ({ choices: [{ index: 0, delta: { content }, finish_reason: null }] })
    const rig = headRig({
      A: [
        {
          status: 200,
          sse: [chunk('a'), chunk('b'), { choices: [], usage: { prompt_tokens: 1, completion_tokens: 2 } }],
        },
      ],
    })
    const sink = new Sink()
    const c = call(sink, { model: 'm', max_tokens: 10, stream: true })
    rig.route.answering = ((original) =>
      function (this: HeadRoute, ...args: Parameters<HeadRoute['answering']>) {
        original.apply(this, args)
        rig.pendingSeen.push(rig.pending.get('A'))
      })(rig.route.answering)
    await proxyWithFailover(c, rig.route)
    // Held at the send already (a slow link delays the first byte, not the node's tokens).
    expect(rig.pendingSeen).toEqual([10, 10])
    expect(rig.pending.get('A')).toBe(0)
    expect(rig.verified.verified('A')).toBe(2)
    // The usage chunk was the head's idea: the client did not ask for it.
    expect(sink.text).not.toContain('usage')
    expect(sink.text.endsWith('data: [DONE]\n\n')).toBe(true)
  })

  it('when every node fails, the asker gets the last reason: 429 region_overloaded, or node_unreachable', async () => {
    const busy = headRig({ A: [{ status: 429, json: {} }] })
    const e1 = await proxyWithFailover(call(new Sink()), busy.route).catch((e: unknown) => e)
    expect(e1).toBeInstanceOf(ApiError)
    expect(e1).toMatchObject({ status: 429, code: 'region_overloaded', headers: { 'retry-after': '1' } })
    const gone = headRig({ A: [new InferConnectError('refused')] })
    const e2 = await proxyWithFailover(call(new Sink()), gone.route).catch((e: unknown) => e)
    expect(e2).toMatchObject({ status: 502, code: 'node_unreachable' })
    const none = headRig({})
    const e3 = await proxyWithFailover(call(new Sink()), none.route).catch((e: unknown) => e)
    expect(e3).toMatchObject({ status: 503, code: 'no_capacity' })
  })

  it('stops trying when the asker has gone, without blaming the node', async () => {
    const rig = headRig({ A: [new InferConnectError('refused')], B: [{ status: 200, json: completion }] })
    const sink = new Sink()
    rig.route.send = async () => {
      sink.controller.abort()
      throw new InferConnectError('cancelled')
    }
    await proxyWithFailover(call(sink), rig.route)
    expect(sink.started).toBe(false)
    expect(rig.router.snapshot().every((n) => n.consecutiveFailures === 0)).toBe(true)
  })
})

function federationRig(regions: Record<string, Answer[]>) {
  const router = new FederationRouter({ random: () => 0 })
  const load: RegionModelLoad = { nodes: 1, capacityTokensPerSecond: 10, inflight: 0, slots: 1 }
  let rtt = 1
  for (const region of Object.keys(regions))
    router.update({
      region,
      head: `head-${region}`,
      reachable: true,
      rttMs: rtt++,
      models: new Map([['m', load]]),
    })
  const ledger: Array<Record<string, unknown>> = []
  const limited: Array<[string, number]> = []
  const metrics = federationMetrics({ regions: () => [] } as unknown as RegionDirectory)
  const route = new RegionRoute(
    { maxAttempts: 2, firstByteTimeoutMs: 1_000, logger: silentLogger },
    {
      node: null,
      router,
      headOf: (region) => `head-${region}`,
      ledger: { record: (entry) => void ledger.push({ ...entry }) },
      limiter: { record: (key, tokens) => void limited.push([key, tokens]) },
      metrics,
    },
  )
  const tried: string[] = []
  route.peerOf = (region: string) => region as unknown as PeerId
  route.send = async (peer) => {
    const region = peer as unknown as string
    tried.push(region)
    const answer = regions[region]!.shift()!
    if (answer instanceof Error) throw answer
    return response(answer)
  }
  return { route, router, ledger, limited, metrics, tried }
}

function federationCall(sink: Sink): FederationCall {
  return {
    ...call(sink),
    key: { id: 'key-1', name: 'acme' } as KeyInfo,
    prefer: undefined,
    labels: { model: 'm', region: 'none' },
  }
}

describe("the federation's failover (federation/route.ts on openai/proxy.ts)", () => {
  it('tries the next region after a 404 and bills the key for what the answering node served', async () => {
    const rig = federationRig({
      near: [{ status: 404, json: { error: { message: 'not served', code: 'model_not_found' } } }],
      far: [{ status: 200, json: completion, headers: [['x-garage-node', 'node-7']] }],
    })
    const sink = new Sink()
    const c = federationCall(sink)
    await proxyWithFailover(c, rig.route)
    expect(rig.tried).toEqual(['near', 'far'])
    expect(sink.status).toBe(200)
    expect(sink.headers).toMatchObject({ 'x-garage-region': 'far', 'x-garage-node': 'node-7' })
    expect(rig.ledger).toEqual([
      {
        keyId: 'key-1',
        model: 'm',
        region: 'far',
        node: 'node-7',
        requests: 1,
        promptTokens: 5,
        completionTokens: 3,
      },
    ])
    expect(rig.limited).toEqual([['key-1', 8]])
    // The key's usage is on /metrics by its name, as billed: the answered request, not the 404.
    const usage = await rig.metrics.registry.getMetricsAsJSON()
    const series = (name: string) =>
      usage.find((m) => m.name === name)?.values.map((v) => [v.labels, v.value]) ?? []
    expect(series('garage_federation_key_tokens_total')).toEqual([
      [{ key: 'acme', kind: 'prompt' }, 5],
      [{ key: 'acme', kind: 'completion' }, 3],
    ])
    expect(series('garage_federation_key_requests_total')).toEqual([[{ key: 'acme', status: '200' }, 1]])
    expect(c.labels.region).toBe('far')
    expect(rig.router.snapshot().every((r) => r.outstanding === 0)).toBe(true)
  })

  it("passes the last region's error on as the client will see it, keeping its code", async () => {
    const rig = federationRig({
      near: [new InferConnectError('no route')],
      far: [{ status: 503, json: { error: { message: 'no node serves m right now', code: 'no_capacity' } } }],
    })
    const err = await proxyWithFailover(federationCall(new Sink()), rig.route).catch((e: unknown) => e)
    expect(err).toMatchObject({
      status: 503,
      code: 'no_capacity',
      message: 'region far: no node serves m right now',
      headers: { 'retry-after': '1' },
    })
    expect(rig.ledger).toEqual([])
    const gone = federationRig({ only: [new InferConnectError('refused')] })
    const e2 = await proxyWithFailover(federationCall(new Sink()), gone.route).catch((e: unknown) => e)
    expect(e2).toMatchObject({ status: 502, code: 'region_unreachable' })
  })
})
