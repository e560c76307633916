import type { PullPhase, PullProgress } from './types.ts'

/**
 * Reads what `podman pull` and `docker pull` print and turns it into progress reports.
 *
 * Podman: `Copying blob <id>` once per layer when its output is not a terminal; on a terminal, bars
 * such as `Copying blob b64b0f02ce92 [=====>----] 1.8MiB / 2.9MiB` and `Copying blob <id> done`.
 * Docker: `<id>: Pulling fs layer | Waiting | Downloading [==>  ] 12.3MB/45.6MB | Verifying Checksum |
 * Download complete | Extracting [=>] 1MB/45MB | Pull complete | Already exists`.
 * Terminal output redraws with carriage returns and ANSI cursor moves: both are handled.
 */

interface LayerProgress {
  done: boolean
  bytesDone: number | null
  bytesTotal: number | null
}

// ESC [ ... letter: cursor moves and line erases of a terminal redraw.
// biome-ignore lint/suspicious/noControlCharactersInRegex: ANSI escape sequences start with ESC
const ansiPattern = /\u001b\[[0-9;?]*[A-Za-z]/g

export function stripAnsi(text: string): string {
  return text.replace(ansiPattern, '')
}

const unitBytes: Record<string, number> = {
  b: 1,
  kb: 1e3,
  mb: 1e6,
  gb: 1e9,
  tb: 1e12,
  kib: 1024,
  mib: 1024 ** 2,
  gib: 1024 ** 3,
  tib: 1024 ** 4,
}

/** "1.8MiB", "163.0b", "12.3MB", "512kB" → bytes; null when unreadable. */
export function parseByteSize(text: string): number | null {
  const m = /^([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b)$/i.exec(text.trim())
  if (m == null) return null
  const unit = unitBytes[m[2]!.toLowerCase()]
  return unit == null ? null : Math.round(Number(m[1]) * unit)
}

const barBytes = /\[[=>\-\s]*\]\s+([0-9.]+\s*[a-zA-Z]+)\s*\/\s*([0-9.]+\s*[a-zA-Z]+)/
const podmanBlob = /^Copying blob (?:sha256:)?([0-9a-f]{12,64})\b(.*)$/
const dockerLayer =
  /^([0-9a-f]{12,64}): (Pulling fs layer|Waiting|Downloading|Verifying Checksum|Download complete|Extracting|Pull complete|Already exists|Retrying[^[]*)(.*)$/

export class PullProgressParser {
  private readonly image: string
  private readonly layers = new Map<string, LayerProgress>()
  private phase: PullPhase = 'resolving'
  private pending = ''

  constructor(image: string) {
    this.image = image
  }

  /** Feed raw CLI output; returns one report per line that told something. */
  push(chunk: string): PullProgress[] {
    const text = this.pending + chunk
    const parts = text.split(/\r\n|\r|\n/)
    this.pending = parts.pop() ?? ''
    return parts.map((l) => this.line(l)).filter((p) => p != null)
  }

  /** The last line when the stream ended without a line break. */
  end(): PullProgress[] {
    const rest = this.pending
    this.pending = ''
    const report = rest.trim() !== '' ? this.line(rest) : null
    return report != null ? [report] : []
  }

  /** The report for a pull that finished (exit code 0). */
  finished(): PullProgress {
    this.phase = 'done'
    for (const layer of this.layers.values()) this.complete(layer)
    return this.report('')
  }

  private layer(id: string): LayerProgress {
    const key = id.slice(0, 12)
    let layer = this.layers.get(key)
    if (layer == null) {
      layer = { done: false, bytesDone: null, bytesTotal: null }
      this.layers.set(key, layer)
    }
    return layer
  }

  private complete(layer: LayerProgress): void {
    layer.done = true
    if (layer.bytesTotal != null) layer.bytesDone = layer.bytesTotal
  }

  private bytes(layer: LayerProgress, rest: string): void {
    const m = barBytes.exec(rest)
    if (m == null) return
    const done = parseByteSize(m[1]!)
    const total = parseByteSize(m[2]!)
    if (done != null && total != null && total > 0) {
      layer.bytesDone = Math.min(done, total)
      layer.bytesTotal = total
    }
  }

  private line(raw: string): PullProgress | null {
    const line = stripAnsi(raw).trim()
    if (line === '' || line === '…') return null

    const blob = podmanBlob.exec(line)
    if (blob != null) {
      const layer = this.layer(blob[1]!)
      const rest = blob[2] ?? ''
      this.phase = 'downloading'
      if (/\bdone\b|skipped|already exists/i.test(rest)) this.complete(layer)
      else this.bytes(layer, rest)
      return this.report(line)
    }
    if (/^Copying config\b/.test(line)) {
      // Podman copies the config after every layer.
      for (const layer of this.layers.values()) this.complete(layer)
      this.phase = 'writing'
      return this.report(line)
    }
    if (/^(Writing manifest|Storing signatures)/.test(line)) {
      this.phase = 'writing'
      return this.report(line)
    }

    const docker = dockerLayer.exec(line)
    if (docker != null) {
      const layer = this.layer(docker[1]!)
      const status = docker[2]!
      const rest = docker[3] ?? ''
      if (status === 'Pull complete' || status === 'Already exists') {
        this.complete(layer)
      } else if (status === 'Download complete' || status === 'Verifying Checksum') {
        if (layer.bytesTotal != null) layer.bytesDone = layer.bytesTotal
      } else if (status === 'Downloading') {
        this.bytes(layer, rest)
      } else if (status === 'Extracting') {
        if (layer.bytesTotal != null) layer.bytesDone = layer.bytesTotal
      }
      if (status === 'Extracting') this.phase = 'extracting'
      else if (this.phase === 'resolving') this.phase = 'downloading'
      return this.report(line)
    }
    if (/^(Digest|Status):/.test(line)) {
      for (const layer of this.layers.values()) this.complete(layer)
      this.phase = 'writing'
      return this.report(line)
    }
    if (/^(Trying to pull|Getting image source signatures|[^\s]+: Pulling from )/.test(line)) {
      return this.report(line)
    }
    return null
  }

  private report(line: string): PullProgress {
    const layers = [...this.layers.values()]
    const layersDone = layers.filter((l) => l.done).length
    const sized = layers.filter((l) => l.bytesTotal != null)
    const bytesTotal = sized.length > 0 ? sized.reduce((s, l) => s + (l.bytesTotal ?? 0), 0) : null
    const bytesDone = sized.length > 0 ? sized.reduce((s, l) => s + (l.bytesDone ?? 0), 0) : null
    let fraction: number | null = null
    if (this.phase === 'done') fraction = 1
    else if (bytesTotal != null && bytesDone != null && sized.length === layers.length)
      fraction = bytesDone / bytesTotal
    else if (layers.length > 0) fraction = layersDone / layers.length
    return {
      image: this.image,
      phase: this.phase,
      layersTotal: layers.length,
      layersDone,
      bytesDone,
      bytesTotal,
      fraction,
      line,
    }
  }
}
