import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import type { BootstrapNode } from '../../bootstrap/bootstrap-node.ts'
import { type RegionalHead, type RegionalHeadOptions, startRegionalHead } from '../../bootstrap/head/head.ts'
import { parseRegionPolicy, type RegionPolicy } from '../../bootstrap/head/policy.ts'
import { writeTinyModel } from '../../daemon/engines/llamacpp/tiny-model.ts'
import { probeHardware } from '../../daemon/hardware/probe.ts'
import type { HardwareReport } from '../../daemon/hardware/types.ts'
import { NodeDaemon, type NodeDaemonOptions } from '../../daemon/node-daemon.ts'
import type { Authority } from '../../mesh/authority.ts'
import { dialAddr, type TestMesh, waitForEvent } from './mesh.ts'

export const tinyModel = 'garage-tiny'

export function tinyPolicy(region: string, over: Record<string, unknown> = {}): RegionPolicy {
  return parseRegionPolicy({
    region,
    models: [
      {
        name: tinyModel,
        engine: ['llamacpp'],
        source: { gguf: 'garage-tiny' },
        replicas: 3,
        minVramMiB: 0,
        minRamMiB: 16,
        parallel: 2,
        contextLength: 512,
        ...over,
      },
    ],
    ray: { enabled: false },
  })
}

export interface TestRegion {
  authority: Authority
  bootstrap: BootstrapNode
  head: RegionalHead
  hardware: HardwareReport
  /** Shared by every node: the tiny model is made once. */
  modelsDir: string
  /** A node daemon joined to this region (started; stopped at cleanup). */
  addNode(extra?: Partial<NodeDaemonOptions>): Promise<NodeDaemon>
  /** Resolves when the head has `peerId` in `state`. */
  nodeState(peerId: string, state: string, timeoutMs?: number): Promise<void>
}

/** A bootstrap node with a regional head on loopback, and a way to join node daemons to it. */
export async function startTestRegion(
  mesh: TestMesh,
  region: string,
  headOptions: {
    policy?: RegionPolicy
    telemetryDeadlineMs?: number
    integrity?: RegionalHeadOptions['integrity']
  } = {},
): Promise<TestRegion> {
  const authority = await mesh.authority()
  const bootstrap = await mesh.bootstrap(authority, region)
  const head = await startRegionalHead({
    node: bootstrap.node,
    region,
    policy: headOptions.policy ?? tinyPolicy(region),
    dataDir: await mesh.tempDir('garage-head-'),
    httpPort: 0,
    ...(headOptions.telemetryDeadlineMs != null
      ? { telemetryDeadlineMs: headOptions.telemetryDeadlineMs }
      : {}),
    ...(headOptions.integrity != null ? { integrity: headOptions.integrity } : {}),
  })
  mesh.track(() => head.stop())
  const modelsDir = join(await mesh.tempDir('garage-models-'), 'models')
  await mkdir(modelsDir, { recursive: true })
  await writeTinyModel(join(modelsDir, 'garage-tiny.gguf'))
  const hardware = await probeHardware({ dataDir: modelsDir, otherGpus: false })
  const nodeState = async (peerId: string, state: string, timeoutMs = 20_000): Promise<void> => {
    if (head.registry.get(peerId)?.state === state) return
    await waitForEvent<{ peerId: string; state: string }>(
      head.registry,
      'node:state',
      (d) => d.peerId === peerId && d.state === state,
      timeoutMs,
    )
  }
  return {
    authority,
    bootstrap,
    head,
    hardware,
    modelsDir,
    nodeState,
    async addNode(extra = {}) {
      const daemon = new NodeDaemon({
        dataDir: await mesh.tempDir('garage-node-'),
        modelsDir,
        authority: authority.id,
        bootstrap: [dialAddr(bootstrap)],
        listen: ['/ip4/127.0.0.1/tcp/0'],
        allowPrivateAddresses: true,
        hardware,
        threads: 1,
        drainGraceMs: 20_000,
        // A test's nodes ignore this machine's processes unless the test is about that.
        hostPolicies: false,
        ...extra,
      })
      mesh.track(() => daemon.stop({ graceMs: 2_000 }))
      await daemon.start()
      await nodeState(daemon.peerId!, 'serving')
      return daemon
    },
  }
}
