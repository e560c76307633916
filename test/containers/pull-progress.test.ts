import { readFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { describe, expect, it } from 'vitest'
import { PullProgressParser, parseByteSize } from '../../containers/pull-progress.ts'
import type { PullProgress } from '../../containers/types.ts'

const fixtures = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'vllm', 'pull')

async function parse(file: string, chunkSize?: number): Promise<PullProgress[]> {
  const text = await readFile(join(fixtures, file), 'utf8')
  const parser = new PullProgressParser('img')
  const out: PullProgress[] = []
  const step = chunkSize ?? text.length
  for (let i = 0; i < text.length; i += step) out.push(...parser.push(text.slice(i, i + step)))
  out.push(...parser.end(), parser.finished())
  return out
}

describe('pull progress from the CLIs output', () => {
  it('reads sizes in the units both CLIs print', () => {
    expect(parseByteSize('1.8MiB')).toBe(Math.round(1.8 * 1024 ** 2))
    expect(parseByteSize('163.0b')).toBe(163)
    expect(parseByteSize('29.54MB')).toBe(29_540_000)
    expect(parseByteSize('2.1GB')).toBe(2_100_000_000)
    expect(parseByteSize('512kB')).toBe(512_000)
    expect(parseByteSize('lots')).toBeNull()
  })

  it('Podman without a terminal: layer by layer, then writing, then done', async () => {
    const reports = await parse('podman-4.3-plain.txt')
    expect(reports.map((r) => r.phase)).toEqual([
      'resolving',
      'resolving',
      'downloading',
      'writing',
      'writing',
      'writing',
      'done',
    ])
    const blob = reports.find((r) => r.phase === 'downloading')!
    expect(blob).toMatchObject({ layersTotal: 1, layersDone: 0, fraction: 0, bytesTotal: null })
    expect(reports.at(-1)).toMatchObject({ layersTotal: 1, layersDone: 1, fraction: 1 })
  })

  it('Podman on a terminal: byte counts from its progress bars, through carriage returns and ANSI moves', async () => {
    for (const chunk of [undefined, 7]) {
      const reports = await parse('podman-4.3-terminal.txt', chunk)
      const bars = reports.filter((r) => r.bytesTotal != null && r.phase === 'downloading')
      expect(bars[0]).toMatchObject({
        layersTotal: 1,
        bytesDone: Math.round(1.8 * 1024 ** 2),
        bytesTotal: Math.round(2.9 * 1024 ** 2),
      })
      expect(bars[0]!.fraction).toBeCloseTo(1.8 / 2.9, 3)
      expect(reports.some((r) => r.line === 'Copying blob b64b0f02ce92 done' && r.layersDone === 1)).toBe(
        true,
      )
      expect(reports.at(-1)).toMatchObject({ phase: 'done', fraction: 1, layersDone: 1 })
    }
  })

  it('Docker without a terminal: three layers counted as they complete', async () => {
    const reports = await parse('docker-plain.txt')
    expect(reports[0]).toMatchObject({ phase: 'resolving', layersTotal: 0 })
    const fractions = reports.filter((r) => r.phase === 'downloading').map((r) => r.fraction)
    expect(fractions.at(0)).toBe(0)
    expect(fractions).toContain(1 / 3)
    expect(fractions).toContain(2 / 3)
    expect(reports.at(-1)).toMatchObject({ phase: 'done', layersTotal: 3, layersDone: 3, fraction: 1 })
  })

  it('Docker on a terminal: bytes over every layer, extracting, done', async () => {
    for (const chunk of [undefined, 5]) {
      const reports = await parse('docker-terminal.txt', chunk)
      const half = reports.find((r) => r.line.includes('1.05GB/2.1GB'))!
      // The first layer is complete (29.54 MB), the second half way (1.05 of 2.1 GB).
      expect(half).toMatchObject({
        phase: 'downloading',
        bytesDone: 29_540_000 + 1_050_000_000,
        bytesTotal: 2_129_540_000,
      })
      expect(half.fraction).toBeCloseTo(1_079_540_000 / 2_129_540_000, 6)
      expect(reports.some((r) => r.phase === 'extracting')).toBe(true)
      expect(reports.at(-1)).toMatchObject({ phase: 'done', layersTotal: 2, layersDone: 2, fraction: 1 })
    }
  })
})
