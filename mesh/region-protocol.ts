import type { AbortOptions, Connection, PeerId, Stream } from '@libp2p/interface'
import { lpStream } from '@libp2p/utils'
import { decodeCanonical, encodeCanonical } from '../core/cbor.ts'
import { isPlainObject } from '../core/guards.ts'
import type { MeshNode } from './node.ts'
import {
  REGION_PROTOCOL,
  regionExchangeTimeoutMs,
  regionMaxInboundStreams,
  regionMaxOutboundStreams,
  regionRequestMaxBytes,
  regionResponseMaxBytes,
} from './protocols.ts'

/**
 * `/garage/region/1.0.0`: the client sends one length-prefixed CBOR map `{ v: 1 }`, the head answers
 * with one length-prefixed CBOR map `{ v: 1, cert: bytes }` and both close.
 */

export class RegionProtocolError extends Error {
  override name = 'RegionProtocolError'
}

/** What a head says of its region beside its certificate (`garage regions` shows it). */
export interface RegionStatusSummary {
  /** Joined nodes. */
  nodes: number
  /** Nodes held back by the integrity check (quarantined or appealing: docs/integrity.md). */
  quarantined: number
}

export interface RegionHandlerInit {
  /** The current certificate bytes (read per request so a renewed certificate is served at once). */
  certificate: () => Uint8Array
  /** The region's numbers now, when this node runs its head (absent: none sent). */
  status?: () => RegionStatusSummary | null
  onBadRequest?: (err: Error, peer: PeerId) => void
  /** Whole exchange; a peer that stalls is reset after this. */
  timeoutMs?: number
}

async function answer(stream: Stream, init: RegionHandlerInit, options: AbortOptions): Promise<void> {
  const lp = lpStream(stream, { maxDataLength: regionRequestMaxBytes })
  const request = decodeCanonical((await lp.read(options)).subarray())
  if (!isPlainObject(request) || request.v !== 1 || Object.keys(request).length !== 1) {
    throw new RegionProtocolError('region request must be the map { v: 1 }')
  }
  const status = init.status?.() ?? null
  await lp.write(
    encodeCanonical({ v: 1, cert: init.certificate(), ...(status != null ? { status } : {}) }),
    options,
  )
  await stream.close(options)
}

/** Serves this head's certificate. Bad input resets only that stream; the node keeps serving. */
export async function handleRegionProtocol(node: MeshNode, init: RegionHandlerInit): Promise<void> {
  await node.handle(
    REGION_PROTOCOL,
    async (stream: Stream, connection: Connection) => {
      const signal = AbortSignal.timeout(init.timeoutMs ?? regionExchangeTimeoutMs)
      try {
        await answer(stream, init, { signal })
      } catch (err) {
        init.onBadRequest?.(err as Error, connection.remotePeer)
        stream.abort(err as Error)
      }
    },
    {
      maxInboundStreams: regionMaxInboundStreams,
      maxOutboundStreams: regionMaxOutboundStreams,
      // Nodes behind NAT reach the head through a relay first; they must still get its certificate.
      runOnLimitedConnection: true,
    },
  )
}

function parseStatus(value: unknown): RegionStatusSummary | null {
  if (!isPlainObject(value)) return null
  const { nodes, quarantined } = value
  const count = (x: unknown): x is number => Number.isSafeInteger(x) && (x as number) >= 0
  return count(nodes) && count(quarantined) ? { nodes, quarantined } : null
}

/** Fetches a peer's region certificate bytes (unverified: pass them to verifyRegionCertificate). */
export async function fetchRegionCertificate(
  node: MeshNode,
  peer: PeerId,
  options: AbortOptions = {},
): Promise<Uint8Array> {
  return (await fetchRegionInfo(node, peer, options)).cert
}

/**
 * The certificate bytes (unverified) and the region's status when the head sends one (a claim of
 * the head's, shown as such; an older head sends none).
 */
export async function fetchRegionInfo(
  node: MeshNode,
  peer: PeerId,
  options: AbortOptions = {},
): Promise<{ cert: Uint8Array; status: RegionStatusSummary | null }> {
  const signal = AbortSignal.any([
    AbortSignal.timeout(regionExchangeTimeoutMs),
    ...(options.signal != null ? [options.signal] : []),
  ])
  const stream = await node.dialProtocol(peer, REGION_PROTOCOL, { signal, runOnLimitedConnection: true })
  try {
    const lp = lpStream(stream, { maxDataLength: regionResponseMaxBytes })
    await lp.write(encodeCanonical({ v: 1 }), { signal })
    const response = decodeCanonical((await lp.read({ signal })).subarray())
    if (!isPlainObject(response) || response.v !== 1 || !(response.cert instanceof Uint8Array)) {
      throw new RegionProtocolError('region response must be the map { v: 1, cert: bytes }')
    }
    await stream.close({ signal })
    return { cert: response.cert, status: parseStatus(response.status) }
  } catch (err) {
    stream.abort(err as Error)
    throw err
  }
}
