import { execa } from 'execa'

/** How a probe command ended; the probe never throws for a missing or broken tool. */
export type ToolStatus = 'ok' | 'not-found' | 'failed' | 'timeout'

export interface ToolResult {
  status: ToolStatus
  stdout: string
  stderr: string
  exitCode: number | null
}

export interface RunToolOptions {
  timeoutMs: number
  /** PATH and friends for the child; tests point PATH at recorded fakes. */
  env?: NodeJS.ProcessEnv
}

/** Output cap per stream: a tool that floods must not flood the daemon's memory. */
const maxOutputBytes = 4 * 1024 * 1024

/**
 * Runs an external tool with a hard deadline. A driver can hang nvidia-smi in the kernel where
 * even SIGKILL waits, so the deadline is enforced here too: we stop waiting, whatever the child does.
 */
export async function runTool(file: string, args: string[], options: RunToolOptions): Promise<ToolResult> {
  const child = execa(file, args, {
    timeout: options.timeoutMs,
    forceKillAfterDelay: 1_000,
    reject: false,
    stdin: 'ignore',
    maxBuffer: maxOutputBytes,
    ...(options.env != null ? { env: options.env, extendEnv: false } : {}),
  })
  let timer: NodeJS.Timeout | undefined
  const deadline = new Promise<'deadline'>((resolve) => {
    timer = setTimeout(() => resolve('deadline'), options.timeoutMs + 500)
  })
  const outcome = await Promise.race([child, deadline])
  clearTimeout(timer)
  if (outcome === 'deadline') {
    child.kill('SIGKILL')
    return { status: 'timeout', stdout: '', stderr: '', exitCode: null }
  }
  const stdout = String(outcome.stdout ?? '')
  const stderr = String(outcome.stderr ?? '')
  if (outcome.timedOut) return { status: 'timeout', stdout, stderr, exitCode: null }
  if (
    (outcome as { code?: string }).code === 'ENOENT' ||
    /ENOENT/.test(String(outcome.originalMessage ?? ''))
  ) {
    return { status: 'not-found', stdout, stderr, exitCode: null }
  }
  if (outcome.failed) return { status: 'failed', stdout, stderr, exitCode: outcome.exitCode ?? null }
  return { status: 'ok', stdout, stderr, exitCode: 0 }
}
