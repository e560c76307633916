import { type ChildProcess, spawn } from 'node:child_process'
import { symlink } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultNodeSettings, type NodeDaemon } from '../../daemon/node-daemon.ts'
import { TestMesh, waitForEvent } from '../helpers/mesh.ts'
import { startTestRegion, type TestRegion, tinyModel } from '../helpers/region.ts'

describe('pause when gaming, end to end', () => {
  const mesh = new TestMesh()
  let region: TestRegion
  let gamer: NodeDaemon
  let other: NodeDaemon
  const games: ChildProcess[] = []
  beforeAll(async () => {
    region = await startTestRegion(mesh, 'eu-games')
    // Both nodes share this machine: only the gamer's node watches it, so the other keeps serving.
    ;[gamer, other] = await Promise.all([
      region.addNode({ hostPolicies: true, settings: { ...defaultNodeSettings, resumeAfterSeconds: 2 } }),
      region.addNode({ hostPolicies: false }),
    ])
  }, 120_000)
  afterAll(async () => {
    for (const g of games) g.kill('SIGKILL')
    await mesh.cleanup()
  })

  it('a game starts: paused and the model released within 2 s, nothing routed there; it exits: serving again', async () => {
    const gamerId = gamer.peerId!
    // A process the way Linux shows a game: a program whose name is the game's executable.
    const dir = await mesh.tempDir('garage-game-')
    const exe = join(dir, 'FortniteClient-Win64-Shipping')
    await symlink('/bin/sleep', exe)
    const released = waitForEvent<{ ms: number; reasons: string[] }>(gamer, 'released', () => true, 10_000)
    const started = performance.now()
    const game = spawn(exe, ['600'], { stdio: 'ignore' })
    games.push(game)
    const detail = await released
    const ms = performance.now() - started
    process.stdout.write(
      `game start → model released: ${ms.toFixed(0)} ms (pause itself ${detail.ms} ms; ${detail.reasons.join(', ')})\n`,
    )
    expect(ms).toBeLessThan(2_000)
    expect(detail.reasons.join(' ')).toContain('FortniteClient-Win64-Shipping')
    expect(gamer.status().state).toBe('paused')
    expect(gamer.status().engine?.url).toBeNull()
    await region.nodeState(gamerId, 'paused')

    // Requests keep flowing, all to the other node.
    for (let i = 0; i < 10; i++) {
      const res = await fetch(`${region.head.url}/v1/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${region.head.apiToken}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: tinyModel, prompt: `while gaming ${i}`, max_tokens: 4 }),
      })
      expect(res.status).toBe(200)
      expect(res.headers.get('x-garage-node')).toBe(other.peerId)
      await res.arrayBuffer()
    }

    // The game exits: the node serves again once the host has been clear for resumeAfterSeconds.
    const exitedAt = performance.now()
    game.kill('SIGTERM')
    await region.nodeState(gamerId, 'serving', 20_000)
    const back = performance.now() - exitedAt
    process.stdout.write(`game exit → serving again: ${back.toFixed(0)} ms (hysteresis 2 s)\n`)
    expect(back).toBeGreaterThanOrEqual(2_000)
    expect(gamer.status().state).toBe('serving')
    expect(gamer.status().engine?.url).toMatch(/^http:\/\/127\.0\.0\.1:/)
  })
})
