import { fileURLToPath } from 'node:url'
import { type KubeObject, kustomizeBuild } from '../helpers/kustomize.ts'

/** What deploy/kubernetes holds, rendered; shared by the manifest tests and the devnet metrics test. */

export const repoRoot = fileURLToPath(new URL('../../', import.meta.url))
export const kubernetesDir = `${repoRoot}deploy/kubernetes`
export const overlays = ['region-example', 'federation-example', 'ray-example'] as const
export const bases = ['region', 'federation', 'ray'] as const

export interface Container {
  name: string
  image: string
  command?: string[]
  args?: string[]
  env?: Array<{
    name: string
    value?: string
    valueFrom?: {
      configMapKeyRef?: { name: string; key: string }
      secretKeyRef?: { name: string; key: string }
    }
  }>
  ports?: Array<{ name: string; containerPort: number }>
  volumeMounts?: Array<{ name: string; mountPath: string; readOnly?: boolean }>
  readinessProbe?: Probe
  livenessProbe?: Probe
  startupProbe?: Probe
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> }
  securityContext?: {
    allowPrivilegeEscalation?: boolean
    readOnlyRootFilesystem?: boolean
    capabilities?: { drop?: string[]; add?: string[] }
  }
}

export interface Probe {
  httpGet?: { path: string; port: string | number }
  tcpSocket?: { port: string | number }
}

export interface Volume {
  name: string
  emptyDir?: { medium?: string; sizeLimit?: string }
  secret?: { secretName: string; items?: Array<{ key: string; path: string }> }
  configMap?: { name: string; items?: Array<{ key: string; path: string }> }
}

export interface PodTemplate {
  metadata?: { labels?: Record<string, string> }
  spec: {
    containers: Container[]
    initContainers?: Container[]
    volumes?: Volume[]
    securityContext?: {
      runAsNonRoot?: boolean
      runAsUser?: number
      runAsGroup?: number
      seccompProfile?: { type: string }
    }
    automountServiceAccountToken?: boolean
    hostNetwork?: boolean
  }
}

/** Every pod template in an object: a workload's, or a RayCluster's head and worker groups'. */
export function podTemplates(o: KubeObject): Array<{ where: string; template: PodTemplate }> {
  const spec = o.spec as Record<string, unknown> | undefined
  if (o.kind === 'RayCluster') {
    const head = spec?.headGroupSpec as { template: PodTemplate }
    const workers = (spec?.workerGroupSpecs as Array<{ groupName: string; template: PodTemplate }>) ?? []
    return [
      { where: `${o.kind}/${o.metadata.name} head`, template: head.template },
      ...workers.map((w) => ({ where: `${o.kind}/${o.metadata.name} ${w.groupName}`, template: w.template })),
    ]
  }
  const template = spec?.template as PodTemplate | undefined
  return template?.spec?.containers != null ? [{ where: `${o.kind}/${o.metadata.name}`, template }] : []
}

export async function renderOverlay(name: string): Promise<KubeObject[]> {
  return kustomizeBuild(`${kubernetesDir}/overlays/${name}`)
}

export async function renderAll(): Promise<Map<string, KubeObject[]>> {
  const out = new Map<string, KubeObject[]>()
  for (const o of overlays) out.set(`overlays/${o}`, await kustomizeBuild(`${kubernetesDir}/overlays/${o}`))
  for (const b of bases) out.set(`base/${b}`, await kustomizeBuild(`${kubernetesDir}/base/${b}`))
  out.set('monitoring', await kustomizeBuild(`${repoRoot}deploy/monitoring`))
  return out
}
