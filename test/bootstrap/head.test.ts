import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type RegionalHead, startRegionalHead } from '../../bootstrap/head/head.ts'
import { parseRegionPolicy } from '../../bootstrap/head/policy.ts'
import { capabilityFromHardware } from '../../daemon/node-daemon.ts'
import { signCapabilityReport } from '../../mesh/capability-report.ts'
import { requestJoin } from '../../mesh/join-protocol.ts'
import { createMeshNode, type MeshNode } from '../../mesh/node.ts'
import { cpuOnlyMachine } from '../helpers/hardware.ts'
import { dialAddr, TestMesh } from '../helpers/mesh.ts'

const machine = cpuOnlyMachine()

const rayCredentials = { address: '10.1.2.3:6379', token: 'cluster-token-for-tests' }

describe('regional head: admission and its HTTP API', () => {
  const mesh = new TestMesh()
  const heads: Record<string, RegionalHead> = {}
  const bootstraps: Record<string, string> = {}
  const headIds: Record<string, string> = {}

  beforeAll(async () => {
    const authority = await mesh.authority()
    for (const [region, trusted] of [
      ['trusted', true],
      ['untrusted', false],
    ] as const) {
      const b = await mesh.bootstrap(authority, region)
      const policy = parseRegionPolicy({
        region,
        models: [
          {
            name: 'garage-tiny',
            engine: ['llamacpp'],
            source: { gguf: 'garage-tiny' },
            replicas: 2,
            minVramMiB: 0,
            minRamMiB: 64,
          },
        ],
        ray: { enabled: true, trusted },
      })
      heads[region] = await startRegionalHead({
        node: b.node,
        region,
        policy,
        dataDir: await mesh.tempDir(),
        httpPort: 0,
        ray: { credentials: () => rayCredentials },
      })
      mesh.track(() => heads[region]!.stop())
      bootstraps[region] = dialAddr(b)
      headIds[region] = b.peerId.toString()
    }
  })
  afterAll(() => mesh.cleanup())

  async function join(region: string): Promise<{ node: MeshNode; key: PrivateKey }> {
    const key = await generateKeyPair('Ed25519')
    const node = await createMeshNode({
      privateKey: key,
      listen: ['/ip4/127.0.0.1/tcp/0'],
      bootstrap: [bootstraps[region]!],
      allowPrivateAddresses: true,
    })
    mesh.track(async () => {
      await node.stop()
    })
    return { node, key }
  }

  it('hands Ray credentials only to nodes that opted in, and only for a trusted cluster', async () => {
    const outcomes: Record<string, boolean> = {}
    for (const region of ['trusted', 'untrusted']) {
      for (const optIn of [true, false]) {
        const { node, key } = await join(region)
        const report = capabilityFromHardware(node.peerId.toString(), region, machine, {
          daemonVersion: 'test',
          rayOptIn: optIn,
        })
        const head = heads[region]!
        const assignment = await requestJoin(
          node,
          peerIdFromString(headIds[region]!),
          await signCapabilityReport(key, report),
          { signal: AbortSignal.timeout(10_000) },
        )
        expect(assignment.model).toBe('garage-tiny')
        expect(head.registry.get(node.peerId.toString())?.state).toBe('starting')
        outcomes[`${region}/${optIn ? 'opted-in' : 'not opted in'}`] = assignment.ray != null
        if (assignment.ray != null) expect(assignment.ray).toEqual(rayCredentials)
      }
    }
    expect(outcomes).toEqual({
      'trusted/opted-in': true,
      'trusted/not opted in': false,
      'untrusted/opted-in': false,
      'untrusted/not opted in': false,
    })
  })

  it('answers OpenAI-shaped errors: no token, unknown model, no serving node, bad JSON, oversized body', async () => {
    const head = heads.trusted!
    const post = (body: string, auth = `Bearer ${head.apiToken}`): Promise<Response> =>
      fetch(`${head.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: auth, 'content-type': 'application/json' },
        body,
      })
    const chat = JSON.stringify({ model: 'garage-tiny', messages: [{ role: 'user', content: 'hi' }] })

    const noToken = await post(chat, 'Bearer wrong')
    expect(noToken.status).toBe(401)
    expect(((await noToken.json()) as { error: { code: string } }).error.code).toBe('invalid_api_key')

    const unknown = await post(JSON.stringify({ model: 'no-such-model', messages: [] }))
    expect(unknown.status).toBe(404)
    expect(((await unknown.json()) as { error: { code: string } }).error.code).toBe('model_not_found')

    // garage-tiny is assigned (the nodes above joined) but none of them serves yet.
    const starting = await post(chat)
    expect(starting.status).toBe(503)
    expect(starting.headers.get('retry-after')).toBe('2')
    expect(((await starting.json()) as { error: { code: string } }).error.code).toBe('no_capacity')

    const malformed = await post('{"model": ')
    expect(malformed.status).toBe(400)
    expect(((await malformed.json()) as { error: { code: string } }).error.code).toBe('invalid_json')

    const huge = await post(JSON.stringify({ model: 'garage-tiny', prompt: 'x'.repeat(5 * 1024 * 1024) }))
    expect(huge.status).toBe(413)

    const badField = await post(JSON.stringify({ model: 'garage-tiny', stream: 'yes', messages: [] }))
    expect(badField.status).toBe(400)
    expect(((await badField.json()) as { error: { param: string } }).error.param).toBe('stream')

    const models = await fetch(`${head.url}/v1/models`, {
      headers: { authorization: `Bearer ${head.apiToken}` },
    })
    expect(models.status).toBe(200)
    expect(((await models.json()) as { data: unknown[] }).data).toEqual([])

    const health = (await (await fetch(`${head.url}/health`)).json()) as { nodes: Record<string, number> }
    expect(health.nodes.starting).toBeGreaterThan(0)
    const metrics = await (await fetch(`${head.url}/metrics`)).text()
    expect(metrics).toMatch(/garage_head_requests_total\{model="garage-tiny",status="503"\} 1/)
    expect(metrics).not.toContain('no-such-model')
  })
})
