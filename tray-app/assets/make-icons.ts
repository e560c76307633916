import { writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { deflateSync, inflateSync } from 'node:zlib'
import { type TrayState, trayStates } from '../state.ts'

/**
 * Builds the tray icons: one per state, 16 px (`tray-<state>.png`) and 32 px (`@2x`), drawn
 * from shapes with 4×4 supersampling and written by a small PNG encoder (8-bit RGBA, no filter).
 * Run `node tray-app/assets/make-icons.ts` after changing a shape; the PNGs are committed.
 */

// ---- PNG (RFC 2083): signature, IHDR, one IDAT, IEND ----

const pngSignature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])

const crcTable = Array.from({ length: 256 }, (_, n) => {
  let c = n
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1
  return c >>> 0
})

export function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff
  for (const b of bytes) c = (crcTable[(c ^ b) & 0xff] as number) ^ (c >>> 8)
  return (c ^ 0xffffffff) >>> 0
}

function chunk(type: string, data: Uint8Array): Buffer {
  const head = Buffer.alloc(8)
  head.writeUInt32BE(data.length, 0)
  head.write(type, 4, 'latin1')
  const crc = Buffer.alloc(4)
  crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])), 0)
  return Buffer.concat([head, data, crc])
}

/** `rgba`: width × height × 4 bytes, rows top to bottom, straight (not premultiplied) alpha. */
export function encodePng(width: number, height: number, rgba: Uint8Array): Buffer {
  if (rgba.length !== width * height * 4) throw new Error('rgba must hold width × height × 4 bytes')
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(width, 0)
  ihdr.writeUInt32BE(height, 4)
  ihdr[8] = 8 // bit depth
  ihdr[9] = 6 // colour type: RGBA
  // compression 0, filter method 0, no interlace: already zero
  const stride = width * 4
  const raw = Buffer.alloc((stride + 1) * height)
  for (let y = 0; y < height; y++) {
    raw[y * (stride + 1)] = 0 // filter: none
    raw.set(rgba.subarray(y * stride, (y + 1) * stride), y * (stride + 1) + 1)
  }
  return Buffer.concat([
    pngSignature,
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(raw, { level: 9 })),
    chunk('IEND', new Uint8Array(0)),
  ])
}

/** Reads back what encodePng writes (checking every CRC); for tests and this script's check. */
export function decodePng(png: Uint8Array): { width: number; height: number; rgba: Uint8Array } {
  const buf = Buffer.from(png)
  if (!buf.subarray(0, 8).equals(pngSignature)) throw new Error('not a PNG')
  let offset = 8
  let width = 0
  let height = 0
  const idat: Buffer[] = []
  while (offset < buf.length) {
    const length = buf.readUInt32BE(offset)
    const type = buf.toString('latin1', offset + 4, offset + 8)
    const data = buf.subarray(offset + 8, offset + 8 + length)
    if (crc32(buf.subarray(offset + 4, offset + 8 + length)) !== buf.readUInt32BE(offset + 8 + length))
      throw new Error(`bad CRC in ${type}`)
    if (type === 'IHDR') {
      width = data.readUInt32BE(0)
      height = data.readUInt32BE(4)
      if (data[8] !== 8 || data[9] !== 6 || data[12] !== 0) throw new Error('only 8-bit RGBA, not interlaced')
    } else if (type === 'IDAT') idat.push(data)
    offset += 12 + length
  }
  const raw = inflateSync(Buffer.concat(idat))
  const stride = width * 4
  const rgba = new Uint8Array(stride * height)
  for (let y = 0; y < height; y++) {
    if (raw[y * (stride + 1)] !== 0) throw new Error('only filter type 0')
    rgba.set(raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1)), y * stride)
  }
  return { width, height, rgba }
}

// ---- the shapes, in unit coordinates (0..1, y down) ----

type Shape = (u: number, v: number) => boolean
type Rgb = readonly [number, number, number]

const dist = (u: number, v: number, cu = 0.5, cv = 0.5): number => Math.hypot(u - cu, v - cv)
const disc =
  (r: number): Shape =>
  (u, v) =>
    dist(u, v) <= r
const ring =
  (inner: number, outer: number): Shape =>
  (u, v) => {
    const d = dist(u, v)
    return d >= inner && d <= outer
  }
const rect =
  (u0: number, v0: number, u1: number, v1: number): Shape =>
  (u, v) =>
    u >= u0 && u <= u1 && v >= v0 && v <= v1

const white: Rgb = [255, 255, 255]

/** Each state: layers painted in order (a darker rim keeps the icon visible on light and dark panels). */
const designs: Record<TrayState, Array<{ shape: Shape; color: Rgb }>> = {
  serving: [
    { shape: disc(0.47), color: [21, 128, 61] },
    { shape: disc(0.4), color: [34, 197, 94] },
  ],
  paused: [
    { shape: disc(0.47), color: [180, 83, 9] },
    { shape: disc(0.4), color: [245, 158, 11] },
    { shape: rect(0.31, 0.27, 0.44, 0.73), color: white },
    { shape: rect(0.56, 0.27, 0.69, 0.73), color: white },
  ],
  starting: [
    {
      // A ring with a gap at the top right: "on its way".
      shape: (u, v) =>
        ring(0.26, 0.46)(u, v) && !(u > 0.5 && v < 0.5 && Math.abs(u - 0.5) > Math.abs(v - 0.5) * 0.4),
      color: [37, 99, 235],
    },
  ],
  error: [
    { shape: disc(0.47), color: [153, 27, 27] },
    { shape: disc(0.4), color: [239, 68, 68] },
    { shape: rect(0.43, 0.2, 0.57, 0.58), color: white },
    { shape: (u, v) => dist(u, v, 0.5, 0.74) <= 0.08, color: white },
  ],
  stopped: [{ shape: ring(0.28, 0.46), color: [120, 128, 140] }],
}

const samples = 4

export function drawIcon(state: TrayState, size: number): Uint8Array {
  const rgba = new Uint8Array(size * size * 4)
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      // Straight-alpha "over" compositing of each layer, by its supersampled coverage.
      let r = 0
      let g = 0
      let b = 0
      let a = 0
      for (const { shape, color } of designs[state]) {
        let hits = 0
        for (let sy = 0; sy < samples; sy++)
          for (let sx = 0; sx < samples; sx++)
            if (shape((x + (sx + 0.5) / samples) / size, (y + (sy + 0.5) / samples) / size)) hits++
        const ca = hits / (samples * samples)
        if (ca === 0) continue
        const na = ca + a * (1 - ca)
        r = (color[0] * ca + r * a * (1 - ca)) / na
        g = (color[1] * ca + g * a * (1 - ca)) / na
        b = (color[2] * ca + b * a * (1 - ca)) / na
        a = na
      }
      const i = (y * size + x) * 4
      rgba[i] = Math.round(r)
      rgba[i + 1] = Math.round(g)
      rgba[i + 2] = Math.round(b)
      rgba[i + 3] = Math.round(a * 255)
    }
  }
  return rgba
}

export const iconSizes = [
  { suffix: '', size: 16 },
  { suffix: '@2x', size: 32 },
] as const

export function iconFiles(): Array<{ name: string; state: TrayState; size: number }> {
  return trayStates.flatMap((state) =>
    iconSizes.map(({ suffix, size }) => ({ name: `tray-${state}${suffix}.png`, state, size })),
  )
}

export async function writeIcons(dir = fileURLToPath(new URL('.', import.meta.url))): Promise<string[]> {
  const written: string[] = []
  for (const { name, state, size } of iconFiles()) {
    const file = join(dir, name)
    await writeFile(file, encodePng(size, size, drawIcon(state, size)))
    written.push(file)
  }
  return written
}

if (process.argv[1] != null && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  for (const file of await writeIcons()) console.log(file)
}
