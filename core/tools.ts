import { execa } from 'execa'

/** How a probe command ended; the probe never throws for a missing or broken tool. */
export type ToolStatus = 'ok' | 'not-found' | 'failed' | 'timeout'

export interface ToolResult {
  status: ToolStatus
  stdout: string
  stderr: string
  exitCode: number | null
  /**
   * With status 'timeout': not run at all, because this tool timed out lately (backed off) or a
   * process of an earlier call is still alive (a driver hang that even SIGKILL does not end).
   */
  skipped?: 'backed-off' | 'still-running'
}

export interface RunToolOptions {
  timeoutMs: number
  /** PATH and friends for the child; tests point PATH at recorded fakes. */
  env?: NodeJS.ProcessEnv
  /**
   * Calls may overlap and a timeout does not back the tool off: for a container engine, which
   * serves concurrent commands and whose slow commands (run, pull) carry their own deadlines.
   * Default (false): at most one call of the tool in flight, the others queue behind it.
   */
  concurrent?: boolean
}

/** Output cap per stream: a tool that floods must not flood the daemon's memory. */
const maxOutputBytes = 4 * 1024 * 1024

/** After a timeout a tool is not run again for `min`, doubling per timeout up to `max`; an answer resets it. */
export const toolBackoffMs = { min: 5_000, max: 5 * 60_000 } as const

interface ToolGuard {
  /** Resolves when the call in flight (and every call queued before this one) is done. */
  tail: Promise<void>
  /** Processes abandoned at their deadline that have not exited yet. */
  alive: number
  backoffMs: number
  backoffUntil: number
}

/** One guard per tool, a tool being the file as found on a PATH. */
const guards = new Map<string, ToolGuard>()

/**
 * Runs an external tool with a hard deadline. A driver can hang nvidia-smi in the kernel where
 * even SIGKILL waits, and a tool that is a shell script leaves its children holding our pipes when
 * the shell is killed. So at the deadline the tool's whole process group (its own, as it runs
 * detached) is killed, our ends of its pipes are destroyed and its handle unref'd: the caller
 * stops waiting and the process can exit whatever the tool does. Unless `concurrent`, at most one
 * call of a tool is in flight, a tool that timed out is backed off, and none is started while an
 * abandoned one is still alive, so a hung driver cannot pile up processes.
 */
export async function runTool(file: string, args: string[], options: RunToolOptions): Promise<ToolResult> {
  if (options.concurrent === true) return (await spawnTool(file, args, options)).result
  const key = `${file}\0${options.env?.PATH ?? process.env.PATH ?? ''}`
  let guard = guards.get(key)
  if (guard == null) {
    guard = { tail: Promise.resolve(), alive: 0, backoffMs: 0, backoffUntil: 0 }
    guards.set(key, guard)
  }
  const previous = guard.tail
  let release!: () => void
  guard.tail = new Promise((resolve) => {
    release = resolve
  })
  try {
    await previous
    if (guard.alive > 0) return skipped(file, 'still-running')
    if (Date.now() < guard.backoffUntil) return skipped(file, 'backed-off')
    const run = await spawnTool(file, args, options)
    if (run.abandoned != null) {
      const g = guard
      g.alive++
      void run.abandoned.then(() => {
        g.alive--
      })
    }
    if (run.result.status === 'timeout') {
      guard.backoffMs = Math.min(Math.max(guard.backoffMs * 2, toolBackoffMs.min), toolBackoffMs.max)
      guard.backoffUntil = Date.now() + guard.backoffMs
    } else {
      guard.backoffMs = 0
      guard.backoffUntil = 0
    }
    return run.result
  } finally {
    release()
  }
}

function skipped(file: string, why: 'backed-off' | 'still-running'): ToolResult {
  const stderr =
    why === 'backed-off'
      ? `${file} timed out lately; not run again yet`
      : `${file} from an earlier call is still running after being killed`
  return { status: 'timeout', stdout: '', stderr, exitCode: null, skipped: why }
}

/** Called by tests: forgets every tool's backoff (processes still alive stay counted). */
export function resetToolBackoff(): void {
  for (const g of guards.values()) {
    g.backoffMs = 0
    g.backoffUntil = 0
  }
}

async function spawnTool(
  file: string,
  args: string[],
  options: RunToolOptions,
): Promise<{ result: ToolResult; abandoned: Promise<void> | null }> {
  const child = execa(file, args, {
    reject: false,
    stdin: 'ignore',
    maxBuffer: maxOutputBytes,
    // Its own process group: the deadline kills everything the tool started, and a Ctrl-C on our
    // terminal is ours to handle, not the tool's.
    detached: process.platform !== 'win32',
    ...(options.env != null ? { env: options.env, extendEnv: false } : {}),
  })
  // Exit of the process itself, not of its pipes (which a grandchild may hold).
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode != null || child.signalCode != null) resolve()
    else child.once('exit', () => resolve())
    child.once('error', () => resolve())
  })
  let timer: NodeJS.Timeout | undefined
  const deadline = new Promise<'deadline'>((resolve) => {
    timer = setTimeout(() => resolve('deadline'), options.timeoutMs)
  })
  const outcome = await Promise.race([child, deadline])
  clearTimeout(timer)
  if (outcome === 'deadline') {
    abandon(child)
    let done = false
    void exited.then(() => {
      done = true
    })
    // Give a killable tool a moment to be reaped, so the guard does not count it as alive.
    // A timer that holds the event loop: with the child unref'd, nothing else may (a CLI would exit 13).
    await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 50))])
    return {
      result: { status: 'timeout', stdout: '', stderr: '', exitCode: null },
      abandoned: done ? null : exited,
    }
  }
  const stdout = String(outcome.stdout ?? '')
  const stderr = String(outcome.stderr ?? '')
  const result: ToolResult =
    (outcome as { code?: string }).code === 'ENOENT' || /ENOENT/.test(String(outcome.originalMessage ?? ''))
      ? { status: 'not-found', stdout, stderr, exitCode: null }
      : outcome.failed
        ? { status: 'failed', stdout, stderr, exitCode: outcome.exitCode ?? null }
        : { status: 'ok', stdout, stderr, exitCode: 0 }
  return { result, abandoned: null }
}

/** Kills the tool's process group, drops our ends of its pipes and lets the event loop forget it. */
function abandon(child: ReturnType<typeof execa>): void {
  const pid = child.pid
  try {
    if (pid != null && process.platform !== 'win32') process.kill(-pid, 'SIGKILL')
    else child.kill('SIGKILL')
  } catch {
    // Already gone.
  }
  child.stdout?.destroy()
  child.stderr?.destroy()
  child.unref()
  // The result promise settles when it settles; nobody waits for it any more.
  child.catch(() => {})
}
