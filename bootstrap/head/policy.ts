import { readFile } from 'node:fs/promises'
import { GarageError } from '../../core/errors.ts'
import { isPlainObject } from '../../core/guards.ts'
import { regionNamePattern } from '../../mesh/certificate.ts'
import { maxGroupSize, maxModelNameLength, maxModelSourceLength } from '../../mesh/join-protocol.ts'
import type { ModelSource, ModelTask } from '../../mesh/region-messages.ts'

/**
 * The region policy: the JSON file a coordinator writes to say which models the region serves, how
 * many replicas of each it wants and what a node needs to run one. docs/region.md documents it.
 */

export type PolicyEngine = 'vllm' | 'llamacpp'

export interface ModelPolicy {
  /** Served model name: what API consumers put in `model`. */
  name: string
  /** Engines in order of preference; a node gets the first one it can run. */
  engine: PolicyEngine[]
  source: ModelSource
  /** Nodes the region wants serving this model. */
  replicas: number
  /** GPU memory a node must let Garage use; 0 means the model also runs on a CPU. */
  minVramMiB: number
  /** Host memory the model needs (on a CPU, within the node's RAM cap). */
  minRamMiB: number
  parallel?: number
  contextLength?: number
  /** What the model serves: 'generate' (chat, completions; the default) or 'embed' (/v1/embeddings). */
  task: ModelTask
  /**
   * A model larger than one GPU: served by a group of this many opted-in nodes of the region's
   * trusted Ray cluster, one pipeline stage each (vLLM's --pipeline-parallel-size), not by single nodes.
   */
  pipelineParallel?: number
  /** GPUs per stage (--tensor-parallel-size); default 1. */
  tensorParallel?: number
  /** The model's layers, when known: a group's credits are split by the layers each stage holds. */
  layers?: number
  /** Tokens the model knows, when known: the integrity check's bound at temperatures above 1 tightens with it. */
  vocabularySize?: number
}

export interface RayPolicy {
  enabled: boolean
  /** The region certificate marks the cluster trusted: only then do opted-in nodes get credentials. */
  trusted: boolean
  /** The Ray head's GCS port. */
  port?: number
}

export interface RegionPolicy {
  region: string
  models: ModelPolicy[]
  ray: RayPolicy
}

/** A policy file that cannot be used; the message names the field (the CLI prints it as one line). */
export class RegionPolicyError extends GarageError {
  constructor(message: string, options?: ErrorOptions) {
    super(message, 'REGION_POLICY', options)
  }
}

export const maxPolicyModels = 256
export const maxReplicas = 100_000
export const maxParallel = 1024
export const maxContextLength = 16 * 1024 * 1024
const policyEngines: readonly PolicyEngine[] = ['vllm', 'llamacpp']
/** Letters, digits and `._:/-`: safe in URLs, logs and metric labels. */
const modelNamePattern = /^[A-Za-z0-9][A-Za-z0-9._:/-]*$/

function fail(field: string, message: string): never {
  throw new RegionPolicyError(`region policy: ${field} ${message}`)
}

function describe(v: unknown): string {
  if (v === undefined) return 'nothing'
  const json = JSON.stringify(v)
  return json.length > 40 ? `${json.slice(0, 37)}...` : json
}

function knownKeys(obj: Record<string, unknown>, path: (key: string) => string, keys: string[]): void {
  for (const k of Object.keys(obj)) {
    if (!keys.includes(k)) fail(path(k), `is not a known field (known: ${keys.join(', ')})`)
  }
}

function integer(v: unknown, field: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
    fail(field, `must be a whole number from ${min} to ${max}, got ${describe(v)}`)
  }
  return v
}

function text(v: unknown, field: string, max: number): string {
  if (typeof v !== 'string' || v.length === 0 || v.length > max) {
    fail(field, `must be a string of 1-${max} characters, got ${describe(v)}`)
  }
  return v
}

function parseModel(m: unknown, field: string): ModelPolicy {
  if (!isPlainObject(m)) fail(field, `must be an object, got ${describe(m)}`)
  knownKeys(m, (k) => `${field}.${k}`, [
    'name',
    'engine',
    'source',
    'replicas',
    'minVramMiB',
    'minRamMiB',
    'parallel',
    'contextLength',
    'task',
    'pipelineParallel',
    'tensorParallel',
    'layers',
    'vocabularySize',
  ])
  const name = text(m.name, `${field}.name`, maxModelNameLength)
  if (!modelNamePattern.test(name)) {
    fail(
      `${field}.name`,
      `must be letters, digits and . _ : / - (starting with a letter or digit), got ${describe(name)}`,
    )
  }
  // Field paths name the model too: in a long list the index alone is hard to find.
  const at = (k: string): string => `${field}.${k} (model ${name})`

  if (!Array.isArray(m.engine) || m.engine.length === 0) {
    fail(
      at('engine'),
      `must be a non-empty list of engines in order of preference, got ${describe(m.engine)}`,
    )
  }
  const engine = m.engine.map((e: unknown, j: number): PolicyEngine => {
    if (typeof e !== 'string' || !(policyEngines as readonly string[]).includes(e)) {
      fail(at(`engine[${j}]`), `must be one of ${policyEngines.join(', ')}, got ${describe(e)}`)
    }
    return e as PolicyEngine
  })
  if (new Set(engine).size !== engine.length) fail(at('engine'), 'lists an engine twice')

  if (!isPlainObject(m.source))
    fail(at('source'), `must be an object with gguf and/or hf, got ${describe(m.source)}`)
  knownKeys(m.source, (k) => at(`source.${k}`), ['gguf', 'hf'])
  const source: ModelSource = {}
  if (m.source.gguf !== undefined) source.gguf = text(m.source.gguf, at('source.gguf'), maxModelSourceLength)
  if (m.source.hf !== undefined) source.hf = text(m.source.hf, at('source.hf'), maxModelSourceLength)
  if (engine.includes('llamacpp') && source.gguf == null) {
    fail(
      at('source.gguf'),
      'is required for engine llamacpp (a GGUF path, hf:owner/repo/file.gguf or garage-tiny)',
    )
  }
  if (engine.includes('vllm') && source.hf == null) {
    fail(at('source.hf'), 'is required for engine vllm (a Hugging Face repo id)')
  }

  const model: ModelPolicy = {
    name,
    engine,
    source,
    replicas: integer(m.replicas, at('replicas'), 1, maxReplicas),
    minVramMiB: integer(m.minVramMiB, at('minVramMiB'), 0, Number.MAX_SAFE_INTEGER),
    minRamMiB: integer(m.minRamMiB, at('minRamMiB'), 0, Number.MAX_SAFE_INTEGER),
    task: 'generate',
  }
  if (m.task !== undefined) {
    if (m.task !== 'generate' && m.task !== 'embed')
      fail(at('task'), `must be generate or embed, got ${describe(m.task)}`)
    model.task = m.task
  }
  if (m.parallel !== undefined) model.parallel = integer(m.parallel, at('parallel'), 1, maxParallel)
  if (m.contextLength !== undefined) {
    model.contextLength = integer(m.contextLength, at('contextLength'), 1, maxContextLength)
  }
  if (m.pipelineParallel !== undefined) {
    model.pipelineParallel = integer(m.pipelineParallel, at('pipelineParallel'), 2, maxGroupSize)
    if (!engine.includes('vllm')) fail(at('engine'), 'must list vllm: a pipeline group runs vLLM on Ray')
    if (model.replicas !== 1) fail(at('replicas'), 'must be 1 for a pipeline group (one group per model)')
    if (model.task !== 'generate') fail(at('task'), 'must be generate for a pipeline group')
  }
  if (m.tensorParallel !== undefined) {
    if (model.pipelineParallel == null) fail(at('tensorParallel'), 'needs pipelineParallel')
    model.tensorParallel = integer(m.tensorParallel, at('tensorParallel'), 1, 8)
  }
  if (m.layers !== undefined) model.layers = integer(m.layers, at('layers'), 1, 10_000)
  if (m.vocabularySize !== undefined)
    model.vocabularySize = integer(m.vocabularySize, at('vocabularySize'), 2, 16_777_216)
  return model
}

function parseRay(r: unknown): RayPolicy {
  if (r === undefined) return { enabled: false, trusted: false }
  if (!isPlainObject(r)) fail('ray', `must be an object like { "enabled": false }, got ${describe(r)}`)
  knownKeys(r, (k) => `ray.${k}`, ['enabled', 'trusted', 'port'])
  if (typeof r.enabled !== 'boolean') fail('ray.enabled', `must be true or false, got ${describe(r.enabled)}`)
  if (r.trusted !== undefined && typeof r.trusted !== 'boolean') {
    fail('ray.trusted', `must be true or false, got ${describe(r.trusted)}`)
  }
  const ray: RayPolicy = { enabled: r.enabled, trusted: r.trusted === true }
  if (r.port !== undefined) ray.port = integer(r.port, 'ray.port', 1, 65_535)
  return ray
}

/** Checks a policy (JSON text or already parsed) and returns it with defaults filled in. */
export function parseRegionPolicy(json: unknown): RegionPolicy {
  let value = json
  if (typeof json === 'string') {
    try {
      value = JSON.parse(json)
    } catch (err) {
      throw new RegionPolicyError(`region policy: not JSON: ${(err as Error).message}`)
    }
  }
  if (!isPlainObject(value))
    fail('the top level', `must be an object with region and models, got ${describe(value)}`)
  knownKeys(value, (k) => k, ['region', 'models', 'ray'])
  const region = text(value.region, 'region', 63)
  if (!regionNamePattern.test(region)) {
    fail(
      'region',
      `must be lowercase letters, digits and dashes (1-63, as in the certificate), got ${describe(region)}`,
    )
  }
  if (!Array.isArray(value.models) || value.models.length === 0 || value.models.length > maxPolicyModels) {
    fail('models', `must be a list of 1-${maxPolicyModels} models, got ${describe(value.models)}`)
  }
  const models = value.models.map((m: unknown, i: number) => parseModel(m, `models[${i}]`))
  const seen = new Set<string>()
  for (const [i, m] of models.entries()) {
    if (seen.has(m.name)) fail(`models[${i}].name`, `${describe(m.name)} is listed twice`)
    seen.add(m.name)
  }
  const ray = parseRay(value.ray)
  for (const [i, m] of models.entries()) {
    if (m.pipelineParallel != null && !(ray.enabled && ray.trusted))
      fail(
        `models[${i}].pipelineParallel (model ${m.name})`,
        'needs the region to run a trusted Ray cluster (ray.enabled and ray.trusted): its members share one cluster with no isolation between them',
      )
  }
  return { region, models, ray }
}

/** Reads and checks a policy file; every failure is a RegionPolicyError naming the file and the field. */
export async function loadRegionPolicy(path: string): Promise<RegionPolicy> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    const why =
      code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : (err as Error).message
    throw new RegionPolicyError(`cannot read region policy ${path}: ${why}`, { cause: err })
  }
  try {
    return parseRegionPolicy(text)
  } catch (err) {
    if (!(err instanceof RegionPolicyError)) throw err
    throw new RegionPolicyError(err.message.replace(/^region policy/, `region policy ${path}`), {
      cause: err,
    })
  }
}
