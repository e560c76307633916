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

export interface RunningGarage {
  child: ChildProcess
  /** The lines of its ready banner. */
  lines: string[]
  field(name: string): string
  /** The first stdout line (so far or to come) that starts with `prefix`, trimmed. */
  waitForLine(prefix: string, timeoutMs?: number): Promise<string>
  exited: Promise<number | null>
}

/** Spawns `garage bootstrap ARGS` and resolves once it prints its ready banner. */
export function spawnBootstrap(args: string[], timeoutMs = 20_000): Promise<RunningGarage> {
  return spawnGarage(['bootstrap', ...args], { readyLine: 'cert until', timeoutMs })
}

/**
 * Spawns `garage ARGS` (a long-running command) and resolves once a line of its stdout contains
 * `readyLine`; rejects with its output when it exits first or `timeoutMs` passes.
 */
export async function spawnGarage(
  args: string[],
  options: { readyLine: string; timeoutMs?: number; env?: NodeJS.ProcessEnv },
): Promise<RunningGarage> {
  const timeoutMs = options.timeoutMs ?? 20_000
  const child = spawn(process.execPath, [garageBin, ...args], {
    env: { ...process.env, GARAGE_LOG_LEVEL: 'warn', ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  const lines: string[] = []
  const output = createInterface({ input: child.stdout! })
  output.on('line', (line) => lines.push(line))
  let stderr = ''
  child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString()
  })
  const waitForLine = (prefix: string, timeoutMs = 10_000): Promise<string> =>
    new Promise((resolve, reject) => {
      const seen = lines.find((l) => l.trim().startsWith(prefix))
      if (seen != null) return resolve(seen.trim())
      const onLine = (line: string): void => {
        if (!line.trim().startsWith(prefix)) return
        clearTimeout(timer)
        output.off('line', onLine)
        resolve(line.trim())
      }
      const timer = setTimeout(() => {
        output.off('line', onLine)
        reject(
          new Error(`no line starting ${JSON.stringify(prefix)} in ${timeoutMs} ms: ${lines.join('\n')}`),
        )
      }, timeoutMs)
      output.on('line', onLine)
    })
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`garage ${args[0]} not ready in ${timeoutMs} ms: ${lines.join('\n')}${stderr}`)),
      timeoutMs,
    )
    output.on('line', (line) => {
      if (line.includes(options.readyLine)) {
        clearTimeout(timer)
        resolve()
      }
    })
    void exited.then((code) => {
      clearTimeout(timer)
      reject(new Error(`garage ${args[0]} exited with ${code}: ${stderr}`))
    })
  })
  return {
    child,
    lines,
    exited,
    waitForLine,
    field: (name) => {
      const line = lines.find((l) => l.trim().startsWith(name))
      if (line == null) throw new Error(`no ${name} in the banner of garage ${args[0]}`)
      return line.trim().split(/\s+/)[1] as string
    },
  }
}
