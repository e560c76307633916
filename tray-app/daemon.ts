import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { createWriteStream, existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { GarageError } from '../core/errors.ts'
import { type ControlEndpoint, isProcessAlive, readControlEndpoint } from '../daemon/control/client.ts'
import { daemonEnv } from '../daemon/launch.ts'

/** The tray's own settings: how to start `garage node` when no daemon runs. */
export interface TrayConfig {
  /** The federation authority id (default: $GARAGE_AUTHORITY). */
  authority?: string
  /** Bootstrap multiaddrs (default: $GARAGE_BOOTSTRAP, comma-separated). */
  bootstrap?: string[]
  region?: string
  /** More `garage node` options, as argv (e.g. ["--vram-cap", "6000"]). */
  nodeArgs?: string[]
  /** The garage executable as argv (default: this checkout's bin/garage.js, else `garage` on PATH). */
  command?: string[]
}

export const trayConfigFileName = 'tray.json'
export const nodeLogFileName = 'tray-node.log'
export const serviceUnit = 'garage-node.service'

export class TrayConfigError extends GarageError {}

export async function readTrayConfig(dataDir: string): Promise<TrayConfig> {
  const file = join(dataDir, trayConfigFileName)
  let text: string
  try {
    text = await readFile(file, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {}
    throw err
  }
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch (err) {
    throw new TrayConfigError(`${file} is not valid JSON: ${(err as Error).message}`)
  }
  if (value == null || typeof value !== 'object' || Array.isArray(value))
    throw new TrayConfigError(`${file} must hold a JSON object`)
  const v = value as Record<string, unknown>
  const strings = (key: string): string[] | undefined => {
    const x = v[key]
    if (x == null) return undefined
    if (!Array.isArray(x) || !x.every((s) => typeof s === 'string'))
      throw new TrayConfigError(`${file}: "${key}" must be a list of strings`)
    return x
  }
  const string = (key: string): string | undefined => {
    const x = v[key]
    if (x == null) return undefined
    if (typeof x !== 'string') throw new TrayConfigError(`${file}: "${key}" must be a string`)
    return x
  }
  const config: TrayConfig = {}
  const authority = string('authority')
  const bootstrap = strings('bootstrap')
  const region = string('region')
  const nodeArgs = strings('nodeArgs')
  const command = strings('command')
  if (authority != null) config.authority = authority
  if (bootstrap != null) config.bootstrap = bootstrap
  if (region != null) config.region = region
  if (nodeArgs != null) config.nodeArgs = nodeArgs
  if (command != null) {
    if (command.length === 0) throw new TrayConfigError(`${file}: "command" must not be empty`)
    config.command = command
  }
  return config
}

/** `garage node` argv from the config (the environment fills what it leaves out), or what is missing. */
export function nodeArguments(
  config: TrayConfig,
  dataDir: string,
  env: NodeJS.ProcessEnv = process.env,
): { args: string[] } | { missing: string } {
  const authority = config.authority ?? env.GARAGE_AUTHORITY
  const bootstrap =
    config.bootstrap ??
    (env.GARAGE_BOOTSTRAP ?? '')
      .split(',')
      .map((s) => s.trim())
      .filter((s) => s !== '')
  if (authority == null || authority === '') return { missing: 'authority' }
  if (bootstrap.length === 0) return { missing: 'bootstrap' }
  return {
    args: [
      'node',
      '--authority',
      authority,
      ...bootstrap.flatMap((b) => ['--bootstrap', b]),
      ...(config.region != null ? ['--region', config.region] : []),
      '--data-dir',
      dataDir,
      ...(config.nodeArgs ?? []),
    ],
  }
}

export interface GarageCommand {
  file: string
  args: string[]
  env: Record<string, string>
}

/** This checkout's bin/garage.js, when the tray runs from a source tree. */
export const repoGarageBin = fileURLToPath(new URL('../bin/garage.js', import.meta.url))
/** The Node 22 the project pins (the `node` devDependency), which npm scripts run garage with. */
export const repoNode = fileURLToPath(
  new URL(`../node_modules/node/bin/node${process.platform === 'win32' ? '.exe' : ''}`, import.meta.url),
)

/** The Node 22 a packaged tray app ships beside its code (installer/electron-builder.yml: resources/node). */
export const bundledNode: string | null =
  typeof process.resourcesPath === 'string'
    ? join(process.resourcesPath, 'node', process.platform === 'win32' ? 'node.exe' : 'node')
    : null

/**
 * What runs `garage`: the config's command; else this checkout's (or the package's) bin/garage.js,
 * run by the project's pinned Node when npm install put it there, by the Node a packaged app
 * bundles, or by Electron's own Node (ELECTRON_RUN_AS_NODE: Electron 40+ bundles Node 24, new
 * enough for garage's type stripping, but not the version Garage is tested on); else `garage` on
 * PATH (what the Linux and macOS installers put there).
 */
export function garageCommand(p: {
  config: TrayConfig
  execPath: string
  isElectron: boolean
  repoBin?: string | null
  repoNode?: string | null
  bundledNode?: string | null
}): GarageCommand {
  if (p.config.command != null) {
    const [file, ...args] = p.config.command
    return { file: file as string, args, env: {} }
  }
  const bin = p.repoBin === undefined ? repoGarageBin : p.repoBin
  if (bin != null && existsSync(bin)) {
    const candidates = [
      p.repoNode === undefined ? repoNode : p.repoNode,
      p.bundledNode === undefined ? bundledNode : p.bundledNode,
    ]
    const node = candidates.find((n) => n != null && existsSync(n))
    if (node != null) return { file: node, args: [bin], env: {} }
    return { file: p.execPath, args: [bin], env: p.isElectron ? { ELECTRON_RUN_AS_NODE: '1' } : {} }
  }
  return { file: 'garage', args: [], env: {} }
}

/**
 * A daemon whose control.json is present, whose process lives and that answers GET /status. A
 * live pid that does not answer yet (a daemon busy starting) gets `patienceMs` before the file
 * counts as stale (its pid reused by another program): starting a second node on the same data
 * dir would be worse than waiting.
 */
export async function findRunningDaemon(
  dataDir: string,
  answers: (endpoint: ControlEndpoint) => Promise<boolean>,
  options: { patienceMs?: number; retryMs?: number } = {},
): Promise<ControlEndpoint | null> {
  const endpoint = await readControlEndpoint(dataDir, { loopbackOnly: true }).catch(() => null)
  if (endpoint == null) return null
  if (endpoint.pid != null && !isProcessAlive(endpoint.pid)) return null
  const deadline = Date.now() + (endpoint.pid != null ? (options.patienceMs ?? 10_000) : 0)
  for (;;) {
    if (await answers(endpoint)) return endpoint
    if (Date.now() >= deadline) return null
    await new Promise((resolve) => setTimeout(resolve, options.retryMs ?? 500))
  }
}

export type RunCommand = (file: string, args: string[]) => Promise<{ code: number; stdout: string }>

export const runCommand: RunCommand = (file, args) =>
  new Promise((resolve) => {
    execFile(file, args, { timeout: 5_000, windowsHide: true }, (err, stdout) => {
      const code = err == null ? 0 : typeof err.code === 'number' ? err.code : 127
      resolve({ code, stdout: String(stdout) })
    })
  })

/** `systemctl --user is-active garage-node.service`: active (or coming up) means the service owns the node. */
export async function isServiceActive(run: RunCommand = runCommand): Promise<boolean> {
  const { stdout } = await run('systemctl', ['--user', 'is-active', serviceUnit])
  const state = stdout.trim()
  return state === 'active' || state === 'activating' || state === 'reloading'
}

export async function startService(run: RunCommand = runCommand): Promise<void> {
  const { code } = await run('systemctl', ['--user', 'start', serviceUnit])
  if (code !== 0) throw new GarageError(`systemctl --user start ${serviceUnit} failed (exit ${code})`)
}

export interface NodeExit {
  code: number | null
  signal: NodeJS.Signals | null
  /** The last line the node wrote to stderr (its error, when it failed). */
  lastLine: string | null
}

/** `garage node` as the tray's child: its output in `<dataDir>/tray-node.log`, stopped on quit. */
export class NodeProcess {
  readonly child: ChildProcess
  readonly exited: Promise<NodeExit>
  private exit: NodeExit | null = null

  constructor(command: GarageCommand, args: string[], options: { logFile: string; env?: NodeJS.ProcessEnv }) {
    const log = createWriteStream(options.logFile, { flags: 'w', mode: 0o600 })
    this.child = spawn(command.file, [...command.args, ...args], {
      env: { ...(options.env ?? process.env), ...daemonEnv(options.env ?? process.env), ...command.env },
      stdio: ['ignore', 'pipe', 'pipe'],
      windowsHide: true,
    })
    let lastLine: string | null = null
    let partial = ''
    this.child.stdout?.pipe(log, { end: false })
    this.child.stderr?.on('data', (chunk: Buffer) => {
      log.write(chunk)
      const lines = (partial + chunk.toString()).split('\n')
      partial = lines.pop() ?? ''
      const last = lines.filter((l) => l.trim() !== '').at(-1)
      if (last != null) lastLine = last
    })
    this.exited = new Promise((resolve) => {
      const done = (code: number | null, signal: NodeJS.Signals | null): void => {
        if (this.exit != null) return
        if (partial.trim() !== '') lastLine = partial
        this.exit = { code, signal, lastLine: lastLine != null ? errorText(lastLine) : null }
        log.end()
        resolve(this.exit)
      }
      this.child.once('exit', done)
      this.child.once('error', (err) => {
        lastLine = `${command.file}: ${err.message}`
        done(null, null)
      })
    })
  }

  get running(): boolean {
    return this.exit == null
  }

  /** SIGTERM (the node drains and leaves its region), SIGKILL after `graceMs`. */
  async stop(graceMs: number): Promise<NodeExit> {
    if (this.exit != null) return this.exit
    this.child.kill('SIGTERM')
    let timer: NodeJS.Timeout | undefined
    const killed = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        this.child.kill('SIGKILL')
        resolve()
      }, graceMs)
    })
    await Promise.race([this.exited, killed])
    clearTimeout(timer)
    return this.exited
  }
}

/** A pino JSON line's `msg`/`err`, or the line itself. */
function errorText(line: string): string {
  try {
    const entry = JSON.parse(line) as { msg?: unknown; err?: unknown }
    const parts = [entry.msg, typeof entry.err === 'string' ? entry.err : null].filter(
      (x): x is string => typeof x === 'string' && x !== '',
    )
    if (parts.length > 0) return parts.join(': ')
  } catch {}
  return line.trim().slice(0, 300)
}
