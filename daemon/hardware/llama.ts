import { execFile } from 'node:child_process'
import type { LlamaBackends } from './types.ts'

/**
 * Asks node-llama-cpp which of its prebuilt GPU back-ends (CUDA, Vulkan, Metal) can run here. In a
 * short-lived child process: loading node-llama-cpp costs a long-running daemon tens of MB it
 * would keep for nothing (the engine runs in a process of its own).
 */
const script = `
const { getLlamaGpuTypes } = await import('node-llama-cpp')
const types = await getLlamaGpuTypes('supported')
process.stdout.write(JSON.stringify(types.filter((t) => t !== false).map(String)))
`

export async function probeLlamaBackends(timeoutMs: number): Promise<LlamaBackends> {
  const first = await probeOnce(timeoutMs)
  // Loading node-llama-cpp is seconds of CPU: on a machine busy with other work (a game, several
  // daemons starting at once) the first try can run out of time. Once more, with three times as long,
  // before this machine is said not to run the embedded engine.
  if (first.timedOut) return (await probeOnce(3 * timeoutMs)).backends
  return first.backends
}

async function probeOnce(timeoutMs: number): Promise<{ backends: LlamaBackends; timedOut: boolean }> {
  const backends = await new Promise<LlamaBackends & { timedOut?: boolean }>((resolve) => {
    execFile(
      process.execPath,
      ['--input-type=module', '--no-warnings', '-e', script],
      { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 64 * 1024, cwd: import.meta.dirname },
      (err, stdout, stderr) => {
        if (err != null) {
          const timedOut = (err as { killed?: boolean }).killed === true
          const why = timedOut
            ? `node-llama-cpp did not answer within ${timeoutMs} ms`
            : (stderr.trim().split('\n').at(-1) ?? err.message)
          resolve({
            gpu: [],
            available: false,
            message: `the embedded engine cannot load here: ${why}`,
            timedOut,
          })
          return
        }
        try {
          const gpu = JSON.parse(stdout) as string[]
          resolve({ gpu, available: true, message: null })
        } catch {
          resolve({
            gpu: [],
            available: false,
            message: `the embedded engine's probe printed ${stdout.slice(0, 200)}`,
          })
        }
      },
    )
  })
  const { timedOut, ...rest } = backends
  return { backends: rest, timedOut: timedOut === true }
}
