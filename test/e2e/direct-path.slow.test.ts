import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromString } from '@libp2p/peer-id'
import { multiaddr } from '@multiformats/multiaddr'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Devnet, devnetModelName as model, startDevnet } from '../../cli/commands/devnet.ts'
import { InferRemoteError, sendInferRequest } from '../../mesh/infer-protocol.ts'
import { type Lease, requestLeases } from '../../mesh/lease-protocol.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { ticketHeader } from '../../mesh/ticket.ts'
import { directCutStreamAllowanceTokens } from '../../openai/usage.ts'

/**
 * The direct path on a devnet (one region, two nodes): the federation sends straight to the nodes
 * the head leased it, with the head's tickets, and reports back; everything the head path does
 * holds, and a node serves nobody without a valid ticket.
 */

async function until(what: string, ok: () => boolean | Promise<boolean>, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 25))
  }
}

describe('the direct path: federation → node with the head as control plane', () => {
  let dir: string
  let devnet: Devnet
  let openai: OpenAI
  const totals = async () => {
    const usage = await devnet.federation.ledger.usageByKey({ keyId: await keyId() })
    return {
      requests: usage.reduce((n, u) => n + u.requests, 0),
      completion: usage.reduce((n, u) => n + u.completionTokens, 0),
    }
  }
  const keyId = async () =>
    (await devnet.federation.keys.list()).find((k) => k.name === 'devnet' && k.revokedAt == null)!.id
  const credits = async (node: string) =>
    (await devnet.federation.ledger.creditsByNode())
      .filter((c) => c.node === node)
      .reduce((n, c) => n + c.completionTokens, 0)

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-direct-'))
    devnet = await startDevnet({ dataDir: dir, regions: 1, nodes: 2, port: 0 })
    openai = new OpenAI({
      baseURL: `${devnet.info.federation.url}/v1`,
      apiKey: devnet.info.federation.apiKey,
      maxRetries: 0,
    })
    // The first request asks the head for leases; once they are in, requests go straight.
    await openai.completions.create({ model, prompt: 'warm', max_tokens: 1 })
    await until('leases on both nodes', () => (devnet.federation.direct?.view()[0]?.leases ?? 0) === 2)
  }, 120_000)
  afterAll(async () => {
    await devnet?.stop()
    if (dir != null) await rm(dir, { recursive: true, force: true })
  })

  it('serves streamed and whole answers straight from the nodes; ledger, credits and the head agree', async () => {
    const before = await totals()
    const creditsBefore = new Map<string, number>()
    for (const n of devnet.info.nodes) creditsBefore.set(n.peerId, await credits(n.peerId))
    const verifiedBefore = new Map(
      devnet.info.nodes.map((n) => [n.peerId, devnet.heads[0]!.verified.verified(n.peerId)]),
    )
    const received = new Map<string, number>()
    const paths: string[] = []
    let tokens = 0
    // Two nodes of two slots each: leases of twice that (running and waiting) take all 8 at once.
    await Promise.all(
      Array.from({ length: 8 }, async (_, i) => {
        if (i % 2 === 0) {
          const { data, response } = await openai.chat.completions
            .create({ model, messages: [{ role: 'user', content: `hi ${i}` }], max_tokens: 12 + i })
            .withResponse()
          paths.push(response.headers.get('x-garage-path') ?? '')
          const node = response.headers.get('x-garage-node')!
          received.set(node, (received.get(node) ?? 0) + data.usage!.completion_tokens)
          tokens += data.usage!.completion_tokens
          expect(data.choices[0]!.message.content).toBeTypeOf('string')
        } else {
          const { data: stream, response } = await openai.completions
            .create({
              model,
              prompt: `stream ${i}`,
              max_tokens: 20,
              stream: true,
              stream_options: { include_usage: true },
            })
            .withResponse()
          paths.push(response.headers.get('x-garage-path') ?? '')
          const node = response.headers.get('x-garage-node')!
          let usage = 0
          let text = ''
          for await (const chunk of stream) {
            text += chunk.choices[0]?.text ?? ''
            if (chunk.usage != null) usage = chunk.usage.completion_tokens
          }
          expect(usage).toBe(20)
          expect(text.length).toBeGreaterThan(0)
          received.set(node, (received.get(node) ?? 0) + usage)
          tokens += usage
        }
      }),
    )
    expect(paths, `paths: ${paths.join(',')}`).toEqual(Array(8).fill('direct'))
    expect(received.size).toBe(2)
    const after = await totals()
    expect(after.requests - before.requests).toBe(8)
    expect(after.completion - before.completion).toBe(tokens)
    // The head learns what its nodes served from the gateway's reports: exactly what was billed.
    await devnet.federation.direct!.flush()
    const head = devnet.heads[0]!
    for (const [node, got] of received) {
      expect((await credits(node)) - creditsBefore.get(node)!).toBe(got)
      expect(head.verified.verified(node) - verifiedBefore.get(node)!).toBe(got)
    }
    // And the nodes' own counts, checked by the head once the reports covering them are in: no flag.
    await until('a telemetry check after the load', () =>
      devnet.info.nodes.every(
        (n) => (head.verified.snapshot().find((s) => s.peer === n.peerId)?.reported ?? 0) > 0,
      ),
    )
    for (const n of devnet.info.nodes) expect(head.verified.flagged(n.peerId), n.peerId).toBe(false)
  })

  it('a cancelled stream stops its node, is billed for what arrived, and flags nobody', async () => {
    // The integrity checks the last test's answers were sampled for run in the background: done
    // first, so they do not slow the reset's way to the node on this 2-core machine.
    await devnet.federation.direct!.flush()
    await devnet.heads[0]!.integrity?.idle()
    const before = await totals()
    const abort = new AbortController()
    const { data: stream, response } = await openai.chat.completions
      .create(
        { model, messages: [{ role: 'user', content: 'a long story' }], max_tokens: 2000, stream: true },
        { signal: abort.signal },
      )
      .withResponse()
    expect(response.headers.get('x-garage-path')).toBe('direct')
    const node = devnet.info.nodes.find((n) => n.peerId === response.headers.get('x-garage-node'))!
    let chunks = 0
    await (async () => {
      for await (const _ of stream) if (++chunks === 3) abort.abort()
    })().catch(() => {})
    // The reset reaches the node, which stops its engine's sequence.
    await until('the engine to stop', async () => {
      const metrics = await (await fetch(`${node.engineUrl}/metrics`)).text()
      return Number(/^vllm:num_requests_running\{[^}]*\} (\S+)$/m.exec(metrics)?.[1] ?? 1) === 0
    })
    const metrics = await (await fetch(`${node.engineUrl}/metrics`)).text()
    const generated = Number(/^vllm:generation_tokens_total\{[^}]*\} (\S+)$/m.exec(metrics)?.[1] ?? 0)
    const after = await totals()
    expect(after.requests - before.requests).toBe(1)
    const billed = after.completion - before.completion
    expect(billed).toBeGreaterThan(0)
    expect(billed).toBeLessThan(2000)
    await devnet.federation.direct!.flush()
    const head = devnet.heads[0]!
    // What the node made past what the client got (until the reset reached its engine) is allowed
    // for as a cut stream's tail, never credited: the node's own count does not flag it. (The tail is
    // usually under the 128-token allowance; on a loaded machine a fast engine can run past it before
    // the reset lands, and the 10 % margin covers that.)
    const tail = generated - head.verified.verified(node.peerId)
    process.stdout.write(
      `cut stream: ${tail} tokens made past what the client received (allowance ${directCutStreamAllowanceTokens})\n`,
    )
    expect(tail).toBeGreaterThanOrEqual(0)
    head.verified.compare(node.peerId, generated)
    expect(head.verified.flagged(node.peerId)).toBe(false)
  })

  it('a node refuses requests without a valid ticket: none, forged, for another node, for another holder', async () => {
    const head = devnet.heads[0]!
    const headPeer = peerIdFromString(devnet.info.regions[0]!.headPeerId)
    const start = async (): Promise<MeshNode> =>
      createMeshNode({
        privateKey: await generateKeyPair('Ed25519'),
        listen: ['/ip4/127.0.0.1/tcp/0'],
        bootstrap: [devnet.info.regions[0]!.bootstrapAddr],
        allowPrivateAddresses: true,
        relayReservation: false,
      })
    const holder = await start()
    const stranger = await start()
    try {
      // A peer the head does not trust gets no leases.
      await expect(
        requestLeases(stranger, headPeer, { models: [model], done: [], inflight: [] }),
      ).rejects.toThrow()
      head.allowFederation(holder.peerId.toString())
      const { leases } = await requestLeases(holder, headPeer, { models: [model], done: [], inflight: [] })
      expect(leases).toHaveLength(2)
      const [a, b] = leases as [Lease, Lease]
      for (const mesh of [holder, stranger])
        await mesh.peerStore.merge(peerIdFromString(a.node), {
          // Where the head says the node is reached.
          multiaddrs: a.addrs.map((x) => multiaddr(x)),
        })
      const send = (from: MeshNode, ticket: string | null) =>
        sendInferRequest(from, peerIdFromString(a.node), {
          method: 'POST',
          path: '/v1/completions',
          headers: [
            ['content-type', 'application/json'],
            ...(ticket != null ? ([[ticketHeader, ticket]] as Array<[string, string]>) : []),
          ],
          body: Buffer.from(JSON.stringify({ model, prompt: 'x', max_tokens: 1 })),
        })
      const refusal = async (p: Promise<unknown>): Promise<InferRemoteError> => {
        const err = await p.then(
          () => null,
          (e: unknown) => e,
        )
        expect(err).toBeInstanceOf(InferRemoteError)
        expect((err as InferRemoteError).code).toBe('ticket_invalid')
        return err as InferRemoteError
      }
      expect((await refusal(send(holder, null))).message).toMatch(/needs x-garage-ticket/)
      const forged = `${a.ticket.slice(0, -4)}${a.ticket.endsWith('AAAA') ? 'BBBB' : 'AAAA'}`
      expect((await refusal(send(holder, forged))).message).toMatch(/MAC does not verify/)
      // b's ticket verifies under b's key only: at a it is forged or for another node.
      expect((await refusal(send(holder, b.ticket))).message).toMatch(/MAC does not verify|for node/)
      expect((await refusal(send(stranger, a.ticket))).message).toMatch(/not the peer that sent it/)
      // The real one, from the holder it names: served.
      const ok = await send(holder, a.ticket)
      expect(ok.status).toBe(200)
      for await (const _ of ok.body) {
        // drained
      }
    } finally {
      await Promise.all([holder.stop(), stranger.stop()])
    }
  })

  it('a leased node that stops: requests go through the head to the other node, before any byte', async () => {
    const before = devnet.federation.direct!.counts.fallback
    const gone = devnet.nodes[0]!
    const goneId = gone.peerId!
    await gone.stop()
    const results = await Promise.all(
      Array.from({ length: 6 }, async (_, i) => {
        const { data, response } = await openai.completions
          .create({ model, prompt: `after ${i}`, max_tokens: 4 })
          .withResponse()
        return { node: response.headers.get('x-garage-node'), tokens: data.usage!.completion_tokens }
      }),
    )
    for (const r of results) {
      expect(r.node).not.toBe(goneId)
      expect(r.tokens).toBe(4)
    }
    // The gateway held a lease on the stopped node for a while: its requests fell back through the head.
    expect(devnet.federation.direct!.counts.fallback).toBeGreaterThan(before)
  })
})
