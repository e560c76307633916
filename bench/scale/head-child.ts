/**
 * A real regional head (createMeshNode as a bootstrap node + startRegionalHead) in a process of
 * its own, so the CPU and memory measured are the head's alone. bench/scale/head-load.ts forks it
 * and drives it over IPC: { id, cmd, args } in, { id, ok, value | error } out.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { CID } from 'multiformats/cid'
import { startRegionalHead } from '../../bootstrap/head/head.ts'
import { createMeshNode } from '../../mesh/node.ts'
import { benchModel, benchPolicy, benchRegion, benchSlots } from './region-fixture.ts'

export interface HeadUsage {
  cpuUs: number
  rssBytes: number
  heapUsedBytes: number
  /** Heap outside V8 (Buffers, sockets' memory held by Node). */
  externalBytes: number
  connections: number
  joined: number
  /** Serving nodes in the router's pools. */
  routerNodes: number
  /** Bytes the process read and wrote through syscalls (/proc/self/io); null off Linux. */
  io: { readBytes: number; writtenBytes: number } | null
}

export interface HeadCommand {
  id: number
  cmd: 'usage' | 'populate' | 'allowFederation' | 'provide' | 'stop'
  args?: { gc?: boolean; count?: number; peerId?: string; cid?: string }
}

async function procIo(): Promise<HeadUsage['io']> {
  try {
    const text = await readFile('/proc/self/io', 'utf8')
    const read = Number(/^rchar: (\d+)$/m.exec(text)?.[1])
    const written = Number(/^wchar: (\d+)$/m.exec(text)?.[1])
    return Number.isFinite(read) && Number.isFinite(written)
      ? { readBytes: read, writtenBytes: written }
      : null
  } catch {
    return null
  }
}

const dataDir = await mkdtemp(join(tmpdir(), 'garage-scale-head-'))
const node = await createMeshNode({
  privateKey: await generateKeyPair('Ed25519'),
  role: 'bootstrap',
  listen: ['/ip4/127.0.0.1/tcp/0'],
  allowPrivateAddresses: true,
})
const head = await startRegionalHead({
  node,
  region: benchRegion,
  policy: benchPolicy(),
  dataDir,
  httpPort: 0,
})
let synthetic = 0

async function stop(): Promise<void> {
  await head.stop().catch(() => {})
  await Promise.resolve(node.stop()).catch(() => {})
  await rm(dataDir, { recursive: true, force: true })
}

async function run(command: HeadCommand): Promise<unknown> {
  const args = command.args ?? {}
  switch (command.cmd) {
    case 'usage': {
      if (args.gc === true) global.gc?.()
      const cpu = process.cpuUsage()
      const mem = process.memoryUsage()
      return {
        cpuUs: cpu.user + cpu.system,
        rssBytes: mem.rss,
        heapUsedBytes: mem.heapUsed,
        externalBytes: mem.external,
        connections: node.getConnections().length,
        joined: head.registry.size,
        routerNodes: head.router.models().reduce((sum, m) => sum + m.nodes, 0),
        io: await procIo(),
      } satisfies HeadUsage
    }
    case 'populate': {
      // Nodes in the router's pool only (what GET /v1/models reads); the registry would evict them.
      const count = args.count ?? 0
      for (; synthetic < count; synthetic++) {
        const peerId = `synthetic-${synthetic}`
        head.router.upsert(peerId, { model: benchModel, slots: benchSlots, state: 'serving' })
        head.router.updateTelemetry(peerId, { running: 2, waiting: 0, kvCacheUsage: 0.4, state: 'serving' })
      }
      return synthetic
    }
    case 'allowFederation':
      head.allowFederation(args.peerId ?? '')
      return true
    case 'provide':
      await node.contentRouting.provide(CID.parse(args.cid ?? ''))
      return true
    case 'stop':
      await stop()
      return true
  }
}

process.on('message', (message: HeadCommand) => {
  run(message).then(
    (value) => {
      process.send?.({ id: message.id, ok: true, value }, () => {
        if (message.cmd === 'stop') process.exit(0)
      })
    },
    (err: unknown) => process.send?.({ id: message.id, ok: false, error: (err as Error).message }),
  )
})
// The bench went away without stopping us: leave nothing behind.
process.on('disconnect', () => {
  void stop().finally(() => process.exit(0))
})
process.send?.({
  id: 0,
  ok: true,
  value: { peerId: node.peerId.toString(), addr: node.getMultiaddrs()[0]!.toString() },
})
