import { type CatalogModel, type EngineKind, requiredRamMiB } from './catalog.ts'
import type { GpuInfo, HardwareReport } from './types.ts'

/** vLLM's CUDA kernels need Volta (7.0) or newer. */
export const vllmMinComputeCapability = 7.0
/** The embedded engine may use this share of RAM for a CPU model; the gamer still uses the PC. */
export const cpuRamShare = 0.75

export type MissingPiece =
  | 'nvidia-gpu'
  | 'nvidia-driver'
  | 'compute-capability'
  | 'container-runtime'
  | 'container-engine-stopped'
  | 'gpu-container-path'
  | 'embedded-engine'

export interface EngineCapability {
  engine: EngineKind
  available: boolean
  /** Where it would run: a GPU back-end ("cuda", "vulkan", "metal"), "cpu", or null if unavailable. */
  device: string | null
  /** Which GPUs (indexes into report.gpus) it can use. */
  gpus: number[]
  /** Container runtime vLLM would use. */
  runtime: 'podman' | 'docker' | null
  missing: MissingPiece[]
  reason: string | null
}

export interface ModelFit {
  id: string
  name: string
  engine: EngineKind
  fits: boolean
  placement: 'gpu' | 'multi-gpu' | 'cpu' | null
  gpus: number[]
  requiredMiB: number
  reason: string | null
}

export interface Capability {
  engines: EngineCapability[]
  models: ModelFit[]
  canServe: boolean
  reason: string | null
}

function ccAtLeast(cc: string | null, min: number): boolean {
  return cc != null && Number(cc) >= min
}

export function vllmCapability(r: HardwareReport): EngineCapability {
  const nvidiaGpus = r.gpus.filter((g) => g.vendor === 'nvidia')
  const missing: MissingPiece[] = []
  let reason: string | null = null
  const usable = nvidiaGpus.filter((g) => ccAtLeast(g.computeCapability, vllmMinComputeCapability))
  if (r.nvidia.status === 'driver-error' || r.nvidia.status === 'timeout') {
    missing.push('nvidia-driver')
    reason = `vLLM needs a working NVIDIA driver: ${r.nvidia.message}`
  } else if (nvidiaGpus.length === 0) {
    missing.push('nvidia-gpu')
    reason = 'vLLM needs an NVIDIA GPU'
  } else if (usable.length === 0) {
    missing.push('compute-capability')
    reason = `vLLM needs compute capability ${vllmMinComputeCapability} or newer; ${nvidiaGpus.map((g) => `${g.name} is ${g.computeCapability}`).join(', ')}`
  }
  const { podman, docker } = r.containers
  const nc = r.nvidiaContainer
  const podmanPath = podman.reachable && nc.cdiDevices.length > 0
  const dockerPath =
    docker.reachable && (docker.nvidiaRuntime || (docker.cdiEnabled && nc.cdiDevices.length > 0))
  const runtime = podmanPath ? 'podman' : dockerPath ? 'docker' : null
  if (!podman.reachable && !docker.reachable) {
    missing.push(docker.installed || podman.installed ? 'container-engine-stopped' : 'container-runtime')
    reason ??=
      docker.installed || podman.installed
        ? 'vLLM needs a running container engine'
        : 'vLLM needs Podman or Docker'
  } else if (runtime == null) {
    missing.push('gpu-container-path')
    reason ??=
      'vLLM needs the NVIDIA Container Toolkit (a CDI spec or the nvidia runtime) to give containers the GPU'
  }
  const available = missing.length === 0
  return {
    engine: 'vllm',
    available,
    device: available ? 'cuda' : null,
    gpus: available ? usable.map((g) => r.gpus.indexOf(g)) : [],
    runtime: available ? runtime : null,
    missing,
    reason: available ? null : reason,
  }
}

export function llamaCppCapability(r: HardwareReport): EngineCapability {
  if (!r.llama.available) {
    return {
      engine: 'llamacpp',
      available: false,
      device: null,
      gpus: [],
      runtime: null,
      missing: ['embedded-engine'],
      reason: r.llama.message,
    }
  }
  const pick = (backend: string, match: (g: GpuInfo) => boolean): EngineCapability | null => {
    if (!r.llama.gpu.includes(backend)) return null
    const gpus = r.gpus.filter(match)
    if (gpus.length === 0) return null
    return {
      engine: 'llamacpp',
      available: true,
      device: backend,
      gpus: gpus.map((g) => r.gpus.indexOf(g)),
      runtime: null,
      missing: [],
      reason: null,
    }
  }
  return (
    pick('cuda', (g) => g.vendor === 'nvidia') ??
    pick('metal', (g) => g.vendor === 'apple') ??
    pick('vulkan', (g) => g.vramTotalMiB > 0) ?? {
      engine: 'llamacpp',
      available: true,
      device: 'cpu',
      gpus: [],
      runtime: null,
      missing: [],
      reason: null,
    }
  )
}

function fitOnGpus(model: CatalogModel, engine: EngineKind, gpus: GpuInfo[], indexes: number[]): ModelFit {
  const required = model.minVramMiB[engine] ?? Number.POSITIVE_INFINITY
  const big = indexes.filter((i) => (gpus[i]?.vramTotalMiB ?? 0) >= required)
  const base = { id: model.id, name: model.name, engine, requiredMiB: required }
  if (big.length >= model.gpus) {
    return {
      ...base,
      fits: true,
      placement: model.gpus > 1 ? 'multi-gpu' : 'gpu',
      gpus: big.slice(0, model.gpus),
      reason: null,
    }
  }
  const largest = Math.max(0, ...indexes.map((i) => gpus[i]?.vramTotalMiB ?? 0))
  const reason =
    model.gpus > 1
      ? `needs ${model.gpus} GPUs with ${required} MiB each; ${big.length} here`
      : `needs ${required} MiB of VRAM; the largest GPU here has ${largest} MiB`
  return { ...base, fits: false, placement: null, gpus: [], reason }
}

/** Which engines can run here and which catalog models fit, engine by engine. */
export function assessCapability(report: HardwareReport, catalog: CatalogModel[]): Capability {
  const engines = [llamaCppCapability(report), vllmCapability(report)]
  const models: ModelFit[] = []
  for (const model of catalog) {
    for (const kind of model.engines) {
      const cap = engines.find((e) => e.engine === kind)!
      if (!cap.available) {
        models.push({
          id: model.id,
          name: model.name,
          engine: kind,
          fits: false,
          placement: null,
          gpus: [],
          requiredMiB: model.minVramMiB[kind] ?? 0,
          reason: cap.reason,
        })
        continue
      }
      const onGpu = cap.gpus.length > 0 ? fitOnGpus(model, kind, report.gpus, cap.gpus) : null
      if (onGpu?.fits === true || kind === 'vllm') {
        models.push(onGpu!)
        continue
      }
      // The embedded engine falls back to the CPU for single-GPU models that fit in RAM.
      const ram = requiredRamMiB(model)
      const cpuOk = model.gpus === 1 && ram <= report.system.memory.totalMiB * cpuRamShare
      models.push({
        id: model.id,
        name: model.name,
        engine: kind,
        fits: cpuOk,
        placement: cpuOk ? 'cpu' : null,
        gpus: [],
        requiredMiB: cpuOk ? ram : (onGpu?.requiredMiB ?? ram),
        reason: cpuOk
          ? null
          : (onGpu?.reason ??
            (model.gpus > 1
              ? `needs ${model.gpus} GPUs`
              : `needs ${ram} MiB of RAM on the CPU; ${Math.floor(report.system.memory.totalMiB * cpuRamShare)} MiB usable here`)),
      })
    }
  }
  const servable = engines.filter((e) => e.available && models.some((m) => m.engine === e.engine && m.fits))
  let reason: string | null = null
  if (servable.length === 0) {
    reason = engines.every((e) => !e.available)
      ? `no engine can run here: ${engines.map((e) => e.reason).join('; ')}`
      : 'no model of the catalog fits this machine'
  }
  return { engines, models, canServe: servable.length > 0, reason }
}
