import { readFile } from 'node:fs/promises'

export type EngineKind = 'llamacpp' | 'vllm'

export interface CatalogModel {
  id: string
  name: string
  family: string
  parametersB: number
  quantization: string
  format: 'gguf' | 'safetensors'
  weightsMiB: number
  architecture: { layers: number; kvHeads: number; headDim: number; kvBytesPerElement: number }
  /** Context the engine is started with (what the KV cache is sized for). */
  contextLength: number
  maxContextLength: number
  engines: EngineKind[]
  /** GPUs the model is split over (tensor parallel for vLLM, layer split for llama.cpp). */
  gpus: number
  kvCacheMiB: number
  /** Per GPU, for each engine: weights and KV cache share plus the engine's overhead. */
  minVramMiB: Partial<Record<EngineKind, number>>
  source: string
}

/** llama.cpp's compute buffers and CUDA/Vulkan context on top of weights and KV cache. */
export const llamaCppOverheadMiB = 512
/** vLLM's activations and CUDA graphs, and the share of the GPU it is told to use. */
export const vllmOverheadMiB = 1536
export const vllmGpuMemoryUtilization = 0.9

/** KV cache: K and V, per layer, per KV head, per head dimension, per token of context. */
export function kvCacheMiB(m: Pick<CatalogModel, 'architecture' | 'contextLength'>): number {
  const { layers, kvHeads, headDim, kvBytesPerElement } = m.architecture
  return (2 * layers * kvHeads * headDim * kvBytesPerElement * m.contextLength) / 2 ** 20
}

/** The VRAM arithmetic of docs/doctor.md, per GPU. */
export function requiredVramMiB(
  m: Pick<CatalogModel, 'architecture' | 'contextLength' | 'weightsMiB' | 'gpus'>,
  engine: EngineKind,
): number {
  const perGpu = (m.weightsMiB + kvCacheMiB(m)) / m.gpus
  return engine === 'llamacpp'
    ? Math.ceil(perGpu + llamaCppOverheadMiB)
    : Math.ceil((perGpu + vllmOverheadMiB) / vllmGpuMemoryUtilization)
}

/** RAM the embedded engine needs to run a model on the CPU. */
export function requiredRamMiB(
  m: Pick<CatalogModel, 'architecture' | 'contextLength' | 'weightsMiB'>,
): number {
  return Math.ceil(m.weightsMiB + kvCacheMiB(m) + llamaCppOverheadMiB)
}

export const defaultCatalogUrl = new URL('./models.json', import.meta.url)

export async function loadCatalog(url: URL | string = defaultCatalogUrl): Promise<CatalogModel[]> {
  const doc = JSON.parse(await readFile(url, 'utf8')) as { models?: CatalogModel[] }
  if (!Array.isArray(doc.models)) throw new Error(`model catalog ${String(url)} has no "models" list`)
  return doc.models
}
