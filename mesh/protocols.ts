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

export const JOIN_PROTOCOL = '/garage/join/1.0.0'
export const TELEMETRY_PROTOCOL = '/garage/telemetry/1.0.0'
export const INFER_PROTOCOL = '/garage/infer/1.0.0'

/** A signed capability report: hardware lists of a few GPUs; anything past this is hostile. */
export const joinRequestMaxBytes = 16 * 1024
/** An assignment, with Ray credentials where the region runs a trusted cluster. */
export const joinResponseMaxBytes = 16 * 1024
export const joinExchangeTimeoutMs = 10_000
export const joinMaxInboundStreams = 4
export const joinMaxOutboundStreams = 4

export const telemetryReportMaxBytes = 4 * 1024
export const telemetryAckMaxBytes = 1024
export const telemetryExchangeTimeoutMs = 5_000
export const telemetryMaxInboundStreams = 4
export const telemetryMaxOutboundStreams = 4
/** How often a node reports; the head evicts a node silent for telemetryDeadlineMs. */
export const telemetryIntervalMs = 2_000
export const telemetryDeadlineMs = 3 * telemetryIntervalMs + 1_000

/** Request line and headers of a proxied HTTP request, or status and headers of its response. */
export const inferHeadMaxBytes = 16 * 1024
/** Whole request body (a chat with a long context); the head refuses larger bodies before it dials. */
export const inferRequestBodyMaxBytes = 4 * 1024 * 1024
/** One data frame; bodies are cut into frames of at most this. */
export const inferFrameMaxBytes = 64 * 1024
/** Dial and protocol negotiation. */
export const inferConnectTimeoutMs = 5_000
/** From the request sent to the response head (queueing at the engine included). */
export const inferFirstByteTimeoutMs = 60_000
/** Between two frames of a response in progress. */
export const inferIdleTimeoutMs = 60_000
/** Concurrent infer streams one head may hold open on one connection to a node. */
export const inferMaxInboundStreams = 256
export const inferMaxOutboundStreams = 1_024

// /garage/infer/1.0.0 flow control and keep-alive (mesh/infer-protocol.ts)

/** Response bytes the head queues for a slow reader before it pauses the stream (yamux then holds the node back). */
export const inferResponseBufferBytes = 256 * 1024
/**
 * Cap on yamux's receive window per stream, set in mesh/node.ts (yamux grows it to 16 MiB): what a
 * paused stream still lets in. 1 MiB per RTT is 20 MiB/s at 50 ms, far above a token stream.
 */
export const inferReceiveWindowMaxBytes = 1024 * 1024
/** What a paused infer stream may hold before libp2p resets it; above any yamux window, capped or not. */
export const inferStreamReadBufferMaxBytes = 16 * 1024 * 1024 + 256 * 1024
/**
 * How long the head keeps a finished stream for the next request to the same node. Below
 * inferIdleTimeoutMs, after which the node closes a stream that carries no request.
 */
export const inferKeepAliveMs = 30_000
/** Idle streams the head keeps per node; past it a finished stream is closed. */
export const inferIdleStreamsPerPeer = 64

// /garage/lease/1.0.0: the direct path's leases and completion reports (mesh/lease-protocol.ts)

export const LEASE_PROTOCOL = '/garage/lease/1.0.0'
/** Done and in-flight records per report, and leases per grant. */
export const leaseMaxRecords = 4_096
/** Integrity samples one lease request may carry (each up to 256 KiB, all within leaseRequestMaxBytes). */
export const leaseMaxSamples = 16
/** Models one lease request may ask for. */
export const leaseMaxModels = 64
/** 4,096 done records of ~80 bytes, with room. */
export const leaseRequestMaxBytes = 512 * 1024
/** 4,096 leases of ~400 bytes (a ticket and a few addresses). */
export const leaseResponseMaxBytes = 2 * 1024 * 1024
export const leaseExchangeTimeoutMs = 5_000
export const leaseMaxInboundStreams = 8
export const leaseMaxOutboundStreams = 8
/** How long a lease's ticket lasts; the holder renews at each report. */
export const leaseTtlMs = 10_000
/** How often a holder reports its direct requests (and renews its leases). */
export const leaseReportIntervalMs = 250
