import { createHash } from 'node:crypto'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { readGgufFileInfo } from 'node-llama-cpp'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  decodeGgufHeader,
  encodeGguf,
  encodeGgufHeader,
  type GgufFile,
  GgufFormatError,
  type GgufMetadataValue,
  writeGgufFile,
} from '../../../daemon/engines/llamacpp/gguf.ts'

const everyType: Record<string, GgufMetadataValue> = {
  'test.u8': { type: 'uint8', value: 255 },
  'test.i8': { type: 'int8', value: -128 },
  'test.u16': { type: 'uint16', value: 65_535 },
  'test.i16': { type: 'int16', value: -32_768 },
  'test.u32': { type: 'uint32', value: 4_294_967_295 },
  'test.i32': { type: 'int32', value: -2_147_483_648 },
  'test.u64': { type: 'uint64', value: 18_446_744_073_709_551_615n },
  'test.i64': { type: 'int64', value: -9_007_199_254_740_993n },
  'test.f32': { type: 'float32', value: 0.25 },
  'test.f64': { type: 'float64', value: Math.PI },
  'test.yes': { type: 'bool', value: true },
  'test.no': { type: 'bool', value: false },
  'test.text': { type: 'string', value: 'héllo 🙂\n"quoted"' },
  'test.empty': { type: 'string', value: '' },
  'test.strings': { type: 'array', itemType: 'string', value: ['a', 'bc', ''] },
  'test.ints': { type: 'array', itemType: 'int32', value: [1, -2, 3] },
  'test.floats': { type: 'array', itemType: 'float32', value: [0.5, -1.5] },
  'test.none': { type: 'array', itemType: 'uint8', value: [] },
}

function sampleFile(): GgufFile {
  return {
    metadata: { 'general.architecture': { type: 'string', value: 'llama' }, ...everyType },
    tensors: [
      { name: 'a', dims: [3], data: new Float32Array([1, 2, 3]) },
      { name: 'b.weight', dims: [2, 5], data: () => Float32Array.from({ length: 10 }, (_, i) => i / 4) },
      { name: 'c', dims: [1, 1, 1, 7], type: 'I8', data: new Uint8Array([1, 2, 3, 4, 5, 6, 255]) },
    ],
  }
}

describe('GGUF v3 writer', () => {
  let dir: string
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-gguf-'))
  })
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('writes the magic, version 3, the counts, and adds general.alignment', () => {
    const bytes = encodeGguf(sampleFile())
    const view = new DataView(bytes.buffer, bytes.byteOffset)
    expect(new TextDecoder().decode(bytes.subarray(0, 4))).toBe('GGUF')
    expect(view.getUint32(4, true)).toBe(3)
    expect(view.getBigUint64(8, true)).toBe(3n) // tensors
    expect(view.getBigUint64(16, true)).toBe(BigInt(Object.keys(everyType).length + 2)) // + arch, alignment
    const header = decodeGgufHeader(bytes)
    expect(header.metadata['general.alignment']).toEqual({ type: 'uint32', value: 32 })
  })

  it('round-trips every value type with its type', () => {
    const header = decodeGgufHeader(encodeGguf(sampleFile()))
    for (const [key, value] of Object.entries(everyType)) {
      const read = header.metadata[key]
      const normalize = (v: GgufMetadataValue | undefined): unknown =>
        JSON.stringify(v, (_, x) => (typeof x === 'bigint' ? `${x}n` : x))
      if (value.type === 'float32' || (value.type === 'array' && value.itemType === 'float32'))
        expect(read).toEqual(value) // the sample floats are exact in float32
      else if (value.type === 'uint64' || value.type === 'int64')
        expect(read).toEqual({ ...value, value: BigInt(value.value) })
      else expect(normalize(read)).toBe(normalize(value))
    }
  })

  it('aligns the data section and every tensor to 32 bytes, and puts each tensor where its info says', () => {
    const file = sampleFile()
    const bytes = encodeGguf(file)
    const header = decodeGgufHeader(bytes)
    expect(header.dataOffset % 32).toBe(0)
    expect(header.tensors.map((t) => [t.name, t.dims, t.typeId])).toEqual([
      ['a', [3], 0],
      ['b.weight', [2, 5], 0],
      ['c', [1, 1, 1, 7], 24],
    ])
    for (const t of header.tensors) expect(Number(t.offset) % 32).toBe(0)
    const at = (i: number): number => header.dataOffset + Number(header.tensors[i]!.offset)
    const view = new DataView(bytes.buffer, bytes.byteOffset)
    expect([0, 1, 2].map((i) => view.getFloat32(at(0) + i * 4, true))).toEqual([1, 2, 3])
    expect(view.getFloat32(at(1) + 9 * 4, true)).toBe(2.25)
    expect([...bytes.subarray(at(2), at(2) + 7)]).toEqual([1, 2, 3, 4, 5, 6, 255])
    // The file ends with the last tensor's padding.
    expect(bytes.byteLength).toBe(at(2) + 32)
    expect(encodeGgufHeader(file).header.byteLength).toBe(header.dataOffset)
  })

  it('honours a larger alignment', () => {
    const file = { ...sampleFile(), alignment: 64 }
    const header = decodeGgufHeader(encodeGguf(file))
    expect(header.alignment).toBe(64)
    expect(header.dataOffset % 64).toBe(0)
    expect(header.tensors.map((t) => Number(t.offset))).toEqual([0, 64, 128])
  })

  it('streams the same bytes to a file, with their sha256, and node-llama-cpp reads it back', async () => {
    const path = join(dir, 'sample.gguf')
    const result = await writeGgufFile(path, sampleFile())
    const onDisk = await readFile(path)
    expect(onDisk.equals(encodeGguf(sampleFile()))).toBe(true)
    expect(result).toEqual({
      bytes: onDisk.byteLength,
      sha256: createHash('sha256').update(onDisk).digest('hex'),
    })

    const info = await readGgufFileInfo(path, { logWarnings: false })
    expect(info.version).toBe(3)
    const test = (info.metadata as unknown as { test: Record<string, unknown> }).test
    expect(test.u32).toBe(4_294_967_295)
    expect(test.u64).toBe(18_446_744_073_709_551_615n)
    expect(test.i8).toBe(-128)
    expect(test.f64).toBe(Math.PI)
    expect(test.yes).toBe(true)
    expect(test.text).toBe('héllo 🙂\n"quoted"')
    expect(test.strings).toEqual(['a', 'bc', ''])
    expect(test.ints).toEqual([1, -2, 3])
    expect(info.tensorInfo?.map((t) => [t.name, t.dimensions, t.ggmlType, Number(t.offset)])).toEqual([
      ['a', [3], 0, 0],
      ['b.weight', [2, 5], 0, 32],
      ['c', [1, 1, 1, 7], 24, 96],
    ])
  })

  it('refuses what llama.cpp would refuse, naming the problem', () => {
    const bad =
      (change: Partial<GgufFile>): (() => unknown) =>
      () =>
        encodeGguf({ ...sampleFile(), ...change })
    const tensor = { name: 't', dims: [2], data: new Float32Array(2) }
    expect(bad({ tensors: [tensor, tensor] })).toThrow('duplicate tensor t')
    expect(bad({ tensors: [{ ...tensor, data: new Float32Array(3) }] })).toThrow('12 data bytes, expected 8')
    expect(bad({ tensors: [{ ...tensor, name: 'x'.repeat(64) }] })).toThrow('must be 1..63 bytes')
    expect(bad({ tensors: [{ ...tensor, dims: [1, 1, 1, 1, 2] }] })).toThrow('1..4 dimensions')
    expect(bad({ tensors: [{ ...tensor, dims: [0] }] })).toThrow('positive integers')
    expect(bad({ tensors: [{ ...tensor, type: 'F16' }] })).toThrow('a Float32Array is F32 data')
    expect(bad({ metadata: { k: { type: 'uint8', value: 256 } } })).toThrow('256 is not a uint8')
    expect(bad({ metadata: { k: { type: 'int32', value: 1.5 } } })).toThrow('1.5 is not a int32')
    expect(bad({ metadata: { k: { type: 'array', itemType: 'string', value: ['a', 1] } } })).toThrow(
      '1 is not a string',
    )
    expect(bad({ alignment: 24 })).toThrow('power of two')
    expect(bad({ alignment: 64, metadata: { 'general.alignment': { type: 'uint32', value: 32 } } })).toThrow(
      'differs from general.alignment',
    )
    expect(bad({ tensors: [tensor, tensor] })).toThrow(GgufFormatError)
  })

  it('rejects a file that is not GGUF, and a truncated header', () => {
    expect(() => decodeGgufHeader(new TextEncoder().encode('root:x:0:0:root:/root:/bin/bash'))).toThrow(
      'bad magic',
    )
    const bytes = encodeGguf(sampleFile())
    expect(() => decodeGgufHeader(bytes.subarray(0, 100))).toThrow('truncated GGUF header')
  })
})
