import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { isProcessAlive, readControlEndpoint } from '../../daemon/control/client.ts'
import type { DaemonHandle, DaemonMode, TrayContext } from '../context.ts'
import {
  findRunningDaemon,
  garageCommand,
  isServiceActive,
  NodeProcess,
  nodeArguments,
  nodeLogFileName,
  type RunCommand,
  readTrayConfig,
  runCommand,
  startService,
  trayConfigFileName,
} from '../daemon.ts'
import type { DaemonPhase } from '../state.ts'

export interface DaemonSetupOptions {
  /** Runs systemctl (tests pass a stand-in). */
  run?: RunCommand
  /** The executable that runs `garage` when the config names none (default: this process's). */
  execPath?: string
  isElectron?: boolean
  /** This checkout's bin/garage.js; null: none (use `garage` on PATH). */
  repoBin?: string | null
  /** How long the node may drain at quit before it is killed (its own drain grace is 30 s). */
  stopGraceMs?: number
  /** How long a found control.json's daemon has to answer one GET /status. */
  probeTimeoutMs?: number
  /** How long a live pid in control.json may take to answer before the file counts as stale. */
  patienceMs?: number
}

export const defaultStopGraceMs = 35_000

/**
 * Finds the daemon or starts one, in this order: a daemon that answers at `<dataDir>/control.json`
 * (attach); on Linux the systemd user service garage-node.service when it is active (attach to it
 * once it writes control.json); else `garage node` as a child with the authority and bootstrap of
 * `<dataDir>/tray.json`. At quit only that child is stopped, never the service or an attached daemon.
 */
export async function setupDaemon(ctx: TrayContext, options: DaemonSetupOptions = {}): Promise<DaemonHandle> {
  const run = options.run ?? runCommand
  const stopGraceMs = options.stopGraceMs ?? defaultStopGraceMs
  let mode: DaemonMode = 'none'
  let child: NodeProcess | null = null

  const startChild = async (): Promise<void> => {
    if (child?.running === true) return
    let args: string[]
    try {
      const config = await readTrayConfig(ctx.dataDir)
      const argv = nodeArguments(config, ctx.dataDir, ctx.env)
      if ('missing' in argv) {
        ctx.store.update({
          daemon: 'absent',
          problem: `Garage is not set up: put "${argv.missing}" in ${join(ctx.dataDir, trayConfigFileName)}`,
        })
        return
      }
      args = argv.args
      await mkdir(ctx.dataDir, { recursive: true, mode: 0o700 })
      const command = garageCommand({
        config,
        execPath: options.execPath ?? process.execPath,
        isElectron: options.isElectron ?? process.versions.electron != null,
        ...(options.repoBin !== undefined ? { repoBin: options.repoBin } : {}),
      })
      const started = new NodeProcess(command, args, {
        logFile: join(ctx.dataDir, nodeLogFileName),
        env: ctx.env,
      })
      child = started
      mode = 'child'
      ctx.log.info({ pid: started.child.pid, file: command.file }, 'started garage node')
      ctx.store.update({ daemon: 'starting', problem: null })
      ctx.wakeConnection()
      void started.exited.then((exit) => {
        if (ctx.signal.aborted || child !== started) return
        ctx.log.warn(exit, 'the Garage node exited')
        ctx.store.update({
          status: null,
          daemon: 'absent',
          problem:
            exit.code === 0 || exit.signal === 'SIGTERM'
              ? null
              : `the Garage node exited: ${exit.lastLine ?? `code ${exit.code ?? exit.signal}`}`,
        })
      })
    } catch (err) {
      ctx.store.update({ daemon: 'absent', problem: (err as Error).message })
    }
  }

  const handle: DaemonHandle = {
    get mode() {
      return mode
    },
    async start() {
      if (mode === 'service') {
        await startService(run)
        ctx.store.update({ daemon: 'starting', problem: null })
        ctx.wakeConnection()
        return
      }
      await startChild()
    },
    async phaseAfterDisconnect(): Promise<DaemonPhase> {
      if (mode === 'child') return child?.running === true ? 'starting' : 'absent'
      if (mode === 'service') return (await isServiceActive(run)) ? 'starting' : 'absent'
      const endpoint = await readControlEndpoint(ctx.dataDir, { loopbackOnly: true }).catch(() => null)
      return endpoint?.pid != null && isProcessAlive(endpoint.pid) ? 'starting' : 'absent'
    },
    async stop() {
      const running = child
      if (running == null || !running.running) return
      ctx.log.info({ pid: running.child.pid }, 'stopping garage node (it drains first)')
      const exit = await running.stop(stopGraceMs)
      ctx.log.info(exit, 'garage node stopped')
    },
  }
  ctx.daemon = handle
  ctx.onShutdown(() => handle.stop())

  const probeTimeoutMs = options.probeTimeoutMs ?? 2_000
  const found = await findRunningDaemon(
    ctx.dataDir,
    () =>
      ctx.client.status({ signal: AbortSignal.timeout(probeTimeoutMs) }).then(
        () => true,
        () => false,
      ),
    options.patienceMs != null ? { patienceMs: options.patienceMs } : {},
  )
  if (found != null) {
    mode = 'attached'
    ctx.log.info({ url: found.url, pid: found.pid }, 'attached to a running garage node')
    return handle
  }
  if (ctx.platform === 'linux' && (await isServiceActive(run).catch(() => false))) {
    mode = 'service'
    ctx.log.info('the garage-node service runs the node: waiting for its control API')
    ctx.store.update({ daemon: 'starting' })
    return handle
  }
  await startChild()
  return handle
}
