import { decode, encode } from 'cborg'

/** Strict decoding: no indefinite lengths, undefined, NaN, bigints or duplicate keys from peers. */
const strictDecodeOptions = {
  strict: true,
  allowIndefinite: false,
  allowUndefined: false,
  allowInfinity: false,
  allowNaN: false,
  allowBigInt: false,
  rejectDuplicateMapKeys: true,
  useMaps: false,
} as const

export class CborDecodeError extends Error {
  override name = 'CborDecodeError'
}

/** cborg's default encoding is deterministic (sorted map keys, shortest forms). */
export function encodeCanonical(value: unknown): Uint8Array {
  return encode(value)
}

/** Decodes and checks the bytes are the canonical encoding of what they decode to. */
export function decodeCanonical(bytes: Uint8Array): unknown {
  let value: unknown
  try {
    value = decode(bytes, strictDecodeOptions)
  } catch (err) {
    throw new CborDecodeError(`invalid CBOR: ${(err as Error).message}`)
  }
  let again: Uint8Array
  try {
    again = encode(value)
  } catch (err) {
    // The decoder takes any depth a 16 KiB message holds; re-encoding thousands of levels runs out of stack.
    throw new CborDecodeError(`CBOR nests too deeply to check: ${(err as Error).message}`)
  }
  if (again.byteLength !== bytes.byteLength || !again.every((b, i) => b === bytes[i])) {
    throw new CborDecodeError('CBOR is not in canonical form')
  }
  return value
}

/** A peer's value in an error message: String() throws on a decoded map with a `toString` key. */
export function printable(v: unknown): string {
  if (v instanceof Uint8Array) return 'bytes'
  if (Array.isArray(v)) return 'a list'
  return typeof v === 'object' && v !== null ? 'a map' : String(v)
}
