import fc from 'fast-check'
import type { CapabilityReport } from '../../mesh/region-messages.ts'

/**
 * Shared settings of the fuzz suites (test/fuzz/README.md). A fixed seed by default, so a failure
 * replays; `FUZZ_SEED=n` changes it, `FUZZ_RUNS=k` multiplies every property's run count (a deep run).
 */

export const fuzzSeed = envNumber('FUZZ_SEED', 20_261_124)
export const fuzzRunsFactor = envNumber('FUZZ_RUNS', 1)

function envNumber(name: string, fallback: number): number {
  const text = process.env[name]
  if (text == null || text === '') return fallback
  const n = Number(text)
  if (!Number.isFinite(n) || n <= 0) throw new Error(`${name} must be a positive number, not ${text}`)
  return n
}

/** Prints the seed once per suite: a failure's report also names it, with the shrunk input. */
export function announceFuzz(suite: string): void {
  console.info(`fuzz ${suite}: seed ${fuzzSeed} (FUZZ_SEED), runs x${fuzzRunsFactor} (FUZZ_RUNS)`)
}

/**
 * fast-check parameters for one property: `numRuns` scaled by FUZZ_RUNS, and for async properties
 * a per-run `timeoutMs` so an input that hangs the code under test fails the property (named, shrunk).
 */
export function fuzzParams<T>(numRuns: number, timeoutMs?: number): fc.Parameters<T> {
  return {
    seed: fuzzSeed,
    numRuns: Math.max(1, Math.round(numRuns * fuzzRunsFactor)),
    ...(timeoutMs != null ? { timeout: timeoutMs } : {}),
  }
}

/** Each test's time limit: vitest's 30 s, scaled with FUZZ_RUNS (every property bounds its runs too). */
export const fuzzTimeoutMs = Math.round(30_000 * Math.max(1, fuzzRunsFactor))

type Mutation =
  | { kind: 'flip'; at: number; bit: number }
  | { kind: 'set'; at: number; byte: number }
  | { kind: 'insert'; at: number; bytes: Uint8Array }
  | { kind: 'delete'; at: number; length: number }
  | { kind: 'truncate'; at: number }

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ kind: fc.constant('set' as const), at: fc.nat(), byte: fc.integer({ min: 0, max: 255 }) }),
  fc.record({
    kind: fc.constant('insert' as const),
    at: fc.nat(),
    bytes: fc.uint8Array({ minLength: 1, maxLength: 8 }),
  }),
  fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), length: fc.integer({ min: 1, max: 8 }) }),
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }),
)

function applyMutation(bytes: Uint8Array, m: Mutation): Uint8Array {
  const at = bytes.byteLength === 0 ? 0 : m.at % bytes.byteLength
  switch (m.kind) {
    case 'flip': {
      const out = bytes.slice()
      if (out.byteLength > 0) out[at] = out[at]! ^ (1 << m.bit)
      return out
    }
    case 'set': {
      const out = bytes.slice()
      if (out.byteLength > 0) out[at] = m.byte
      return out
    }
    case 'insert':
      return concatBytes([bytes.subarray(0, at), m.bytes, bytes.subarray(at)])
    case 'delete':
      return concatBytes([bytes.subarray(0, at), bytes.subarray(at + m.length)])
    case 'truncate':
      return bytes.slice(0, at)
  }
}

/** Valid bytes with one to four byte-level mutations: the inputs that get past a first glance. */
export function mutated(valid: fc.Arbitrary<Uint8Array>): fc.Arbitrary<Uint8Array> {
  return fc
    .tuple(valid, fc.array(mutation, { minLength: 1, maxLength: 4 }))
    .map(([bytes, ms]) => ms.reduce(applyMutation, bytes))
}

export function concatBytes(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0))
  let o = 0
  for (const p of parts) {
    out.set(p, o)
    o += p.byteLength
  }
  return out
}

/** Unsigned LEB128, as libp2p's length prefixes and the infer frames use. */
export function varint(n: number): Uint8Array {
  const out: number[] = []
  let v = n
  while (v >= 0x80) {
    out.push((v % 0x80) | 0x80)
    v = Math.floor(v / 0x80)
  }
  out.push(v)
  return Uint8Array.from(out)
}

/** Lengths a hostile peer claims: just past a limit, and near 2^32 and 2^53. */
export function hugeLengths(limit: number): fc.Arbitrary<number> {
  return fc.oneof(
    fc.integer({ min: limit + 1, max: limit + 64 }),
    fc.integer({ min: 2 ** 32 - 64, max: 2 ** 32 + 64 }),
    fc.integer({ min: 2 ** 53 - 1024, max: 2 ** 53 - 1 }),
  )
}

/** Values CBOR can carry that strict decoding accepts: what a peer could send in a map. */
export const cborValue: fc.Arbitrary<unknown> = fc.letrec<{ value: unknown }>((tie) => ({
  value: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    fc.boolean(),
    fc.constant(null),
    fc.integer(),
    fc.maxSafeNat(),
    // cborg writes -0 as the integer 0 (RFC 8949 deterministic encoding allows it): no peer sends -0.
    fc.double({ noNaN: true, noDefaultInfinity: true }).filter((x) => !Object.is(x, -0)),
    fc.string({ unit: 'grapheme', maxLength: 40 }),
    fc.uint8Array({ maxLength: 40 }),
    fc.array(tie('value'), { maxLength: 5 }),
    fc.dictionary(fc.string({ maxLength: 12 }), tie('value'), { maxKeys: 5 }),
  ),
})).value

/** A map with some of `keys` (good values from `good`, or any value) and some stray keys. */
export function fuzzedMap(
  good: Record<string, fc.Arbitrary<unknown>>,
): fc.Arbitrary<Record<string, unknown>> {
  const fields = Object.fromEntries(
    Object.entries(good).map(([k, arb]) => [k, fc.oneof({ weight: 4, arbitrary: arb }, cborValue)]),
  )
  return fc
    .tuple(
      fc.record(fields, { requiredKeys: [] }),
      fc.dictionary(fc.string({ maxLength: 12 }), cborValue, { maxKeys: 2 }),
      fc.boolean(),
    )
    .map(([known, stray, addStray]) => (addStray ? { ...stray, ...known } : known))
}

/** JSON nested `depth` deep: valid, and deeper than a recursive serialiser (JSON.stringify) can go. */
export function deepJson(depth: number): string {
  return `${'['.repeat(depth)}${']'.repeat(depth)}`
}

/** A capability report of a CPU-only machine that can run the embedded engine (what `garage node` sends). */
export function cpuNodeReport(peerId: string, region: string): CapabilityReport {
  return {
    v: 1,
    peerId,
    region,
    daemonVersion: 'fuzz',
    issuedAt: Date.now(),
    hardware: { gpus: [], ramMiB: 16_384, cpuCores: 8 },
    engines: ['llamacpp'],
    vramCapMiB: 0,
    ramCapMiB: 8_192,
    hostPolicy: { state: 'clear' },
    rayOptIn: false,
  }
}
