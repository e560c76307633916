import type { LlamaBackends } from './types.ts'

/** GPU back-ends node-llama-cpp finds usable here (its prebuilt CUDA, Vulkan and Metal binaries). */
export async function probeLlamaBackends(timeoutMs: number): Promise<LlamaBackends> {
  let timer: NodeJS.Timeout | undefined
  try {
    const { getLlamaGpuTypes } = await import('node-llama-cpp')
    const types = await Promise.race([
      getLlamaGpuTypes('supported'),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`node-llama-cpp did not answer within ${timeoutMs} ms`)),
          timeoutMs,
        )
      }),
    ])
    return {
      gpu: types.filter((t): t is Exclude<typeof t, false> => t !== false).map(String),
      available: true,
      message: null,
    }
  } catch (err) {
    return {
      gpu: [],
      available: false,
      message: `the embedded engine cannot load here: ${(err as Error).message}`,
    }
  } finally {
    clearTimeout(timer)
  }
}
