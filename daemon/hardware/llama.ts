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
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--input-type=module', '--no-warnings', '-e', script],
      { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 64 * 1024, cwd: import.meta.dirname },
      (err, stdout, stderr) => {
        if (err != null) {
          const why = (err as { killed?: boolean }).killed
            ? `node-llama-cpp did not answer within ${timeoutMs} ms`
            : (stderr.trim().split('\n').at(-1) ?? err.message)
          resolve({ gpu: [], available: false, message: `the embedded engine cannot load here: ${why}` })
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
}
