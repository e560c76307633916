import { execFile } from 'node:child_process'
import { chmod, chown, mkdtemp, rm } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir, userInfo } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'

/**
 * A throw-away PostgreSQL server (Debian's postgresql 15) in a temporary folder, on a free loopback
 * port, its socket in that folder: nothing of the machine's own PostgreSQL is used. As root (CI) it
 * runs as the `postgres` user through su; otherwise as the current user.
 */

const run = promisify(execFile)
export const postgresBin = process.env.GARAGE_PG_BIN ?? '/usr/lib/postgresql/15/bin'
const commandTimeoutMs = 60_000

export interface TestPostgres {
  /** postgresql://garage@127.0.0.1:PORT/postgres */
  url: string
  port: number
  dir: string
  /** pg_ctl stop -m fast: open connections are cut, the server exits. */
  stopServer(): Promise<void>
  /** pg_ctl start again on the same port and data. */
  startServer(): Promise<void>
  /** Stops the server (if running) and removes the folder. */
  destroy(): Promise<void>
}

/** A free loopback port (the OS hands ports out in turn: another taking it before the server does is not a practical risk). */
export async function freeLoopbackPort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  await new Promise<void>((resolve) => server.close(() => resolve()))
  if (address == null || typeof address === 'string') throw new Error('no free port')
  return address.port
}

const asRoot = process.getuid?.() === 0

/** Runs a PostgreSQL binary as the server's user: `postgres` through su when we are root. */
async function pgCommand(binary: string, args: string[]): Promise<string> {
  const path = join(postgresBin, binary)
  try {
    if (asRoot) {
      const quoted = [path, ...args].map((a) => `'${a.replaceAll("'", `'\\''`)}'`).join(' ')
      const { stdout } = await run('su', ['postgres', '-s', '/bin/sh', '-c', quoted], {
        timeout: commandTimeoutMs,
      })
      return stdout
    }
    const { stdout } = await run(path, args, { timeout: commandTimeoutMs })
    return stdout
  } catch (err) {
    const e = err as Error & { stderr?: string; stdout?: string }
    throw new Error(`${binary} ${args.join(' ')} failed: ${e.message}\n${e.stdout ?? ''}${e.stderr ?? ''}`)
  }
}

export async function startTestPostgres(): Promise<TestPostgres> {
  const dir = await mkdtemp(join(tmpdir(), 'garage-pg-'))
  const data = join(dir, 'data')
  if (asRoot) await chown(dir, Number((await run('id', ['-u', 'postgres'])).stdout.trim()), 0)
  await chmod(dir, 0o700)
  const port = await freeLoopbackPort()
  let running = false
  const startServer = async (): Promise<void> => {
    await pgCommand('pg_ctl', [
      '-D',
      data,
      '-o',
      `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100`,
      '-l',
      join(dir, 'log'),
      '-w',
      '-t',
      '30',
      'start',
    ])
    running = true
  }
  const stopServer = async (): Promise<void> => {
    await pgCommand('pg_ctl', ['-D', data, '-m', 'fast', '-w', '-t', '30', 'stop'])
    running = false
  }
  const destroy = async (): Promise<void> => {
    try {
      if (running) await pgCommand('pg_ctl', ['-D', data, '-m', 'immediate', '-w', '-t', '30', 'stop'])
    } catch {
      // already gone: the folder goes anyway
    } finally {
      running = false
      await rm(dir, { recursive: true, force: true })
    }
  }
  try {
    await pgCommand('initdb', ['-D', data, '-A', 'trust', '-U', 'garage', '--no-sync', '-E', 'UTF8'])
    await startServer()
  } catch (err) {
    await destroy()
    throw err
  }
  return {
    url: `postgresql://garage@127.0.0.1:${port}/postgres`,
    port,
    dir,
    stopServer,
    startServer,
    destroy,
  }
}

/** Who the server runs as (for messages). */
export function postgresUser(): string {
  return asRoot ? 'postgres' : userInfo().username
}
