import { randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import { execa } from 'execa'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { containersOf, inspectContainer, requirePodman, standInImage } from '../containers/podman.ts'
import { fakeGpuMachine } from '../helpers/fake-tools.ts'
import { ProcessCluster } from '../helpers/process-cluster.ts'

/**
 * `garage node` on a machine whose probe sees an NVIDIA RTX 4090 (a fake nvidia-smi first on PATH)
 * with a CDI spec for it, in a region whose policy prefers vLLM: the node starts vLLM in real Podman
 * with the GPU's CDI device (the stand-in image, speaking vLLM's interface, is the only thing not
 * real), serves chat through the federation, and removes the container when it stops. A second node
 * whose vLLM image cannot be had says why and serves on the embedded engine instead.
 *
 */

const model = 'stand-in-8b'
const runId = randomBytes(4).toString('hex')

describe('garage node with vLLM in Podman', () => {
  let root: string
  let cluster: ProcessCluster
  let image: string
  let gpu: Awaited<ReturnType<typeof fakeGpuMachine>> | undefined

  beforeAll(async () => {
    await requirePodman()
    image = await standInImage()
    root = await mkdtemp(join(tmpdir(), 'garage-vllm-node-'))
    gpu = await fakeGpuMachine(root, runId)
    const bin = gpu.bin
    cluster = ProcessCluster.create({
      runId,
      root: join(root, 'cluster'),
      regions: ['gpu-region'],
      nodesPerRegion: 2,
      isolateOneNode: false,
      maxTokensPerSecond: 1000,
      parallel: 2,
      contextLength: 1024,
      keyNames: ['app'],
      models: [
        {
          name: model,
          engine: ['vllm', 'llamacpp'],
          source: { hf: 'garage/stand-in-8b', gguf: 'garage-tiny' },
          replicas: 2,
          minVramMiB: 0,
          minRamMiB: 16,
          parallel: 2,
          contextLength: 1024,
        },
      ],
      nodeSetup: (node) => ({
        args: ['--vllm-image', node.endsWith('n1') ? image : 'localhost/garage-no-such-image:1'],
        env: { PATH: `${bin}${delimiter}${process.env.PATH}` },
      }),
    })
    await cluster.start()
  })

  afterAll(async () => {
    const report = await cluster?.stop()
    await gpu?.remove()
    if (root != null) await rm(root, { recursive: true, force: true })
    expect(report?.containers ?? []).toEqual([])
  })

  it('starts vLLM with the GPU by CDI, serves chat through the federation, and podman ps shows it', async () => {
    const node = cluster.node('gpu-region-n1')
    expect(node.proc!.stdout.join('\n')).toMatch(/engine\s+http:\/\/127\.0\.0\.1:\d+ \(vllm, loopback only\)/)
    const containers = await containersOf(node.peerId)
    expect(containers).toHaveLength(1)
    const c = await inspectContainer(containers[0]!)
    expect(c.State.Status).toBe('running')
    expect(c.Config.Labels['garage.role']).toBe('vllm')
    // The CDI device's edits reached the container: Podman resolved nvidia.com/gpu=all.
    expect(c.Config.Env).toContain('GARAGE_TEST_GPU=all')
    const ps = await execa('podman', [
      'ps',
      '--filter',
      `label=garage.node=${node.peerId}`,
      '--format',
      '{{.Image}}',
    ])
    expect(ps.stdout.trim()).toBe(image)

    const client = new OpenAI({
      baseURL: `${cluster.federation.url}/v1`,
      apiKey: cluster.keys[0]!.key,
      maxRetries: 0,
    })
    const seen = new Set<string>()
    for (let i = 0; i < 12 && !seen.has(node.peerId); i++) {
      const { data, response } = await client.chat.completions
        .create({ model, messages: [{ role: 'user', content: `hello ${i}` }], max_tokens: 16 })
        .withResponse()
      const served = response.headers.get('x-garage-node')!
      seen.add(served)
      if (served === node.peerId)
        expect(data.choices[0]!.message.content).toBe(`stand-in ${model} says: hello ${i}`)
    }
    expect(seen).toContain(node.peerId)
  })

  it('a node whose vLLM image cannot be had says why, tells the head, and serves on the embedded engine', async () => {
    const node = cluster.node('gpu-region-n2')
    const banner = node.proc!.stdout.join('\n')
    expect(banner).toMatch(/\(llamacpp, loopback only\)/)
    expect(banner).toMatch(/note\s+vllm failed here: .*garage-no-such-image/)
    expect(await containersOf(node.peerId)).toEqual([])

    const status = await execa(process.execPath, [
      'bin/garage.js',
      'status',
      '--json',
      '--data-dir',
      node.dir,
    ])
    const s = JSON.parse(status.stdout) as {
      state: string
      engine: { kind: string; failed: Array<{ engine: string; reason: string }> }
    }
    expect(s.state).toBe('serving')
    expect(s.engine.kind).toBe('llamacpp')
    expect(s.engine.failed).toEqual([
      { engine: 'vllm', reason: expect.stringContaining('garage-no-such-image') },
    ])

    const region = cluster.region('gpu-region')
    const health = (await (await fetch(`${region.headUrl}/health`)).json()) as {
      engineFailures: Array<{ node: string; engine: string; reason: string }>
    }
    expect(health.engineFailures).toEqual([
      { node: node.peerId, engine: 'vllm', reason: expect.stringContaining('garage-no-such-image') },
    ])
  })

  it('SIGTERM drains the vLLM node and removes its container', async () => {
    const node = cluster.node('gpu-region-n1')
    expect(await node.proc!.stop('SIGTERM')).toBe('exited')
    expect(await containersOf(node.peerId)).toEqual([])
  })
})
