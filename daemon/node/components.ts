import type { PeerId } from '@libp2p/interface'
import type { TypedEventTarget } from 'main-event'
import {
  type DiscoveredHead,
  RegionDiscovery,
  type RegionDiscoveryEvents,
  type RegionDiscoveryInit,
} from '../../mesh/discovery.ts'
import { type DirectGrant, requestJoin, requestLeave } from '../../mesh/join-protocol.ts'
import { createMeshNode, type MeshNode, type MeshNodeOptions } from '../../mesh/node.ts'
import type { Assignment, TelemetryReport } from '../../mesh/region-messages.ts'
import { type IntegrityStanding, sendTelemetry, type TelemetryAck } from '../../mesh/telemetry-protocol.ts'
import type { RayWorker } from '../engines/ray/worker.ts'
import type { Engine } from '../engines/types.ts'
import { probeHardware } from '../hardware/probe.ts'
import type { HardwareReport } from '../hardware/types.ts'
import { type InferForwardingOptions, type InferMeshServer, serveInferOverMesh } from '../infer-handler.ts'
import type { EngineContext } from './engines.ts'

/** What the daemon needs of discovery: the head to join, and word when it is lost or changes. */
export interface RegionFinder
  extends TypedEventTarget<Pick<RegionDiscoveryEvents, 'region:lost' | 'region:chosen'>> {
  start(): void
  stop(): void
  choose(): Promise<DiscoveredHead>
}

/**
 * Everything `garage node` reaches outside its own code: the mesh, the region's head, the engine,
 * the hardware. The defaults are the real ones; a test passes stand-ins for what it is not about
 * (test/daemon/node-daemon.test.ts runs the daemon's state machine without libp2p or llama.cpp).
 */
export interface NodeComponents {
  probeHardware(options: { dataDir: string }): Promise<HardwareReport>
  createMeshNode(options: MeshNodeOptions): Promise<MeshNode>
  createDiscovery(node: MeshNode, init: RegionDiscoveryInit): RegionFinder
  requestJoin(
    node: MeshNode,
    head: PeerId,
    signedReport: Uint8Array,
    options: { signal: AbortSignal; onDirect?: (grant: DirectGrant) => void },
  ): Promise<Assignment>
  requestLeave(node: MeshNode, head: PeerId, options: { signal: AbortSignal }): Promise<void>
  sendTelemetry(
    node: MeshNode,
    head: PeerId,
    report: TelemetryReport,
    options: {
      signal: AbortSignal
      onVerified: (tokens: number, integrity: IntegrityStanding | null) => void
    },
  ): Promise<TelemetryAck>
  serveInfer(node: MeshNode, options: InferForwardingOptions): Promise<InferMeshServer>
  /** The engine an assignment names (daemon/node/engines.ts makes the real ones). */
  createEngine(assignment: Assignment, context: EngineContext): Engine
  /** A Ray worker (a container through Podman or Docker). */
  createRayWorker(): RayWorker
}

/** The real parts, except the engine and the Ray worker, which need the node's identity and hardware and are made by the daemon. */
export const defaultNodeComponents: Omit<NodeComponents, 'createRayWorker' | 'createEngine'> = {
  probeHardware: ({ dataDir }) => probeHardware({ dataDir, commandTimeoutMs: 5_000, otherGpus: false }),
  createMeshNode,
  createDiscovery: (node, init) => new RegionDiscovery(node, init),
  requestJoin,
  requestLeave,
  sendTelemetry,
  serveInfer: serveInferOverMesh,
}
