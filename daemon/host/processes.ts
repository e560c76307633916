import { closeSync, openSync, readdirSync, readlinkSync, readSync } from 'node:fs'
import si from 'systeminformation'
import { GarageError } from '../../core/errors.ts'
import { baseName, linuxCommMaxChars } from './games.ts'
import type { HostProcess } from './types.ts'

/** The process list could not be read at all (no /proc, systeminformation failed). */
export class ProcessListError extends GarageError {}

export interface ProcessListOptions {
  /** Which processes need their command line (GameList.needsCommandLine). */
  needsCommandLine?: (name: string) => boolean
  signal?: AbortSignal
}

export interface LinuxProcessListOptions extends ProcessListOptions {
  /** For tests: another proc mount. */
  procDir?: string
}

/** Processes read between yields to the event loop: about 1 ms of blocking each on a desktop. */
const procBatch = 64
const readBuffer = Buffer.alloc(4096)

/** Reads a small /proc file synchronously: one open/read/close, a few µs, no threadpool round trips. */
function readProcFile(path: string): string | null {
  let fd: number
  try {
    fd = openSync(path, 'r')
  } catch {
    return null
  }
  try {
    const n = readSync(fd, readBuffer, 0, readBuffer.length, 0)
    return readBuffer.toString('utf8', 0, n)
  } catch {
    return null
  } finally {
    closeSync(fd)
  }
}

/** `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so it ends at the last `)`. */
export function parseProcStat(text: string): { name: string; ppid: number } | null {
  const open = text.indexOf('(')
  const close = text.lastIndexOf(')')
  if (open < 0 || close < open) return null
  const ppid = Number(text.slice(close + 2).split(' ')[1])
  if (!Number.isInteger(ppid)) return null
  return { name: text.slice(open + 1, close), ppid }
}

/**
 * Linux comm keeps 15 chars: `FortniteClient-Win64-Shipping` shows as `FortniteClient-`. The full
 * name is argv[0]'s base name (a Windows path under Wine/Proton), else the executable's, when it
 * starts with the comm.
 */
export function fullNameFromComm(comm: string, argv0: string | null, exe: string | null): string {
  for (const candidate of [argv0, exe]) {
    if (candidate == null || candidate === '') continue
    const base = baseName(candidate)
    if (base.length > comm.length && base.toLowerCase().startsWith(comm.toLowerCase())) return base
  }
  return comm
}

const yieldToLoop = (): Promise<void> => new Promise((resolve) => setImmediate(resolve))

/**
 * Every process from /proc/<pid>/stat (comm and ppid in one read), reading command lines only for
 * 15-char names and names a rule needs. Reads synchronously in batches: much faster than
 * systeminformation.processes(), which also reads each process's status, CPU times and memory.
 */
export async function listLinuxProcesses(options: LinuxProcessListOptions = {}): Promise<HostProcess[]> {
  const proc = options.procDir ?? '/proc'
  let entries: string[]
  try {
    entries = readdirSync(proc)
  } catch (err) {
    throw new ProcessListError(`cannot list ${proc}: ${(err as Error).message}`, 'PROCESS_LIST', {
      cause: err,
    })
  }
  const out: HostProcess[] = []
  let inBatch = 0
  for (const entry of entries) {
    const code = entry.charCodeAt(0)
    if (code < 48 || code > 57) continue
    if (++inBatch > procBatch) {
      inBatch = 0
      await yieldToLoop()
      options.signal?.throwIfAborted()
    }
    const stat = readProcFile(`${proc}/${entry}/stat`)
    const parsed = stat == null ? null : parseProcStat(stat)
    if (parsed == null) continue // exited between readdir and read
    const p: HostProcess = { pid: Number(entry), name: parsed.name, ppid: parsed.ppid }
    const truncated = parsed.name.length === linuxCommMaxChars
    if (truncated || options.needsCommandLine?.(parsed.name) === true) {
      const argv = (readProcFile(`${proc}/${entry}/cmdline`) ?? '').split('\0').filter((a) => a !== '')
      p.commandLine = argv.join(' ')
      if (truncated) {
        let exe: string | null = null
        try {
          exe = readlinkSync(`${proc}/${entry}/exe`)
        } catch {
          // Another user's process: its exe link is private, argv[0] usually suffices.
        }
        p.name = fullNameFromComm(parsed.name, argv[0] ?? null, exe)
      }
    }
    out.push(p)
  }
  return out
}

/** Windows and macOS: systeminformation (PowerShell's Get-CimInstance on Windows, `ps` on macOS). */
export async function listProcessesWithSysteminformation(
  options: ProcessListOptions = {},
): Promise<HostProcess[]> {
  let data: Awaited<ReturnType<typeof si.processes>>
  try {
    data = await si.processes()
  } catch (err) {
    throw new ProcessListError(`cannot list processes: ${(err as Error).message}`, 'PROCESS_LIST', {
      cause: err,
    })
  }
  options.signal?.throwIfAborted()
  return data.list.map((p) => ({
    pid: p.pid,
    name: p.name,
    ppid: p.parentPid,
    ...(options.needsCommandLine?.(p.name) === true
      ? { commandLine: `${p.command} ${p.params}`.trim() }
      : {}),
  }))
}

/** The fast reader where there is one. */
export function listProcesses(
  options: LinuxProcessListOptions & { platform?: NodeJS.Platform } = {},
): Promise<HostProcess[]> {
  return (options.platform ?? process.platform) === 'linux'
    ? listLinuxProcesses(options)
    : listProcessesWithSysteminformation(options)
}
