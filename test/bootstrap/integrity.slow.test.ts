import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { IntegrityChecker, type NodeIntegrity } from '../../bootstrap/head/integrity.ts'
import { NodeRegistry } from '../../bootstrap/head/registry.ts'
import { silentLogger } from '../../core/logger.ts'
import { type EmbeddedServer, startEmbeddedServer } from '../../daemon/engines/llamacpp/server.ts'
import { writeTinyModel } from '../../daemon/engines/llamacpp/tiny-model.ts'
import type { Assignment, CapabilityReport } from '../../mesh/region-messages.ts'
import { buildSample, type IntegritySample } from '../../openai/integrity.ts'
import { VerifiedThroughput } from '../../openai/usage.ts'
import { RegionalRouter } from '../../routing/node-router.ts'

/**
 * The head's checker with a coordinator-run trusted engine as its verifier (a real embedded engine):
 * honest answers pass, another model's fail, three failures quarantine the node (held in the router,
 * its unverified tokens held back), and a quarantined node's samples are not taken.
 */

const model = 'garage-tiny-sharp'
const node = '12D3KooWHonestOrNot'

describe('IntegrityChecker with a trusted engine (slow)', () => {
  let dir: string
  let assigned: EmbeddedServer
  let other: EmbeddedServer
  const results: Record<string, number> = {}
  const registry = new NodeRegistry()
  const router = new RegionalRouter()
  const verified = new VerifiedThroughput()
  let checker: IntegrityChecker

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-integrity-checker-'))
    await writeTinyModel(join(dir, 'a.gguf'), { logitScale: 16 })
    await writeTinyModel(join(dir, 'b.gguf'), { logitScale: 16, seed: 2 })
    const start = (file: string): Promise<EmbeddedServer> =>
      startEmbeddedServer({
        modelPath: join(dir, file),
        servedModelName: model,
        threads: 1,
        gpu: false,
        contextSize: 512,
      })
    assigned = await start('a.gguf')
    other = await start('b.gguf')
    registry.join(node, {} as CapabilityReport, { model } as Assignment)
    checker = new IntegrityChecker(
      {
        region: 'r',
        trusted: { url: assigned.url, apiKey: assigned.apiKey, models: [model] },
        vocabularySize: () => 270,
        logger: silentLogger,
      },
      {
        node: null,
        registry,
        router,
        verified,
        checks: {
          inc: ({ result }) => {
            results[result] = (results[result] ?? 0) + 1
          },
        },
      },
    )
    checker.start()
  })
  afterAll(async () => {
    checker?.stop()
    await assigned?.close()
    await other?.close()
    await rm(dir, { recursive: true, force: true })
  })

  async function sampleFrom(
    server: EmbeddedServer,
    i: number,
    temperature: number,
  ): Promise<IntegritySample> {
    const request = {
      model,
      messages: [{ role: 'user', content: `Question ${i}: tell me about rivers.` }],
      max_tokens: 24,
      temperature,
    }
    const res = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${server.apiKey}`, 'content-type': 'application/json' },
      body: JSON.stringify(request),
    })
    const answer = (await res.json()) as { choices: Array<{ message: { content: string } }> }
    return buildSample({
      model,
      node,
      endpoint: 'chat',
      request,
      output: { text: answer.choices[0]!.message.content, finishReason: 'length' },
      requestId: `r${i}`,
      at: Date.now(),
    })!
  }

  it('passes honest answers at any temperature, fails another model, and quarantines after three failures', async () => {
    const verdicts: string[] = []
    checker.addEventListener('integrity:check', (e) => verdicts.push(e.detail.counted))
    for (const [i, t] of [0, 0.7, 1, 1.5].entries()) checker.consider(await sampleFrom(assigned, i, t))
    await checker.idle()
    expect(verdicts).toEqual(['pass', 'pass', 'pass', 'pass'])
    expect(checker.rateFor(node)).toBe(0.5) // still on probation
    checker.credited(node, 100)
    const states: NodeIntegrity[] = []
    checker.addEventListener('integrity:state', (e) => states.push(e.detail))
    for (let i = 0; i < 3; i++) checker.consider(await sampleFrom(other, 10 + i, 0.7))
    await checker.idle()
    expect(verdicts.slice(4)).toEqual(['fail', 'fail', 'fail'])
    expect(states.map((s) => s.state)).toEqual(['quarantined'])
    expect(checker.status(node)).toMatchObject({ state: 'quarantined', heldTokens: 100, fails: 3 })
    expect(checker.status(node).reason).toMatch(
      /3 of 7 checked answers were unlikely under garage-tiny-sharp/,
    )
    expect(router.held(node)).toBe(true)
    expect(checker.standing(node)).toMatchObject({ state: 'quarantined' })
    expect(checker.rateFor(node)).toBe(0)
    // A quarantined node's answers are not taken any more.
    expect(checker.consider(await sampleFrom(other, 20, 1))).toBe(false)
    expect(results).toMatchObject({ pass: 4, fail: 3 })
  })
})
