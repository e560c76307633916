import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

export const garageBin = fileURLToPath(new URL('../../bin/garage.js', import.meta.url))

export interface CliResult {
  code: number
  stdout: string
  stderr: string
}

/** Runs `garage ARGS` to completion under this Node, with quiet logs. */
export function garage(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [garageBin, ...args],
      { env: { ...process.env, GARAGE_LOG_LEVEL: 'warn', ...env }, timeout: 30_000 },
      (err, stdout, stderr) => {
        resolve({ code: err == null ? 0 : Number((err as { code?: number }).code ?? 1), stdout, stderr })
      },
    )
  })
}

export interface RunningBootstrap {
  child: ChildProcess
  /** The lines of its ready banner. */
  lines: string[]
  field(name: string): string
  exited: Promise<number | null>
}

/** Spawns `garage bootstrap ARGS` and resolves once it prints its ready banner. */
export async function spawnBootstrap(args: string[], timeoutMs = 20_000): Promise<RunningBootstrap> {
  const child = spawn(process.execPath, [garageBin, 'bootstrap', ...args], {
    env: { ...process.env, GARAGE_LOG_LEVEL: 'warn' },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  const lines: string[] = []
  let stderr = ''
  child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString()
  })
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`bootstrap not ready in ${timeoutMs} ms: ${lines.join('\n')}${stderr}`)),
      timeoutMs,
    )
    createInterface({ input: child.stdout! }).on('line', (line) => {
      lines.push(line)
      if (line.includes('cert until')) {
        clearTimeout(timer)
        resolve()
      }
    })
    void exited.then((code) => {
      clearTimeout(timer)
      reject(new Error(`bootstrap exited with ${code}: ${stderr}`))
    })
  })
  return {
    child,
    lines,
    exited,
    field: (name) => {
      const line = lines.find((l) => l.trim().startsWith(name))
      if (line == null) throw new Error(`no ${name} in the bootstrap banner`)
      return line.trim().split(/\s+/)[1] as string
    },
  }
}
