import { telemetryIntervalMs } from '../../mesh/protocols.ts'
import type { Assignment, CapabilityReport, GpuSummary, RayCredentials } from '../../mesh/region-messages.ts'
import type { ModelPolicy, PolicyEngine, RegionPolicy } from './policy.ts'

/** vLLM preallocates this share of the GPU; below 0.1 it cannot load anything, above 0.95 the desktop starves. */
export const minGpuMemoryUtilization = 0.1
export const maxGpuMemoryUtilization = 0.95

/** How a node would run a model: the engine and, for vLLM, the GPU it sized the fit on. */
export interface EngineFit {
  engine: PolicyEngine
  gpu: GpuSummary | null
}

/** GPU memory Garage may use on `gpu`: the smaller of the card and the user's cap. */
function usableVramMiB(gpu: GpuSummary, report: CapabilityReport): number {
  return Math.min(gpu.vramMiB, report.vramCapMiB)
}

function largestFitting(gpus: GpuSummary[], report: CapabilityReport, minVramMiB: number): GpuSummary | null {
  const fitting = gpus.filter((g) => usableVramMiB(g, report) > 0 && usableVramMiB(g, report) >= minVramMiB)
  fitting.sort((a, b) => b.vramMiB - a.vramMiB)
  return fitting[0] ?? null
}

function fitsEngine(model: ModelPolicy, report: CapabilityReport, engine: PolicyEngine): EngineFit | null {
  if (!report.engines.includes(engine)) return null
  const gpus = report.hardware.gpus
  if (engine === 'vllm') {
    const gpu = largestFitting(
      gpus.filter((g) => g.vendor === 'nvidia'),
      report,
      model.minVramMiB,
    )
    return gpu != null && model.minRamMiB <= report.hardware.ramMiB ? { engine, gpu } : null
  }
  // The embedded engine offloads to any GPU (CUDA, Vulkan, Metal), or runs a model that needs no GPU on the CPU.
  const gpu = model.minVramMiB > 0 ? largestFitting(gpus, report, model.minVramMiB) : null
  if (gpu != null && model.minRamMiB <= report.hardware.ramMiB) return { engine, gpu }
  if (model.minVramMiB === 0 && model.minRamMiB <= report.ramCapMiB) return { engine, gpu: null }
  return null
}

/** The first engine of the model's preference list that the node can run it on, or null. */
export function engineFor(model: ModelPolicy, report: CapabilityReport): EngineFit | null {
  for (const engine of model.engine) {
    const fit = fitsEngine(model, report, engine)
    if (fit != null) return fit
  }
  return null
}

/** vLLM's --gpu-memory-utilization from the user's cap, rounded down so the cap holds. */
export function gpuMemoryUtilization(vramCapMiB: number, gpu: GpuSummary): number {
  const share = gpu.vramMiB > 0 ? Math.floor((vramCapMiB / gpu.vramMiB) * 100) / 100 : 0
  return Math.min(maxGpuMemoryUtilization, Math.max(minGpuMemoryUtilization, share))
}

/**
 * Picks what a joining node serves: among the models it can run, the one furthest below its wanted
 * replicas (ties by policy order); when every model it can run has enough, the first of them anyway,
 * since extra capacity helps. Null when the node can run nothing in the policy.
 */
export function chooseAssignment(
  policy: RegionPolicy,
  report: CapabilityReport,
  currentReplicas: ReadonlyMap<string, number>,
  head: string,
  ray?: RayCredentials,
): Assignment | null {
  let best: { model: ModelPolicy; fit: EngineFit; deficit: number } | null = null
  for (const model of policy.models) {
    // A pipeline group's model is served by the group (groups.ts), never by one node alone.
    if (model.pipelineParallel != null) continue
    const fit = engineFor(model, report)
    if (fit == null) continue
    const deficit = model.replicas - (currentReplicas.get(model.name) ?? 0)
    if (best == null || Math.max(deficit, 0) > Math.max(best.deficit, 0)) best = { model, fit, deficit }
  }
  if (best == null) return null
  const { model, fit } = best

  const engineArgs: Assignment['engineArgs'] = {}
  if (model.parallel != null) engineArgs.parallel = model.parallel
  if (model.contextLength != null) engineArgs.contextLength = model.contextLength
  if (fit.engine === 'vllm' && fit.gpu != null) {
    engineArgs.gpuMemoryUtilization = gpuMemoryUtilization(report.vramCapMiB, fit.gpu)
  }
  const assignment: Assignment = {
    v: 1,
    region: policy.region,
    head,
    model: model.name,
    engine: fit.engine,
    // Only the source the chosen engine reads, so the node never guesses.
    source: fit.engine === 'vllm' ? { hf: model.source.hf! } : { gguf: model.source.gguf! },
    engineArgs,
    telemetryIntervalMs,
  }
  if (model.task === 'embed') assignment.task = 'embed'
  // Ray has no isolation between members: credentials only to opted-in nodes of a trusted cluster.
  if (ray != null && policy.ray.enabled && policy.ray.trusted && report.rayOptIn) assignment.ray = { ...ray }
  return assignment
}
