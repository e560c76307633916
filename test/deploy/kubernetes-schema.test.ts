import { readFileSync } from 'node:fs'
import { PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule'
import { ServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor'
import { Ajv } from 'ajv'
import { Deployment } from 'kubernetes-models/apps/v1/Deployment'
import { StatefulSet } from 'kubernetes-models/apps/v1/StatefulSet'
import { PodDisruptionBudget } from 'kubernetes-models/policy/v1/PodDisruptionBudget'
import { ConfigMap } from 'kubernetes-models/v1/ConfigMap'
import { Namespace } from 'kubernetes-models/v1/Namespace'
import { PodTemplateSpec } from 'kubernetes-models/v1/PodTemplateSpec'
import { Service } from 'kubernetes-models/v1/Service'
import ts from 'typescript'
import { beforeAll, describe, expect, it } from 'vitest'
import type { KubeObject } from '../helpers/kustomize.ts'
import { podTemplates, renderAll, repoRoot } from './manifests.ts'

/**
 * The manifests against the Kubernetes API's schemas, offline. Two checks, both needed:
 * - kubernetes-models' validators (ajv, compiled from the Kubernetes OpenAPI definitions; the
 *   prometheus-operator package's from its CRDs): types, required fields, enums, formats;
 * - the TypeScript compiler over the same definitions' types, each object as a literal: excess
 *   property checks refuse any field the API does not have, at any depth (a misspelled field, which
 *   the validators above let through, is refused here).
 * A RayCluster is checked against KubeRay's fields (test/fixtures/kubernetes/raycluster-v1.schema.json)
 * and its pod templates as Kubernetes PodTemplateSpecs, both ways.
 */

type Validating = new (data: never) => { validate(): void }

const runtimeModels: Record<string, Validating> = {
  'v1/Namespace': Namespace as unknown as Validating,
  'v1/ConfigMap': ConfigMap as unknown as Validating,
  'v1/Service': Service as unknown as Validating,
  'apps/v1/StatefulSet': StatefulSet as unknown as Validating,
  'apps/v1/Deployment': Deployment as unknown as Validating,
  'policy/v1/PodDisruptionBudget': PodDisruptionBudget as unknown as Validating,
  'monitoring.coreos.com/v1/ServiceMonitor': ServiceMonitor as unknown as Validating,
  'monitoring.coreos.com/v1/PrometheusRule': PrometheusRule as unknown as Validating,
}

/** The TypeScript interface of each kind, and the module that declares it. */
const typeModels: Record<string, { module: string; type: string }> = {
  'v1/Namespace': { module: 'kubernetes-models/v1/Namespace', type: 'INamespace' },
  'v1/ConfigMap': { module: 'kubernetes-models/v1/ConfigMap', type: 'IConfigMap' },
  'v1/Service': { module: 'kubernetes-models/v1/Service', type: 'IService' },
  'apps/v1/StatefulSet': { module: 'kubernetes-models/apps/v1/StatefulSet', type: 'IStatefulSet' },
  'apps/v1/Deployment': { module: 'kubernetes-models/apps/v1/Deployment', type: 'IDeployment' },
  'policy/v1/PodDisruptionBudget': {
    module: 'kubernetes-models/policy/v1/PodDisruptionBudget',
    type: 'IPodDisruptionBudget',
  },
  'monitoring.coreos.com/v1/ServiceMonitor': {
    module: '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor',
    type: 'IServiceMonitor',
  },
  'monitoring.coreos.com/v1/PrometheusRule': {
    module: '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule',
    type: 'IPrometheusRule',
  },
  podTemplate: { module: 'kubernetes-models/v1/PodTemplateSpec', type: 'IPodTemplateSpec' },
}

const rayClusterSchema = JSON.parse(
  readFileSync(new URL('../fixtures/kubernetes/raycluster-v1.schema.json', import.meta.url), 'utf8'),
)
const validateRayCluster = new Ajv({ allErrors: true, strict: true }).compile(rayClusterSchema)

const kindOf = (o: KubeObject): string => `${o.apiVersion}/${o.kind}`
const nameOf = (o: KubeObject): string => `${o.kind}/${o.metadata.name}`

/** Runtime (ajv) errors of one object, as "Kind/name: message". */
function runtimeErrors(o: KubeObject): string[] {
  if (o.kind === 'RayCluster') {
    const errors: string[] = []
    if (!validateRayCluster(o))
      for (const e of validateRayCluster.errors ?? [])
        errors.push(`${nameOf(o)}: ${e.instancePath} ${e.message}`)
    for (const { where, template } of podTemplates(o)) {
      try {
        new PodTemplateSpec(template as never).validate()
      } catch (err) {
        errors.push(`${where}: ${(err as Error).message}`)
      }
    }
    return errors
  }
  const Model = runtimeModels[kindOf(o)]
  if (Model == null) return [`${nameOf(o)}: no schema for ${kindOf(o)}`]
  try {
    new Model(o as never).validate()
    return []
  } catch (err) {
    return [`${nameOf(o)}: ${(err as Error).message}`]
  }
}

/** TypeScript's verdict on every object as a literal of its kind's type: "Kind/name: message". */
function typeErrors(objects: KubeObject[]): string[] {
  const file = `${repoRoot}test/deploy/__manifests__.ts`
  const lines = Object.values(typeModels).map((m) => `import type { ${m.type} } from '${m.module}'`)
  const owners: string[] = []
  const add = (type: string, value: unknown, owner: string): void => {
    owners[lines.length] = owner
    lines.push(`export const m${lines.length}: ${type} = ${JSON.stringify(value)}`)
  }
  for (const o of objects) {
    if (o.kind === 'RayCluster') {
      for (const { where, template } of podTemplates(o)) add('IPodTemplateSpec', template, where)
      continue
    }
    const model = typeModels[kindOf(o)]
    if (model == null) throw new Error(`no type for ${kindOf(o)}`)
    add(model.type, o, nameOf(o))
  }
  const source = lines.join('\n')
  const options: ts.CompilerOptions = {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    skipLibCheck: true,
    types: [],
  }
  const host = ts.createCompilerHost(options)
  const getSourceFile = host.getSourceFile.bind(host)
  host.getSourceFile = (name, language, ...rest) =>
    name === file ? ts.createSourceFile(name, source, language) : getSourceFile(name, language, ...rest)
  const fileExists = host.fileExists.bind(host)
  host.fileExists = (name) => name === file || fileExists(name)
  const program = ts.createProgram([file], options, host)
  const sourceFile = program.getSourceFile(file)!
  return ts.getPreEmitDiagnostics(program, sourceFile).map((d) => {
    const line = d.start != null ? sourceFile.getLineAndCharacterOfPosition(d.start).line : -1
    return `${owners[line] ?? 'imports'}: ${ts.flattenDiagnosticMessageText(d.messageText, ' ')}`
  })
}

describe('deploy/kubernetes and deploy/monitoring against the Kubernetes API schemas (offline)', () => {
  let rendered: Map<string, KubeObject[]>
  beforeAll(async () => {
    rendered = await renderAll()
  })

  it('renders every overlay and base into the kinds the project ships', () => {
    const kinds = (name: string) => rendered.get(name)!.map(nameOf).sort()
    expect(kinds('overlays/region-example')).toEqual([
      'ConfigMap/garage-region',
      'ConfigMap/garage-region-policy',
      'Namespace/garage-eu-north',
      'Service/garage-region',
      'Service/garage-region-metrics',
      'Service/garage-region-p2p',
      'ServiceMonitor/garage-region',
      'StatefulSet/garage-region',
    ])
    expect(kinds('overlays/federation-example')).toEqual([
      'ConfigMap/garage-federation',
      'Deployment/garage-federation',
      'Namespace/garage-federation',
      'PodDisruptionBudget/garage-federation',
      'Service/garage-federation',
      'ServiceMonitor/garage-federation',
    ])
    expect(kinds('overlays/ray-example')).toEqual(['Namespace/garage-eu-north-ray', 'RayCluster/garage-ray'])
    expect(kinds('monitoring')).toEqual([
      'ConfigMap/garage-dashboard-federation',
      'ConfigMap/garage-dashboard-node',
      'ConfigMap/garage-dashboard-region',
      'PrometheusRule/garage',
    ])
  })

  it('every object passes the API validators (kubernetes-models, prometheus-operator models, KubeRay fields)', () => {
    for (const [name, objects] of rendered) {
      expect(objects.flatMap(runtimeErrors), name).toEqual([])
    }
  })

  it('every object type-checks against the API types: no field the API lacks, none of the wrong type', () => {
    const all = [...rendered.values()].flat()
    expect(typeErrors(all)).toEqual([])
  }, 60_000)

  it('the checks refuse what the API would: a misspelled field, a wrong type, an unknown KubeRay field', () => {
    const region = structuredClone(rendered.get('overlays/region-example')!)
    const sts = region.find((o) => o.kind === 'StatefulSet')!
    const container = podTemplates(sts)[0]!.template.spec.containers[0]!
    // A typo the runtime validators let through; the types do not.
    ;(container.securityContext as Record<string, unknown>).readOnlyRootFileSystem = true
    expect(typeErrors([sts])).toEqual([
      expect.stringMatching(
        /^StatefulSet\/garage-region: .*readOnlyRootFileSystem.*does not exist in type 'ISecurityContext'/,
      ),
    ])
    ;(sts.spec as Record<string, unknown>).replicas = 'one'
    expect(runtimeErrors(sts)).toEqual([expect.stringMatching(/^StatefulSet\/garage-region: .*replicas/)])

    const ray = structuredClone(rendered.get('overlays/ray-example')!.find((o) => o.kind === 'RayCluster')!)
    ;(ray.spec as { headGroupSpec: Record<string, unknown> }).headGroupSpec.rayStartParam = {}
    expect(runtimeErrors(ray)).toEqual([
      'RayCluster/garage-ray: /spec/headGroupSpec must NOT have additional properties',
    ])
    const head = podTemplates(ray)[0]!.template.spec.containers[0]!
    ;(head as unknown as Record<string, unknown>).imagePullPolicy = 'Sometimes'
    expect(runtimeErrors(ray)).toEqual([
      'RayCluster/garage-ray: /spec/headGroupSpec must NOT have additional properties',
      expect.stringMatching(/^RayCluster\/garage-ray head: .*imagePullPolicy/),
    ])
  }, 60_000)
})
