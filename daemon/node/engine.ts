import { access, mkdir } from 'node:fs/promises'
import { isAbsolute, join } from 'node:path'
import type { PullProgress } from '../../containers/types.ts'
import { GarageError } from '../../core/errors.ts'
import type { Logger } from '../../core/logger.ts'
import type { Assignment } from '../../mesh/region-messages.ts'
import { pullGgufModel } from '../engines/llamacpp/gguf-pull.ts'
import { writeTinyModel } from '../engines/llamacpp/tiny-model.ts'
import type { RayWorker } from '../engines/ray/worker.ts'
import type { Engine, EngineHandle, EngineMetrics } from '../engines/types.ts'
import type { HardwareReport } from '../hardware/types.ts'
import type { EngineContext } from './engines.ts'

export class NodeJoinError extends GarageError {}

export interface NodeEngineInit {
  dataDir: string
  /** Where models are kept (default `<dataDir>/models`). */
  modelsDir?: string
  threads?: number
  maxTokensPerSecond?: number
  vramCapMiB?: number
  /** The address the region's Ray head reaches this node at (LAN or VPN). */
  rayNodeIpAddress?: string
  logger: Logger
  /** The engine's detail (a pull's progress, a failure) changed: status displays redraw. */
  onDetail?(detail: string | null): void
  /** The serving engine failed for good (a crash loop): the node finds another way to serve. */
  onFault?(fault: EngineFault): void
}

export interface NodeEngineComponents {
  /** The engine an assignment names. */
  createEngine(assignment: Assignment, context: EngineContext): Engine
  createRayWorker(): RayWorker
}

/** An engine that failed for good: the engine, and why (one line, for the head and the status). */
export interface EngineFault {
  engine: Assignment['engine']
  reason: string
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  )
}

/**
 * The node's engine and its Ray worker: starts what an assignment names with the model it names,
 * stops it for a pause (freeing the GPU), and tells the infer handler where it listens.
 */
export class NodeEngine {
  readonly #init: NodeEngineInit
  readonly #c: NodeEngineComponents
  #engine: Engine | null = null
  #handle: EngineHandle | null = null
  #running: Assignment | null = null
  #rayWorker: RayWorker | null = null
  /** GPUs the running Ray worker offers the cluster (a pipeline stage's, or none). */
  #rayWorkerGpus = 0
  #detail: string | null = null
  readonly #faults = new Map<Assignment['engine'], string>()

  constructor(init: NodeEngineInit, components: NodeEngineComponents) {
    this.#init = init
    this.#c = components
  }

  get handle(): EngineHandle | null {
    return this.#handle
  }

  /** The engine's process, when it has one on this machine (its own GPU work is not "someone else"). */
  get pid(): number | null {
    return (this.#engine as { pid?: number | null } | null)?.pid ?? null
  }

  /** True when the engine serving now is the one `assignment` names. */
  serves(assignment: Assignment): boolean {
    const running = this.#running
    if (running == null || running.model !== assignment.model || running.engine !== assignment.engine)
      return false
    // A pipeline stage has no engine here: the same stage is the same work.
    if (assignment.engine === 'ray') return running.group?.rank === assignment.group?.rank
    return this.#handle != null
  }

  /** The Ray worker, when one runs: in the cluster, or joining it. */
  get rayState(): 'ready' | 'starting' | null {
    const worker = this.#rayWorker
    if (worker == null) return null
    return worker.state === 'ready' ? 'ready' : 'starting'
  }

  /** What the engine is doing beyond serving: pulling its image (how far), or why it failed. */
  get detail(): string | null {
    return this.#detail
  }

  /** Engines that failed on this node since it started, with why: not offered to the head again. */
  get faults(): EngineFault[] {
    return [...this.#faults].map(([engine, reason]) => ({ engine, reason }))
  }

  /** Remembers that `engine` cannot serve here (until the node restarts). */
  markFailed(fault: EngineFault): void {
    this.#faults.set(fault.engine, fault.reason)
    this.#setDetail(`${fault.engine} failed: ${fault.reason}`)
  }

  #setDetail(detail: string | null): void {
    if (detail === this.#detail) return
    this.#detail = detail
    this.#init.onDetail?.(detail)
  }

  async metrics(): Promise<EngineMetrics | null> {
    return (await this.#engine?.metrics().catch(() => null)) ?? null
  }

  /** Starts the engine the assignment names (stopping another first). */
  async start(assignment: Assignment): Promise<void> {
    await this.release()
    const log = this.#init.logger
    if (assignment.engine === 'ray') {
      // A pipeline stage: no engine of its own; the GPU goes to the Ray cluster (startRayWorker).
      this.#running = assignment
      const g = assignment.group!
      this.#setDetail(
        `pipeline stage ${g.rank + 1} of ${g.size} of ${assignment.model} on the region's Ray cluster`,
      )
      log.info({ model: assignment.model, stage: g.rank, of: g.size }, 'serving a pipeline stage')
      return
    }
    let lastLog = 0
    const engine = this.#c.createEngine(assignment, {
      onPullProgress: (p) => {
        const detail = pullDetail(p)
        this.#setDetail(detail)
        if (Date.now() - lastLog >= 5_000 || p.phase === 'done') {
          lastLog = Date.now()
          log.info({ image: p.image, phase: p.phase, fraction: p.fraction }, detail)
        }
      },
    })
    this.#engine = engine
    engine.addEventListener('crashed', (evt) => {
      const reason = oneLine(evt.detail.error.message)
      log.error({ err: reason, engine: assignment.engine }, 'engine crashed')
      // Only the engine serving now: a crash of one already replaced is old news.
      if (this.#engine !== engine) return
      this.#init.onFault?.({ engine: assignment.engine, reason })
    })
    const model =
      assignment.engine === 'llamacpp' ? await this.#resolveGguf(assignment) : assignment.source.hf
    if (model == null) {
      throw new NodeJoinError(
        `the assignment for ${assignment.model} names no model source`,
        'NO_MODEL_SOURCE',
      )
    }
    const args = assignment.engineArgs
    this.#handle = await engine.start({
      model,
      servedModelName: assignment.model,
      ...(args.parallel != null ? { parallel: args.parallel } : {}),
      ...(args.contextLength != null ? { contextLength: args.contextLength } : {}),
      ...(args.gpuMemoryUtilization != null ? { gpuMemoryUtilization: args.gpuMemoryUtilization } : {}),
      ...(this.#init.threads != null ? { threads: this.#init.threads } : {}),
      ...(this.#init.maxTokensPerSecond != null ? { maxTokensPerSecond: this.#init.maxTokensPerSecond } : {}),
      ...(assignment.task === 'embed' ? { task: 'embed' as const } : {}),
    })
    this.#running = assignment
    // A failure shown before stays shown (the node serves on another engine because of it).
    if (this.#faults.size === 0) this.#setDetail(null)
    log.info({ model: assignment.model, url: this.#handle.baseUrl }, 'engine ready')
  }

  /**
   * Stops the engine and leaves the Ray cluster: the processes exit and take the model (and the GPU
   * memory) with them.
   */
  async release(): Promise<void> {
    const engine = this.#engine
    this.#engine = null
    this.#handle = null
    this.#running = null
    await Promise.all([engine?.stop(), this.#stopRayWorker()])
  }

  async #stopRayWorker(): Promise<void> {
    const worker = this.#rayWorker
    this.#rayWorker = null
    await worker
      ?.stop()
      .catch((err: Error) =>
        this.#init.logger.warn({ err: err.message }, 'the Ray worker did not stop cleanly'),
      )
  }

  /**
   * Joins the region's Ray cluster when the assignment carries its credentials: the head sends them
   * only to nodes that opted in, for a cluster its certificate marks as trusted. A pipeline stage
   * offers the cluster its GPUs; any other node joins without GPUs (its GPU is its own engine's), so
   * a group's vLLM lands on its stages only. A failure leaves a node with a model of its own serving
   * it; a stage that cannot join says so (the node offers the head no Ray worker again).
   */
  async startRayWorker(
    assignment: Assignment,
    hardware: HardwareReport | null,
    trusted: boolean,
  ): Promise<void> {
    if (assignment.ray == null) {
      await this.#stopRayWorker()
      return
    }
    const stage = assignment.engine === 'ray'
    const nvidia = hardware?.gpus.filter((g) => g.vendor === 'nvidia') ?? []
    const numGpus = stage ? nvidia.length : 0
    if (this.#rayWorker != null && this.#rayWorkerGpus === numGpus && this.#rayWorker.state !== 'crashed')
      return
    await this.#stopRayWorker()
    const worker = this.#c.createRayWorker()
    try {
      await worker.start({
        assignment: {
          region: assignment.region,
          headAddress: assignment.ray.address,
          token: assignment.ray.token,
          trusted,
          nodeIpAddress: this.#init.rayNodeIpAddress ?? '127.0.0.1',
          ...(assignment.ray.image != null ? { image: assignment.ray.image } : {}),
        },
        numGpus,
        vramMiB: stage
          ? Math.min(
              this.#init.vramCapMiB ?? Number.POSITIVE_INFINITY,
              nvidia.reduce((n, g) => n + g.vramTotalMiB, 0),
            )
          : 0,
      })
      this.#rayWorker = worker
      this.#rayWorkerGpus = numGpus
      worker.addEventListener('crashed', (evt) => {
        if (this.#rayWorker !== worker) return
        const reason = oneLine(`the Ray worker failed: ${evt.detail.error.message}`)
        this.#init.logger.error({ err: reason }, 'the Ray worker failed')
        if (this.#running?.engine === 'ray') this.#init.onFault?.({ engine: 'ray', reason })
      })
      this.#init.logger.info(
        { head: assignment.ray.address, gpus: numGpus },
        "joined the region's Ray cluster",
      )
    } catch (err) {
      const reason = oneLine(`cannot join the region's Ray cluster: ${(err as Error).message}`)
      this.#init.logger.error(
        { err: reason },
        stage ? 'cannot serve a pipeline stage' : "serving without the region's Ray cluster",
      )
      if (stage) throw new NodeJoinError(reason, 'RAY_WORKER_FAILED', { cause: err })
    }
  }

  /** Stops the Ray worker and the engine. */
  async stop(): Promise<void> {
    await this.release().catch(() => {})
  }

  /** The GGUF file the assignment names: the project's tiny model, a local path, or an hf: download. */
  async #resolveGguf(assignment: Assignment): Promise<string> {
    const source = assignment.source.gguf
    const dir = this.#init.modelsDir ?? join(this.#init.dataDir, 'models')
    if (source == null) throw new NodeJoinError(`no GGUF source for ${assignment.model}`, 'NO_MODEL_SOURCE')
    if (source === 'garage-tiny' || source === 'garage-tiny-embed') {
      // The project's own models, made on first use: a chat model and an embedding model.
      const path = join(dir, `${source}.gguf`)
      if (!(await exists(path))) {
        await mkdir(dir, { recursive: true })
        await writeTinyModel(path, { embedding: source === 'garage-tiny-embed' })
      }
      return path
    }
    if (source.startsWith('hf:') || source.startsWith('https://')) {
      let lastLog = 0
      const pulled = await pullGgufModel(source, {
        dir,
        onProgress: (p) => {
          if (Date.now() - lastLog < 5_000) return
          lastLog = Date.now()
          this.#init.logger.info(
            { model: assignment.model, done: p.downloadedBytes, total: p.totalBytes },
            'downloading model',
          )
        },
      })
      return pulled.path
    }
    if (!isAbsolute(source) || !(await exists(source))) {
      throw new NodeJoinError(
        `the model file ${source} for ${assignment.model} is not on this machine`,
        'MODEL_MISSING',
      )
    }
    return source
  }
}

/** One line of at most 128 characters (what a capability report carries). */
export function oneLine(text: string): string {
  const line = text.replace(/\s+/g, ' ').trim()
  return line.length <= 128 ? line : `${line.slice(0, 127)}…`
}

function gigabytes(bytes: number): string {
  return `${(bytes / 1e9).toFixed(1)} GB`
}

/** "pulling docker.io/vllm/vllm-openai:v0.30.0: 42% (3.4 of 8.1 GB)", as far as the CLI tells. */
export function pullDetail(p: PullProgress): string {
  if (p.phase === 'done') return `pulled ${p.image}`
  const parts: string[] = []
  if (p.fraction != null) parts.push(`${Math.floor(p.fraction * 100)}%`)
  if (p.bytesDone != null && p.bytesTotal != null)
    parts.push(`(${gigabytes(p.bytesDone)} of ${gigabytes(p.bytesTotal)})`)
  else if (p.layersTotal > 0) parts.push(`(${p.layersDone} of ${p.layersTotal} layers)`)
  return `pulling ${p.image}${parts.length > 0 ? `: ${parts.join(' ')}` : ''}`
}
