import { readFile, stat } from 'node:fs/promises'
import { basename, join, resolve } from 'node:path'
import fastJsonPatch, { type Operation } from 'fast-json-patch'
import { parseAllDocuments, parse as parseYaml } from 'yaml'

/**
 * `kustomize build` for the kustomize features deploy/kubernetes uses, so tests render the overlays
 * with no kustomize binary (CI has none): resources (files and folders), namespace, images, replicas,
 * configMapGenerator (literals, files) with disableNameSuffixHash and labels, and JSON 6902 patches by kind and
 * name. Any other field of a kustomization is refused, so a feature added to the manifests cannot be
 * skipped here silently. Checked against kubectl kustomize (v5.5) on the overlays of this repo.
 */

export type KubeObject = {
  apiVersion: string
  kind: string
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; [k: string]: unknown }
  [k: string]: unknown
}

const supportedFields = new Set([
  'apiVersion',
  'kind',
  'resources',
  'namespace',
  'images',
  'replicas',
  'generatorOptions',
  'configMapGenerator',
  'patches',
])

/** The kinds kustomize's replicas field sets. */
const scalable = new Set(['Deployment', 'StatefulSet', 'ReplicaSet', 'ReplicationController'])

/** Kinds without a namespace among those the manifests use. */
const clusterScoped = new Set(['Namespace', 'CustomResourceDefinition', 'ClusterRole', 'ClusterRoleBinding'])

interface Kustomization {
  resources?: string[]
  namespace?: string
  images?: Array<{ name: string; newName?: string; newTag?: string; digest?: string }>
  replicas?: Array<{ name: string; count: number }>
  generatorOptions?: { disableNameSuffixHash?: boolean; labels?: Record<string, string> }
  configMapGenerator?: Array<{ name: string; literals?: string[]; files?: string[] }>
  patches?: Array<{ path?: string; patch?: string; target?: { kind?: string; name?: string } }>
}

export class KustomizeError extends Error {
  static override name = 'KustomizeError'
}

async function isDirectory(path: string): Promise<boolean> {
  return (await stat(path)).isDirectory()
}

async function loadKustomization(dir: string): Promise<Kustomization> {
  const file = join(dir, 'kustomization.yaml')
  const k = parseYaml(await readFile(file, 'utf8'), { version: '1.1' }) as Record<string, unknown>
  for (const field of Object.keys(k)) {
    if (!supportedFields.has(field)) throw new KustomizeError(`${file}: unsupported field ${field}`)
  }
  if (k.kind !== 'Kustomization') throw new KustomizeError(`${file}: kind must be Kustomization`)
  return k as Kustomization
}

async function parseObjects(file: string): Promise<KubeObject[]> {
  // YAML 1.1, as Kubernetes and kustomize read it (0400 is octal there, decimal in YAML 1.2).
  const docs = parseAllDocuments(await readFile(file, 'utf8'), { version: '1.1' })
  const out: KubeObject[] = []
  for (const doc of docs) {
    if (doc.errors.length > 0) throw new KustomizeError(`${file}: ${doc.errors[0]?.message}`)
    const obj = doc.toJS() as KubeObject | null
    if (obj == null) continue
    if (typeof obj.kind !== 'string' || typeof obj.metadata?.name !== 'string')
      throw new KustomizeError(`${file}: every object needs a kind and metadata.name`)
    out.push(obj)
  }
  return out
}

/** Every `containers` and `initContainers` list anywhere in the object (pod templates, CRDs). */
function* containerLists(node: unknown): Generator<Array<{ image?: string }>> {
  if (Array.isArray(node)) {
    for (const item of node) yield* containerLists(item)
    return
  }
  if (node == null || typeof node !== 'object') return
  for (const [key, value] of Object.entries(node)) {
    if ((key === 'containers' || key === 'initContainers') && Array.isArray(value)) yield value
    else yield* containerLists(value)
  }
}

function imageName(image: string): string {
  const at = image.indexOf('@')
  const withoutDigest = at === -1 ? image : image.slice(0, at)
  const colon = withoutDigest.lastIndexOf(':')
  return colon > withoutDigest.lastIndexOf('/') ? withoutDigest.slice(0, colon) : withoutDigest
}

function imageTag(image: string): string | undefined {
  const at = image.indexOf('@')
  if (at !== -1) return image.slice(at)
  const colon = image.lastIndexOf(':')
  return colon > image.lastIndexOf('/') ? image.slice(colon + 1) : undefined
}

async function generateConfigMaps(dir: string, k: Kustomization): Promise<KubeObject[]> {
  if ((k.configMapGenerator ?? []).length === 0) return []
  if (k.generatorOptions?.disableNameSuffixHash !== true) {
    throw new KustomizeError(
      `${dir}: configMapGenerator needs generatorOptions.disableNameSuffixHash (hashed names are not rendered here)`,
    )
  }
  const out: KubeObject[] = []
  for (const g of k.configMapGenerator ?? []) {
    const data: Record<string, string> = {}
    for (const literal of g.literals ?? []) {
      const eq = literal.indexOf('=')
      if (eq <= 0) throw new KustomizeError(`${dir}: literal ${JSON.stringify(literal)} is not KEY=VALUE`)
      data[literal.slice(0, eq)] = literal.slice(eq + 1)
    }
    for (const entry of g.files ?? []) {
      const eq = entry.indexOf('=')
      const [key, path] = eq === -1 ? [basename(entry), entry] : [entry.slice(0, eq), entry.slice(eq + 1)]
      data[key] = await readFile(join(dir, path), 'utf8')
    }
    const labels = k.generatorOptions.labels
    out.push({
      apiVersion: 'v1',
      kind: 'ConfigMap',
      metadata: { name: g.name, ...(labels != null ? { labels: { ...labels } } : {}) },
      data,
    })
  }
  return out
}

async function applyPatches(dir: string, k: Kustomization, objects: KubeObject[]): Promise<void> {
  for (const p of k.patches ?? []) {
    const text = p.patch ?? (p.path != null ? await readFile(join(dir, p.path), 'utf8') : null)
    if (text == null) throw new KustomizeError(`${dir}: a patch needs patch or path`)
    const ops = parseYaml(text, { version: '1.1' }) as Operation[]
    if (!Array.isArray(ops)) throw new KustomizeError(`${dir}: only JSON 6902 patches (a list of operations)`)
    const targets = objects.filter(
      (o) =>
        (p.target?.kind == null || o.kind === p.target.kind) &&
        (p.target?.name == null || o.metadata.name === p.target.name),
    )
    if (targets.length === 0)
      throw new KustomizeError(`${dir}: patch target ${JSON.stringify(p.target)} matches nothing`)
    for (const target of targets) {
      const errors = fastJsonPatch.validate(ops, target)
      if (errors != null)
        throw new KustomizeError(`${dir}: patch on ${target.kind}/${target.metadata.name}: ${errors.message}`)
      fastJsonPatch.applyPatch(target, ops, false, true)
    }
  }
}

/** Renders the kustomization in `dir` as `kustomize build dir` would (for the supported fields). */
export async function kustomizeBuild(dir: string): Promise<KubeObject[]> {
  const root = resolve(dir)
  const k = await loadKustomization(root)
  const objects: KubeObject[] = []
  for (const entry of k.resources ?? []) {
    const path = join(root, entry)
    objects.push(...((await isDirectory(path)) ? await kustomizeBuild(path) : await parseObjects(path)))
  }
  objects.push(...(await generateConfigMaps(root, k)))
  await applyPatches(root, k, objects)
  for (const r of k.replicas ?? []) {
    const matched = objects.filter((o) => o.metadata.name === r.name && scalable.has(o.kind))
    if (matched.length === 0) throw new KustomizeError(`${root}: replicas for ${r.name} match nothing`)
    for (const o of matched) (o.spec as { replicas?: number }).replicas = r.count
  }
  for (const image of k.images ?? []) {
    for (const o of objects) {
      for (const list of containerLists(o)) {
        for (const c of list) {
          if (c.image == null || imageName(c.image) !== image.name) continue
          const tag =
            image.digest != null ? `@${image.digest}` : image.newTag != null ? `:${image.newTag}` : undefined
          const oldTag = imageTag(c.image)
          c.image = `${image.newName ?? image.name}${tag ?? (oldTag == null ? '' : oldTag.startsWith('@') ? oldTag : `:${oldTag}`)}`
        }
      }
    }
  }
  if (k.namespace != null) {
    for (const o of objects) if (!clusterScoped.has(o.kind)) o.metadata.namespace = k.namespace
  }
  // One object per kind, namespace and name, as kustomize insists.
  const seen = new Set<string>()
  for (const o of objects) {
    const id = `${o.kind}/${o.metadata.namespace ?? ''}/${o.metadata.name}`
    if (seen.has(id)) throw new KustomizeError(`${root}: ${id} is defined twice`)
    seen.add(id)
  }
  return objects
}
