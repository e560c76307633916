/** Protocol ids, message size limits and timeouts of the Garage mesh. docs/mesh.md lists them all. */

export const KAD_PROTOCOL = '/garage/kad/1.0.0'
export const REGION_PROTOCOL = '/garage/region/1.0.0'

/** The region request is a tiny CBOR map; anything larger is hostile. */
export const regionRequestMaxBytes = 512
/** A certificate with 16 addresses of 256 characters stays well under this. */
export const regionResponseMaxBytes = 16 * 1024
/** Whole exchange on /garage/region/1.0.0, on either side. */
export const regionExchangeTimeoutMs = 5_000
/** Concurrent region streams a peer may hold open on one connection. */
export const regionMaxInboundStreams = 8
export const regionMaxOutboundStreams = 8
