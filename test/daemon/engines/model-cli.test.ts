import { createHash } from 'node:crypto'
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import {
  type AddressInfo,
  createServer as createTcpServer,
  type Socket,
  type Server as TcpServer,
} from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { main } from '../../../cli/main.ts'
import { writeGgufFile } from '../../../daemon/engines/llamacpp/gguf.ts'
import { formatGgufSummary, summarizeGgufFile } from '../../../daemon/engines/llamacpp/gguf-info.ts'
import { ModelPullError, pullGgufModel } from '../../../daemon/engines/llamacpp/gguf-pull.ts'
import { type CliResult, garage } from '../../helpers/cli.ts'

/**
 * Serves `files` with Range support, as Hugging Face's CDN does; other paths get 404. Under
 * /stall/NAME/, only the first request for a path (node-llama-cpp reading the header) is answered:
 * later ones get their headers and 1000 bytes, then silence.
 */
function fileServer(files: Record<string, Uint8Array>): Server {
  const seen = new Set<string>()
  return createServer((req: IncomingMessage, res: ServerResponse) => {
    const path = new URL(req.url ?? '/', 'http://x').pathname
    const bytes = files[path.replace(/^\/stall\/(\w+\/)?/, '/')]
    if (bytes == null) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('Not Found')
      return
    }
    const stall = path.startsWith('/stall/') && seen.has(path)
    seen.add(path)
    const body = req.method === 'HEAD' ? undefined : bytes
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '')
    const start = Number(range?.[1] ?? 0)
    const end = Math.min(range?.[2] ? Number(range[2]) : bytes.byteLength - 1, bytes.byteLength - 1)
    res.writeHead(range == null ? 200 : 206, {
      'content-length': end - start + 1,
      'accept-ranges': 'bytes',
      ...(range == null ? {} : { 'content-range': `bytes ${start}-${end}/${bytes.byteLength}` }),
    })
    if (stall) res.write(bytes.subarray(start, start + 1000))
    else res.end(body?.subarray(start, end + 1))
  })
}

/** `garage ARGS` in this process: for what does not depend on the process exiting. */
async function garageHere(args: string[]): Promise<CliResult> {
  const out = { stdout: '', stderr: '' }
  const sink = (name: 'stdout' | 'stderr'): Writable =>
    new Writable({
      write(chunk, _encoding, done) {
        out[name] += String(chunk)
        done()
      },
    })
  const ctx = {
    stdout: sink('stdout'),
    stderr: sink('stderr'),
    env: process.env,
    shutdown: new AbortController().signal,
  }
  return { code: await main(args, ctx), ...out }
}

async function listen(server: Server | TcpServer): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return (server.address() as AddressInfo).port
}

describe('garage model', () => {
  let dir: string
  let tinyPath: string
  let files: Server
  let filesUrl: string
  /** Accepts connections and never answers: a network that hangs. */
  let silent: TcpServer
  let silentPort: number
  const sockets: Socket[] = []

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-model-cli-'))
    tinyPath = join(dir, 'tiny.gguf')
    silent = createTcpServer((socket) => sockets.push(socket))
    silentPort = await listen(silent)
  })
  afterAll(async () => {
    for (const s of sockets) s.destroy()
    silent?.close()
    files?.closeAllConnections()
    files?.close()
    await rm(dir, { recursive: true, force: true })
  })

  it('tiny writes the model and prints its path, size and sha256', async () => {
    const r = await garage(['model', 'tiny', '--out', tinyPath, '--seed', '9'])
    expect(r.code, r.stderr).toBe(0)
    const bytes = await readFile(tinyPath)
    const [path, size, sha] = r.stdout.trim().split('\n')
    expect(path).toBe(tinyPath)
    expect(size).toContain(`${bytes.byteLength} bytes`)
    expect(sha).toBe(`sha256  ${createHash('sha256').update(bytes).digest('hex')}`)
    expect(r.stderr).toContain('embd 64, 2 layers, 4 heads (4 kv), ff 128, ctx 4096, seed 9')
    // Same options, same bytes.
    const again = await garage(['model', 'tiny', '--out', join(dir, 'again.gguf'), '--seed', '9'])
    expect(again.stdout.split('\n')[2]).toBe(sha)
  })

  it('tiny refuses to overwrite a file unless --force', async () => {
    const path = join(dir, 'precious.gguf')
    await writeFile(path, 'keep me')
    const refused = await garage(['model', 'tiny', '--out', path])
    expect(refused.code).toBe(1)
    expect(refused.stderr).toContain(`${path} already exists; pass --force to replace it`)
    expect(await readFile(path, 'utf8')).toBe('keep me')
    const forced = await garage([
      'model',
      'tiny',
      '--out',
      path,
      '--force',
      '--layers',
      '1',
      '--no-chat-template',
    ])
    expect(forced.code, forced.stderr).toBe(0)
    expect((await stat(path)).size).toBeGreaterThan(100_000)
    expect((await readdir(dir)).filter((f) => f.endsWith('.tmp'))).toEqual([])
  })

  it('tiny rejects bad sizes with the usage (exit 2), naming the flag', async () => {
    const cases: [string[], string][] = [
      [[], '--out FILE is required'],
      [['--embd', '66'], '--embd (66) must be a multiple of heads (4)'],
      [['--heads', '4', '--kv-heads', '3'], '--kv-heads (3) must divide heads (4)'],
      [['--layers', '0'], '--layers must be an integer from 1 to 256, not 0'],
      [['--ctx', 'lots'], '--ctx must be a whole number, not "lots"'],
      [['--seed', '-1'], '--seed'],
      [['--logit-scale', '0'], '--logit-scale must be a number above 0 and at most 1000, not "0"'],
      [['--logit-scale', 'sharp'], '--logit-scale must be a number above 0'],
      [['--frobnicate'], "Unknown option '--frobnicate'"],
    ]
    for (const [args, message] of cases) {
      const out = args.length === 0 ? [] : ['--out', join(dir, 'bad.gguf')]
      const r = await garageHere(['model', 'tiny', ...out, ...args])
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2)
      expect(r.stderr).toContain(message)
      expect(r.stderr).toContain('Usage:')
    }
    await expect(stat(join(dir, 'bad.gguf'))).rejects.toThrow('ENOENT')
  })

  it('info prints the architecture, sizes, tokenizer and chat template', async () => {
    const r = await garage(['model', 'info', tinyPath])
    expect(r.code, r.stderr).toBe(0)
    expect(r.stdout).toMatch(/architecture\s+llama\n/)
    expect(r.stdout).toMatch(/parameters\s+116\.8K \(116800\)/)
    expect(r.stdout).toMatch(/context\s+4096\n/)
    expect(r.stdout).toMatch(/layers\s+2\n/)
    expect(r.stdout).toMatch(/tokenizer\s+gpt2 \(pre gpt-2\), 270 tokens, 8 merges/)
    expect(r.stdout).toMatch(/chat template\s+yes \(ChatML\)/)
    const json = JSON.parse((await garageHere(['model', 'info', tinyPath, '--json'])).stdout)
    expect(json).toMatchObject({ architecture: 'llama', embeddingLength: 64, tensorTypes: { F32: 21 } })
    const plain = await garageHere(['model', 'info', join(dir, 'precious.gguf')])
    expect(plain.stdout).toMatch(/chat template\s+no/)
    const notGguf = join(dir, 'notes.txt')
    await writeFile(notGguf, 'hello')
    const bad = await garageHere(['model', 'info', notGguf])
    expect(bad.code).toBe(1)
    expect(bad.stderr).toContain('is not a readable GGUF file')
    expect((await garageHere(['model', 'info', join(dir, 'missing.gguf')])).stderr).toContain(
      'does not exist',
    )

    const alien = join(dir, 'alien.gguf')
    await writeGgufFile(alien, {
      metadata: { 'general.architecture': { type: 'string', value: 'garage-alien' } },
      tensors: [{ name: 'w', dims: [4, 2], data: new Float32Array(8) }],
    })
    const summary = await summarizeGgufFile(alien)
    expect(summary).toMatchObject({ architecture: 'garage-alien', supportedByLlamaCpp: false, parameters: 8 })
    expect(formatGgufSummary(summary)).toMatch(
      /architecture\s+garage-alien \(not supported by this llama\.cpp build\)/,
    )
  })

  it('pull fails within seconds, with one line, when the network does not answer', async () => {
    const started = Date.now()
    const r = await garage(['model', 'pull', `http://127.0.0.1:${silentPort}/m.gguf`, '--timeout', '1s'], {
      GARAGE_DATA_DIR: dir,
    })
    expect(r.code).toBe(1)
    expect(r.stderr.trim().split('\n').at(-1)).toBe(
      `garage model: no answer from 127.0.0.1:${silentPort} within 1s (reading the model header); check the network`,
    )
    expect(Date.now() - started).toBeLessThan(8_000)
  })

  it('pull names an unreachable Hugging Face, and a refused connection', async () => {
    const offline = await garage(
      ['model', 'pull', 'hf:garage/none/none.gguf', '--dir', join(dir, 'models')],
      {
        HF_ENDPOINT: 'http://garage-test.invalid',
      },
    )
    expect(offline.code).toBe(1)
    expect(offline.stderr).toMatch(/cannot reach garage-test\.invalid: its name does not resolve/)
    const closed = createTcpServer()
    const port = await listen(closed)
    await new Promise((resolve) => closed.close(resolve))
    const refused = await garage([
      'model',
      'pull',
      `http://127.0.0.1:${port}/m.gguf`,
      '--dir',
      join(dir, 'm'),
    ])
    expect(refused.code).toBe(1)
    expect(refused.stderr).toContain(`cannot reach 127.0.0.1:${port}: ECONNREFUSED`)
    const usage = await garageHere(['model', 'pull', 'ftp://example.com/m.gguf'])
    expect(usage.code).toBe(2)
    expect(usage.stderr).toContain('is not a model source')
  })

  it('pull downloads a GGUF into <data dir>/models, and refuses what is not one', async () => {
    const tiny = new Uint8Array(await readFile(tinyPath))
    files = fileServer({ '/tiny.gguf': tiny, '/page.gguf': new TextEncoder().encode('<html>'.repeat(100)) })
    filesUrl = `http://127.0.0.1:${await listen(files)}`
    const r = await garage(['model', 'pull', `${filesUrl}/tiny.gguf`], { GARAGE_DATA_DIR: dir })
    expect(r.code, r.stderr).toBe(0)
    const saved = join(dir, 'models', 'tiny.gguf')
    expect(r.stdout.trim()).toBe(saved)
    expect((await readFile(saved)).equals(tiny)).toBe(true)
    expect(r.stderr).toContain('architecture llama')

    const missing = await garage(['model', 'pull', `${filesUrl}/nope.gguf`, '--dir', join(dir, 'm2')])
    expect(missing.code).toBe(1)
    expect(missing.stderr).toContain('answered 404')
    const page = await garage(['model', 'pull', `${filesUrl}/page.gguf`, '--dir', join(dir, 'm3')])
    expect(page.code).toBe(1)
    expect(page.stderr).toContain('did not send a GGUF file')
  })

  it('pull gives up on a download that stalls, and stops when cancelled', async () => {
    const host = new URL(filesUrl).host
    const started = Date.now()
    const progress: number[] = []
    const stalled = pullGgufModel(`${filesUrl}/stall/a/tiny.gguf`, {
      dir: join(dir, 'stalled'),
      timeoutMs: 1000,
      onProgress: (p) => progress.push(p.downloadedBytes),
    })
    await expect(stalled).rejects.toThrow(
      new ModelPullError(`download stalled: no data from ${host} for 1s; check the network`),
    )
    expect(Date.now() - started).toBeLessThan(6_000)
    expect(progress).toContain(1000)

    const controller = new AbortController()
    const cancelled = pullGgufModel(`${filesUrl}/stall/b/tiny.gguf`, {
      dir: join(dir, 'cancelled'),
      timeoutMs: 60_000,
      signal: controller.signal,
      onProgress: () => controller.abort(),
    })
    await expect(cancelled).rejects.toThrow('pull cancelled')
    expect(await readdir(join(dir, 'cancelled'))).toEqual([])
  })
})
