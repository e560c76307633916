import { createHash } from 'node:crypto'
import { open } from 'node:fs/promises'
import { endianness } from 'node:os'
import { GarageError } from '../../../core/errors.ts'

/**
 * GGUF v3, the file format llama.cpp loads: a little-endian header (magic, version, counts), typed
 * metadata key/values, tensor infos, then the tensor data, each tensor aligned to `general.alignment`.
 * Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
 */

export const ggufMagic = 'GGUF'
export const ggufVersion = 3
export const ggufDefaultAlignment = 32
/** llama.cpp's GGML_MAX_NAME is 64 bytes including the terminating NUL. */
export const ggufMaxTensorNameBytes = 63
/** GGML_MAX_DIMS. */
export const ggufMaxTensorDims = 4

/** The value type ids GGUF writes before each metadata value (gguf_type in ggml). */
export const ggufValueTypeIds = {
  uint8: 0,
  int8: 1,
  uint16: 2,
  int16: 3,
  uint32: 4,
  int32: 5,
  float32: 6,
  bool: 7,
  string: 8,
  array: 9,
  uint64: 10,
  int64: 11,
  float64: 12,
} as const

export type GgufValueTypeName = keyof typeof ggufValueTypeIds
export type GgufScalarTypeName = Exclude<GgufValueTypeName, 'array'>
type GgufNumberTypeName = Exclude<GgufScalarTypeName, 'bool' | 'string' | 'uint64' | 'int64'>

export type GgufScalar = number | bigint | boolean | string

/** One typed metadata value. Arrays hold scalars of one type (nested arrays are not supported). */
export type GgufMetadataValue =
  | { type: GgufNumberTypeName; value: number }
  | { type: 'uint64' | 'int64'; value: number | bigint }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string }
  | { type: 'array'; itemType: GgufScalarTypeName; value: readonly GgufScalar[] }

/** Tensor element types whose size is one fixed number of bytes (ggml_type ids). */
export const ggmlTensorTypes = {
  F32: { id: 0, bytes: 4 },
  F16: { id: 1, bytes: 2 },
  I8: { id: 24, bytes: 1 },
  I16: { id: 25, bytes: 2 },
  I32: { id: 26, bytes: 4 },
  I64: { id: 27, bytes: 8 },
  F64: { id: 28, bytes: 8 },
  BF16: { id: 30, bytes: 2 },
} as const

export type GgmlTensorTypeName = keyof typeof ggmlTensorTypes

/** Little-endian element bytes; an F32 tensor may pass a Float32Array. */
export type GgufTensorData = Float32Array | Uint8Array

export interface GgufTensor {
  name: string
  /** ggml order: dims[0] (ne[0]) is the innermost, contiguous dimension. */
  dims: readonly number[]
  /** Default F32. */
  type?: GgmlTensorTypeName
  /** The elements, or a function making them when the writer reaches this tensor (keeps memory flat). */
  data: GgufTensorData | (() => GgufTensorData)
}

export interface GgufFile {
  /** Written in this order. `general.alignment` is added (uint32) unless given. */
  metadata: Record<string, GgufMetadataValue>
  tensors: readonly GgufTensor[]
  /** Default 32, or the `general.alignment` given in metadata. */
  alignment?: number
}

/** What a header says, as read back by `decodeGgufHeader`. */
export interface GgufHeader {
  version: number
  metadata: Record<string, GgufMetadataValue>
  tensors: { name: string; dims: number[]; typeId: number; offset: bigint }[]
  alignment: number
  /** Where the tensor data section starts, in bytes from the start of the file. */
  dataOffset: number
}

/** A file that is not valid GGUF, or input the writer cannot encode. */
export class GgufFormatError extends GarageError {
  constructor(message: string) {
    super(message, 'GGUF_FORMAT')
  }
}

const utf8 = new TextEncoder()

/** A growable little-endian byte buffer. */
class ByteWriter {
  private bytes = new Uint8Array(4096)
  private view = new DataView(this.bytes.buffer)
  length = 0

  private reserve(n: number): number {
    const at = this.length
    if (at + n > this.bytes.length) {
      const next = new Uint8Array(Math.max(this.bytes.length * 2, at + n))
      next.set(this.bytes.subarray(0, at))
      this.bytes = next
      this.view = new DataView(next.buffer)
    }
    this.length += n
    return at
  }

  u8(v: number): void {
    const at = this.reserve(1) // reserve first: it may replace the view
    this.view.setUint8(at, v)
  }
  i8(v: number): void {
    const at = this.reserve(1)
    this.view.setInt8(at, v)
  }
  u16(v: number): void {
    const at = this.reserve(2)
    this.view.setUint16(at, v, true)
  }
  i16(v: number): void {
    const at = this.reserve(2)
    this.view.setInt16(at, v, true)
  }
  u32(v: number): void {
    const at = this.reserve(4)
    this.view.setUint32(at, v, true)
  }
  i32(v: number): void {
    const at = this.reserve(4)
    this.view.setInt32(at, v, true)
  }
  u64(v: number | bigint): void {
    const at = this.reserve(8)
    this.view.setBigUint64(at, BigInt(v), true)
  }
  i64(v: number | bigint): void {
    const at = this.reserve(8)
    this.view.setBigInt64(at, BigInt(v), true)
  }
  f32(v: number): void {
    const at = this.reserve(4)
    this.view.setFloat32(at, v, true)
  }
  f64(v: number): void {
    const at = this.reserve(8)
    this.view.setFloat64(at, v, true)
  }
  string(s: string): void {
    const b = utf8.encode(s)
    this.u64(b.length)
    const at = this.reserve(b.length)
    this.bytes.set(b, at)
  }
  zeros(n: number): void {
    const at = this.reserve(n)
    this.bytes.fill(0, at, this.length)
  }
  result(): Uint8Array {
    return this.bytes.subarray(0, this.length)
  }
}

function integerIn(v: number | bigint, min: bigint, max: bigint): boolean {
  if (typeof v === 'number' && !Number.isInteger(v)) return false
  const b = BigInt(v)
  return b >= min && b <= max
}

const integerRanges: Record<string, [bigint, bigint]> = {
  uint8: [0n, 0xffn],
  int8: [-0x80n, 0x7fn],
  uint16: [0n, 0xffffn],
  int16: [-0x8000n, 0x7fffn],
  uint32: [0n, 0xffff_ffffn],
  int32: [-0x8000_0000n, 0x7fff_ffffn],
  uint64: [0n, 0xffff_ffff_ffff_ffffn],
  int64: [-0x8000_0000_0000_0000n, 0x7fff_ffff_ffff_ffffn],
}

function writeScalar(w: ByteWriter, type: GgufScalarTypeName, value: GgufScalar, key: string): void {
  const range = integerRanges[type]
  const expected =
    range != null
      ? ['number', 'bigint']
      : type === 'bool'
        ? ['boolean']
        : type === 'string'
          ? ['string']
          : ['number']
  if (
    !expected.includes(typeof value) ||
    (range != null && !integerIn(value as number | bigint, range[0], range[1]))
  )
    throw new GgufFormatError(`metadata ${key}: ${String(value)} is not a ${type}`)
  switch (type) {
    case 'uint8':
      w.u8(Number(value))
      break
    case 'int8':
      w.i8(Number(value))
      break
    case 'uint16':
      w.u16(Number(value))
      break
    case 'int16':
      w.i16(Number(value))
      break
    case 'uint32':
      w.u32(Number(value))
      break
    case 'int32':
      w.i32(Number(value))
      break
    case 'uint64':
      w.u64(value as number | bigint)
      break
    case 'int64':
      w.i64(value as number | bigint)
      break
    case 'float32':
      w.f32(value as number)
      break
    case 'float64':
      w.f64(value as number)
      break
    case 'bool':
      w.u8(value ? 1 : 0)
      break
    case 'string':
      w.string(value as string)
      break
  }
}

function writeValue(w: ByteWriter, key: string, v: GgufMetadataValue): void {
  w.u32(ggufValueTypeIds[v.type])
  if (v.type !== 'array') {
    writeScalar(w, v.type, v.value, key)
    return
  }
  if ((v.itemType as string) === 'array')
    throw new GgufFormatError(`metadata ${key}: nested arrays are not supported`)
  w.u32(ggufValueTypeIds[v.itemType])
  w.u64(v.value.length)
  for (const item of v.value) writeScalar(w, v.itemType, item, key)
}

function padTo(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment
}

function elementCount(dims: readonly number[]): number {
  return dims.reduce((a, b) => a * b, 1)
}

/** A tensor's data size in bytes, before alignment padding. */
export function ggufTensorBytes(tensor: Pick<GgufTensor, 'dims' | 'type'>): number {
  return elementCount(tensor.dims) * ggmlTensorTypes[tensor.type ?? 'F32'].bytes
}

function resolveAlignment(file: GgufFile): number {
  const given = file.metadata['general.alignment']
  if (given != null && given.type !== 'uint32')
    throw new GgufFormatError('metadata general.alignment must be a uint32')
  const alignment = file.alignment ?? (given?.value as number | undefined) ?? ggufDefaultAlignment
  if (given != null && given.value !== alignment)
    throw new GgufFormatError(`alignment ${alignment} differs from general.alignment ${given.value}`)
  if (!Number.isInteger(alignment) || alignment < 1 || (alignment & (alignment - 1)) !== 0)
    throw new GgufFormatError(`alignment must be a power of two, not ${alignment}`)
  return alignment
}

function checkTensor(t: GgufTensor, seen: Set<string>): void {
  const nameBytes = utf8.encode(t.name).length
  if (nameBytes === 0 || nameBytes > ggufMaxTensorNameBytes)
    throw new GgufFormatError(
      `tensor name ${JSON.stringify(t.name)} must be 1..${ggufMaxTensorNameBytes} bytes`,
    )
  if (seen.has(t.name)) throw new GgufFormatError(`duplicate tensor ${t.name}`)
  seen.add(t.name)
  if (t.dims.length < 1 || t.dims.length > ggufMaxTensorDims)
    throw new GgufFormatError(`tensor ${t.name}: 1..${ggufMaxTensorDims} dimensions, not ${t.dims.length}`)
  if (!t.dims.every((d) => Number.isSafeInteger(d) && d >= 1))
    throw new GgufFormatError(`tensor ${t.name}: dimensions must be positive integers, not [${t.dims}]`)
  if (ggmlTensorTypes[t.type ?? 'F32'] == null)
    throw new GgufFormatError(`tensor ${t.name}: unknown type ${t.type}`)
}

/** The header (through the padding before the data section) and each tensor's data offset. */
export function encodeGgufHeader(file: GgufFile): {
  header: Uint8Array
  alignment: number
  offsets: number[]
} {
  const alignment = resolveAlignment(file)
  const metadata: Record<string, GgufMetadataValue> = { ...file.metadata }
  if (metadata['general.alignment'] == null)
    metadata['general.alignment'] = { type: 'uint32', value: alignment }
  const w = new ByteWriter()
  w.u32(0x46554747) // "GGUF" read as a little-endian uint32
  w.u32(ggufVersion)
  w.u64(file.tensors.length)
  w.u64(Object.keys(metadata).length)
  for (const [key, value] of Object.entries(metadata)) {
    if (key === '') throw new GgufFormatError('metadata keys must not be empty')
    w.string(key)
    writeValue(w, key, value)
  }
  const offsets: number[] = []
  const seen = new Set<string>()
  let offset = 0
  for (const t of file.tensors) {
    checkTensor(t, seen)
    w.string(t.name)
    w.u32(t.dims.length)
    for (const d of t.dims) w.u64(d)
    w.u32(ggmlTensorTypes[t.type ?? 'F32'].id)
    w.u64(offset)
    offsets.push(offset)
    offset += padTo(ggufTensorBytes(t), alignment)
  }
  w.zeros(padTo(w.length, alignment) - w.length)
  return { header: w.result(), alignment, offsets }
}

const littleEndianHost = endianness() === 'LE'

function tensorBytes(t: GgufTensor): Uint8Array {
  const data = typeof t.data === 'function' ? t.data() : t.data
  const expected = ggufTensorBytes(t)
  let bytes: Uint8Array
  if (data instanceof Float32Array) {
    if ((t.type ?? 'F32') !== 'F32') throw new GgufFormatError(`tensor ${t.name}: a Float32Array is F32 data`)
    bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
    if (!littleEndianHost) {
      bytes = new Uint8Array(data.byteLength)
      const view = new DataView(bytes.buffer)
      for (let i = 0; i < data.length; i++) view.setFloat32(i * 4, data[i] as number, true)
    }
  } else bytes = data
  if (bytes.byteLength !== expected)
    throw new GgufFormatError(`tensor ${t.name}: ${bytes.byteLength} data bytes, expected ${expected}`)
  return bytes
}

/** Each piece of the file in order: header, then each tensor's data followed by its padding. */
function* ggufChunks(file: GgufFile): Generator<Uint8Array> {
  const { header, alignment } = encodeGgufHeader(file)
  yield header
  for (const t of file.tensors) {
    const bytes = tensorBytes(t)
    yield bytes
    const pad = padTo(bytes.byteLength, alignment) - bytes.byteLength
    if (pad > 0) yield new Uint8Array(pad)
  }
}

/** The whole file in memory. */
export function encodeGguf(file: GgufFile): Uint8Array {
  const chunks = [...ggufChunks(file)]
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.byteLength, 0))
  let at = 0
  for (const c of chunks) {
    out.set(c, at)
    at += c.byteLength
  }
  return out
}

export interface GgufWriteResult {
  bytes: number
  /** Hex sha256 of the file, computed while writing. */
  sha256: string
}

/**
 * Streams the file to `path` (created or truncated), one tensor at a time, and fsyncs it.
 * Lazy tensor data (`data: () => ...`) is made only when reached, so memory stays at one tensor.
 */
export async function writeGgufFile(
  path: string,
  file: GgufFile,
  options: { signal?: AbortSignal } = {},
): Promise<GgufWriteResult> {
  const hash = createHash('sha256')
  let bytes = 0
  const handle = await open(path, 'w', 0o644)
  try {
    for (const chunk of ggufChunks(file)) {
      options.signal?.throwIfAborted()
      hash.update(chunk)
      await handle.write(chunk)
      bytes += chunk.byteLength
    }
    await handle.sync()
  } finally {
    await handle.close()
  }
  return { bytes, sha256: hash.digest('hex') }
}

const typeNamesById = Object.fromEntries(Object.entries(ggufValueTypeIds).map(([k, v]) => [v, k])) as Record<
  number,
  GgufValueTypeName
>
const utf8Decoder = new TextDecoder('utf-8', { fatal: true })

/** Reads the header of a GGUF v2/v3 file (the bytes through the tensor infos), keeping value types. */
export function decodeGgufHeader(bytes: Uint8Array): GgufHeader {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  let at = 0
  const need = (n: number): number => {
    if (at + n > bytes.byteLength) throw new GgufFormatError(`truncated GGUF header at byte ${at}`)
    const start = at
    at += n
    return start
  }
  const u32 = (): number => view.getUint32(need(4), true)
  const u64 = (): bigint => view.getBigUint64(need(8), true)
  const count = (): number => {
    const n = u64()
    if (n > BigInt(bytes.byteLength)) throw new GgufFormatError(`implausible count ${n} at byte ${at - 8}`)
    return Number(n)
  }
  const str = (): string => {
    const n = count()
    return utf8Decoder.decode(bytes.subarray(need(n), at))
  }
  const scalar = (type: GgufValueTypeName): GgufScalar => {
    switch (type) {
      case 'uint8':
        return view.getUint8(need(1))
      case 'int8':
        return view.getInt8(need(1))
      case 'uint16':
        return view.getUint16(need(2), true)
      case 'int16':
        return view.getInt16(need(2), true)
      case 'uint32':
        return u32()
      case 'int32':
        return view.getInt32(need(4), true)
      case 'uint64':
        return u64()
      case 'int64':
        return view.getBigInt64(need(8), true)
      case 'float32':
        return view.getFloat32(need(4), true)
      case 'float64':
        return view.getFloat64(need(8), true)
      case 'bool':
        return view.getUint8(need(1)) !== 0
      case 'string':
        return str()
      default:
        throw new GgufFormatError(`nested arrays are not supported (byte ${at})`)
    }
  }
  const typeName = (): GgufValueTypeName => {
    const id = u32()
    const name = typeNamesById[id]
    if (name == null) throw new GgufFormatError(`unknown value type ${id} at byte ${at - 4}`)
    return name
  }

  if (u32() !== 0x46554747) throw new GgufFormatError('not a GGUF file (bad magic)')
  const version = u32()
  if (version !== 2 && version !== 3) throw new GgufFormatError(`unsupported GGUF version ${version}`)
  const tensorCount = count()
  const kvCount = count()
  const metadata: Record<string, GgufMetadataValue> = {}
  for (let i = 0; i < kvCount; i++) {
    const key = str()
    const type = typeName()
    if (type === 'array') {
      const itemType = typeName()
      const n = count()
      const value: GgufScalar[] = []
      for (let j = 0; j < n; j++) value.push(scalar(itemType))
      metadata[key] = { type, itemType: itemType as GgufScalarTypeName, value }
    } else metadata[key] = { type, value: scalar(type) } as GgufMetadataValue
  }
  const tensors: GgufHeader['tensors'] = []
  for (let i = 0; i < tensorCount; i++) {
    const name = str()
    const nDims = u32()
    if (nDims > ggufMaxTensorDims) throw new GgufFormatError(`tensor ${name}: ${nDims} dimensions`)
    const dims: number[] = []
    for (let d = 0; d < nDims; d++) dims.push(Number(u64()))
    tensors.push({ name, dims, typeId: u32(), offset: u64() })
  }
  const alignmentValue = metadata['general.alignment']
  const alignment = alignmentValue?.type === 'uint32' ? alignmentValue.value : ggufDefaultAlignment
  return { version, metadata, tensors, alignment, dataOffset: padTo(at, alignment) }
}
