import { closeSync, openSync, readdirSync, readlinkSync, readSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import si from 'systeminformation'
import { GarageError } from '../../core/errors.ts'
import { runTool } from '../../core/tools.ts'
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

/** macOS (`ps`), and Windows where fastlist cannot run (PowerShell's Get-CimInstance). */
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

/**
 * fastlist, the small native program ps-list ships for Windows: one Toolhelp32 snapshot, printed as
 * `pid<TAB>ppid<TAB>name` lines. systeminformation asks WMI through PowerShell instead, which costs a
 * large share of a core when asked every second. Run through runTool rather than ps-list's own call,
 * for the deadline, one call at a time, and the backoff every external tool gets. null: none for
 * this CPU (ps-list has x64 and x86 builds).
 */
export function windowsProcessLister(arch: string = process.arch): string | null {
  const build = arch === 'x64' ? 'x64' : arch === 'ia32' ? 'x86' : null
  if (build == null) return null
  const psList = fileURLToPath(import.meta.resolve('ps-list'))
  return join(dirname(psList), 'vendor', `fastlist-0.3.0-${build}.exe`)
}

export const windowsProcessListTimeoutMs = 3_000

/** Windows: fastlist's snapshot; where it cannot run, systeminformation. */
export async function listWindowsProcesses(
  options: ProcessListOptions & { lister?: string | null; env?: NodeJS.ProcessEnv } = {},
): Promise<HostProcess[]> {
  const lister = options.lister === undefined ? windowsProcessLister() : options.lister
  if (lister == null) return listProcessesWithSysteminformation(options)
  const r = await runTool(lister, [], {
    timeoutMs: windowsProcessListTimeoutMs,
    ...(options.env != null ? { env: options.env } : {}),
  })
  options.signal?.throwIfAborted()
  if (r.status !== 'ok') {
    throw new ProcessListError(
      `cannot list processes: ${baseName(lister)} ${r.status === 'timeout' ? 'did not answer in time' : `failed (${r.status}): ${r.stderr.trim()}`}`,
      'PROCESS_LIST',
    )
  }
  return parseFastlist(r.stdout)
}

/** fastlist's `pid<TAB>ppid<TAB>name` lines (Windows names are whole: no command line is needed). */
export function parseFastlist(text: string): HostProcess[] {
  const out: HostProcess[] = []
  for (const line of text.split(/\r?\n/)) {
    const [pid, ppid, name] = line.split('\t')
    const p = Number(pid)
    if (name == null || name === '' || !Number.isInteger(p)) continue
    out.push({ pid: p, ppid: Number.isInteger(Number(ppid)) ? Number(ppid) : 0, name })
  }
  return out
}

/** The fast reader where there is one. */
export function listProcesses(
  options: LinuxProcessListOptions & { platform?: NodeJS.Platform } = {},
): Promise<HostProcess[]> {
  const platform = options.platform ?? process.platform
  if (platform === 'linux') return listLinuxProcesses(options)
  if (platform === 'win32') return listWindowsProcesses(options)
  return listProcessesWithSysteminformation(options)
}
