import { generateKeyPair } from '@libp2p/crypto/keys'
import { type RegionalHead, startRegionalHead } from '../../bootstrap/head/head.ts'
import { parseRegionPolicy } from '../../bootstrap/head/policy.ts'
import { type Federation, startFederation } from '../../federation/gateway.ts'
import { signCapabilityReport } from '../../mesh/capability-report.ts'
import { handleInferProtocol, type InferReply, type InferServerRequest } from '../../mesh/infer-protocol.ts'
import { requestJoin } from '../../mesh/join-protocol.ts'
import { createMeshNode } from '../../mesh/node.ts'
import { sendTelemetry } from '../../mesh/telemetry-protocol.ts'
import { dialAddr, type TestMesh } from '../helpers/mesh.ts'
import { cpuNodeReport } from './fuzz.ts'

export const fuzzRegion = 'fuzz-region'
export const fuzzModel = 'garage-tiny'

/** What the stand-in engine answers: its text and usage, so a test can check what arrived. */
export const engineText = ['Hel', 'lo ', 'the', 're']
export const engineUsage = { prompt_tokens: 3, completion_tokens: engineText.length }

export interface FuzzRegion {
  head: RegionalHead
  federation: Federation
  /** A key of the federation with no limits. */
  apiKey: string
}

const encoder = new TextEncoder()

/**
 * A stand-in engine on a node that joined the region for real (signed report, assignment,
 * telemetry): answers chat and completions as an OpenAI server would, streamed or not, with usage.
 */
async function answer(request: InferServerRequest, reply: InferReply): Promise<void> {
  const json = (status: number, body: unknown) =>
    reply.respond(status, [['content-type', 'application/json']], encoder.encode(JSON.stringify(body)))
  if (request.path !== '/v1/chat/completions' && request.path !== '/v1/completions') {
    return json(404, {
      error: { message: 'no such path', type: 'invalid_request_error', param: null, code: null },
    })
  }
  const chat = request.path === '/v1/chat/completions'
  let body: { stream?: boolean; stream_options?: { include_usage?: boolean } }
  try {
    body = JSON.parse(new TextDecoder().decode(request.body))
  } catch {
    return json(400, {
      error: { message: 'bad json', type: 'invalid_request_error', param: null, code: 'invalid_json' },
    })
  }
  const choice = (text: string, last: boolean) =>
    chat
      ? { index: 0, delta: { content: text }, finish_reason: last ? 'stop' : null }
      : { index: 0, text, finish_reason: last ? 'stop' : null }
  if (body.stream === true) {
    await reply.head(200, [['content-type', 'text/event-stream']])
    for (const [i, text] of engineText.entries()) {
      await reply.data(
        encoder.encode(
          `data: ${JSON.stringify({ choices: [choice(text, i === engineText.length - 1)] })}\n\n`,
        ),
      )
    }
    if (body.stream_options?.include_usage === true) {
      await reply.data(encoder.encode(`data: ${JSON.stringify({ choices: [], usage: engineUsage })}\n\n`))
    }
    await reply.data(encoder.encode('data: [DONE]\n\n'))
    return reply.end()
  }
  const text = engineText.join('')
  return json(200, {
    object: chat ? 'chat.completion' : 'text_completion',
    choices: [
      chat
        ? { index: 0, message: { role: 'assistant', content: text }, finish_reason: 'stop' }
        : { index: 0, text, finish_reason: 'stop' },
    ],
    usage: engineUsage,
  })
}

/**
 * A region on loopback: bootstrap node and regional head, one node with a stand-in engine serving
 * `fuzzModel`, and a federation gateway that sees the region. Everything is tracked by `mesh`.
 */
export async function startFuzzRegion(mesh: TestMesh): Promise<FuzzRegion> {
  const authority = await mesh.authority()
  const bootstrap = await mesh.bootstrap(authority, fuzzRegion)
  const head = await startRegionalHead({
    node: bootstrap.node,
    region: fuzzRegion,
    policy: parseRegionPolicy({
      region: fuzzRegion,
      models: [
        {
          name: fuzzModel,
          engine: ['llamacpp'],
          source: { gguf: 'garage-tiny' },
          replicas: 1,
          minVramMiB: 0,
          minRamMiB: 16,
          parallel: 64,
        },
      ],
      ray: { enabled: false },
    }),
    dataDir: await mesh.tempDir('garage-fuzz-head-'),
    httpPort: 0,
    // The stand-in node reports once; a fuzz run must not see it evicted.
    telemetryDeadlineMs: 3_600_000,
  })
  mesh.track(() => head.stop())

  const key = await generateKeyPair('Ed25519')
  const node = await createMeshNode({
    privateKey: key,
    listen: ['/ip4/127.0.0.1/tcp/0'],
    bootstrap: [dialAddr(bootstrap)],
    allowPrivateAddresses: true,
    relayReservation: false,
  })
  mesh.track(async () => {
    await node.stop()
  })
  const headId = bootstrap.node.peerId
  mesh.track(await handleInferProtocol(node, { allow: (peer) => peer.equals(headId), handle: answer }))
  const report = cpuNodeReport(node.peerId.toString(), fuzzRegion)
  const assignment = await requestJoin(node, headId, await signCapabilityReport(key, report))
  const ack = await sendTelemetry(node, headId, {
    v: 1,
    seq: 1,
    state: 'serving',
    model: assignment.model,
    tokensTotal: 0,
    promptTokensTotal: 0,
    tokensPerSecond: 0,
    running: 0,
    waiting: 0,
    kvCacheUsage: 0,
  })
  if (ack !== 'ok') throw new Error(`the head answered the stand-in node's telemetry with ${ack}`)

  const federation = await startFederation({
    dataDir: await mesh.tempDir('garage-fuzz-federation-'),
    authority: authority.id,
    bootstrap: [dialAddr(bootstrap)],
    listen: ['/ip4/127.0.0.1/tcp/0'],
    allowPrivateAddresses: true,
    httpPort: 0,
  })
  mesh.track(() => federation.stop())
  head.allowFederation(federation.peerId.toString())
  // Rounds until the gateway sees the region serve the model (each round is bounded by its timeout).
  const serving = (): boolean =>
    federation.directory.regions().some((r) => r.reachable && (r.models.get(fuzzModel)?.nodes ?? 0) > 0)
  for (let round = 0; round < 10 && !serving(); round++) await federation.directory.refresh()
  if (!serving()) throw new Error(`the federation does not see ${fuzzRegion} serve ${fuzzModel}`)
  const { key: apiKey } = await federation.keys.create({ name: 'fuzz' })
  return { head, federation, apiKey }
}
