import { readdirSync, readFileSync } from 'node:fs'
import { dirname, join, normalize, relative } from 'node:path'
import { multiaddr } from '@multiformats/multiaddr'
import ts from 'typescript'
import { beforeAll, describe, expect, it } from 'vitest'
import { defaultBootstrapHttpPort } from '../../bootstrap/bootstrap-node.ts'
import { defaultHeadHttpPort } from '../../bootstrap/head/head.ts'
import { parseRegionPolicy } from '../../bootstrap/head/policy.ts'
import { defaultRayGcsPort, rayHeadContainerSpec } from '../../bootstrap/head/ray-head.ts'
import { defaultBootstrapListen } from '../../cli/commands/bootstrap.ts'
import { parseHostPort } from '../../cli/io.ts'
import { commands } from '../../cli/main.ts'
import { rayImage } from '../../containers/images.ts'
import { defaultFederationPort } from '../../federation/gateway.ts'
import type { KubeObject } from '../helpers/kustomize.ts'
import { type Container, type PodTemplate, podTemplates, renderAll, repoRoot } from './manifests.ts'

/**
 * What the manifests say about Garage, checked against Garage's code: the commands and flags they
 * pass (read from each command's parseOptions table), the ports those flags bind and the code's
 * default ports, the env vars the code reads, the probe paths, the images (the Containerfile's and
 * the pinned Ray image), the files the flags name and the volumes that hold them, and the wiring
 * between the objects (selectors, named ports, ConfigMaps, the Secrets the docs tell operators to make).
 */

const pkg = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as {
  version: string
  dependencies: Record<string, string>
}
const containerfile = readFileSync(join(repoRoot, 'deploy/container/Containerfile'), 'utf8')
const coordinatorDocs = readFileSync(join(repoRoot, 'docs/coordinator.md'), 'utf8')

/** The base image name every overlay maps to a registry; the tag is Garage's version. */
const garageImageName = 'garage'

interface FlagSpec {
  type: 'string' | 'boolean'
  multiple: boolean
}

/** A command's options as its module declares them to parseOptions (cli/io.ts). */
function commandFlags(command: string): Map<string, FlagSpec> {
  const path = join(repoRoot, 'cli/commands', `${command}.ts`)
  const source = ts.createSourceFile(path, readFileSync(path, 'utf8'), ts.ScriptTarget.Latest, true)
  const flags = new Map<string, FlagSpec>()
  const visit = (node: ts.Node): void => {
    if (
      ts.isCallExpression(node) &&
      ts.isIdentifier(node.expression) &&
      node.expression.text === 'parseOptions' &&
      node.arguments[1] != null &&
      ts.isObjectLiteralExpression(node.arguments[1])
    ) {
      for (const prop of node.arguments[1].properties) {
        if (!ts.isPropertyAssignment(prop) || !ts.isObjectLiteralExpression(prop.initializer)) continue
        const name = ts.isIdentifier(prop.name) || ts.isStringLiteral(prop.name) ? prop.name.text : null
        if (name == null) continue
        const field = (key: string): string | undefined => {
          const p = (prop.initializer as ts.ObjectLiteralExpression).properties.find(
            (q) => ts.isPropertyAssignment(q) && ts.isIdentifier(q.name) && q.name.text === key,
          ) as ts.PropertyAssignment | undefined
          return p?.initializer.getText(source)
        }
        flags.set(name, {
          type: field('type') === "'boolean'" ? 'boolean' : 'string',
          multiple: field('multiple') === 'true',
        })
      }
    }
    ts.forEachChild(node, visit)
  }
  visit(source)
  if (flags.size === 0) throw new Error(`no parseOptions table in ${path}`)
  return flags
}

/** `--name=value` and `--name` arguments after the command. */
function parseArgs(args: string[]): Array<{ flag: string; value: string | null }> {
  return args.slice(1).map((a) => {
    const m = /^--([a-z][a-z0-9-]*)(?:=(.*))?$/s.exec(a)
    if (m == null) throw new Error(`argument ${JSON.stringify(a)} is not --flag or --flag=value`)
    return { flag: m[1]!, value: m[2] ?? null }
  })
}

/** Env var names the code reads (process.env.X, env.X, env['X']), from every source folder. */
/** `const somethingVar = 'GARAGE_...'`: an env var the code reads by that constant. */
function walkConstants(dir: string, names: Set<string>): void {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name)
    if (entry.isDirectory()) walkConstants(path, names)
    else if (entry.name.endsWith('.ts'))
      for (const m of readFileSync(path, 'utf8').matchAll(/\b\w+Var\s*=\s*['"](GARAGE_[A-Z0-9_]+)['"]/g))
        names.add(m[1]!)
  }
}

function envReadByCode(): Set<string> {
  const folders = [
    'core',
    'mesh',
    'openai',
    'routing',
    'containers',
    'daemon',
    'bootstrap',
    'federation',
    'cli',
  ]
  const names = new Set<string>()
  const walk = (dir: string): void => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name)
      if (entry.isDirectory()) walk(path)
      else if (entry.name.endsWith('.ts'))
        for (const m of readFileSync(path, 'utf8').matchAll(
          /\benv(?:\.([A-Z][A-Z0-9_]+)|\[['"]([A-Z][A-Z0-9_]+)['"]\])/g,
        ))
          names.add((m[1] ?? m[2])!)
    }
  }
  for (const f of folders) walk(join(repoRoot, f))
  // Names held in a constant the code reads through (`env[databaseUrlVar]`).
  for (const f of folders) walkConstants(join(repoRoot, f), names)
  return names
}

/** The TCP port of a listen multiaddr (parsed, so a malformed one fails here). */
function tcpPort(address: string): number {
  const tcp = multiaddr(address)
    .getComponents()
    .find((c) => c.name === 'tcp')
  if (tcp?.value == null) throw new Error(`${address} has no TCP port`)
  return Number(tcp.value)
}

const garageContainers = (t: PodTemplate): Container[] =>
  t.spec.containers.filter(
    (c) =>
      c.image.startsWith(`registry.example.net/garage/${garageImageName}:`) || c.image === garageImageName,
  )

function selects(selector: Record<string, string>, labels: Record<string, string> | undefined): boolean {
  return Object.entries(selector).every(([k, v]) => labels?.[k] === v)
}

describe('deploy/kubernetes against the code', () => {
  let rendered: Map<string, KubeObject[]>
  let overlaysOnly: KubeObject[][]
  beforeAll(async () => {
    rendered = await renderAll()
    overlaysOnly = [...rendered]
      .filter(([name]) => name.startsWith('overlays/'))
      .map(([, objects]) => objects)
  })
  const templatesOf = (objects: KubeObject[]) => objects.flatMap(podTemplates)

  it("runs the coordinator's image built by deploy/container/Containerfile, tagged with Garage's version", () => {
    for (const objects of overlaysOnly) {
      for (const { where, template } of templatesOf(objects)) {
        for (const c of [...template.spec.containers, ...(template.spec.initContainers ?? [])]) {
          if (c.image === rayImage) continue
          expect(c.image, `${where} ${c.name}`).toBe(
            `registry.example.net/garage/${garageImageName}:${pkg.version}`,
          )
        }
      }
    }
    // The image runs the CLI as the user the pods run as, with the data dir the pods mount.
    // `garage` on PATH is bin/garage.js: the entrypoint, and what `kubectl exec ... -- garage` runs.
    expect(containerfile).toMatch(/^RUN ln -s \/opt\/garage\/bin\/garage\.js \/usr\/local\/bin\/garage$/m)
    expect(containerfile).toMatch(/^COPY bin \.\/bin$/m)
    expect(containerfile).toMatch(/^ENTRYPOINT \["garage"\]$/m)
    expect(containerfile).toMatch(/^USER 10001:10001$/m)
    expect(containerfile).toMatch(/GARAGE_DATA_DIR=\/var\/lib\/garage$/m)
    // Every folder the CLI imports, transitively from bin/garage.js, is copied into the image, and
    // every package it imports is a dependency (the image installs no devDependency).
    const folders = new Set<string>()
    const packages = new Set<string>()
    const seen = new Set<string>()
    const visit = (file: string): void => {
      if (seen.has(file)) return
      seen.add(file)
      folders.add(file.split('/')[0]!)
      const source = readFileSync(join(repoRoot, file), 'utf8')
      for (const spec of ts.preProcessFile(source, true, true).importedFiles.map((f) => f.fileName)) {
        if (spec.startsWith('node:')) continue
        if (!spec.startsWith('.')) {
          packages.add(spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]!)
          continue
        }
        visit(
          relative(repoRoot, normalize(join(repoRoot, dirname(file), spec)))
            .split('\\')
            .join('/'),
        )
      }
    }
    visit('bin/garage.js')
    expect(seen.size).toBeGreaterThan(100)
    const dependencies = Object.keys(pkg.dependencies)
    expect([...packages].filter((p) => !dependencies.includes(p))).toEqual([])
    // The build context is the repository less what .containerignore leaves out: every copied folder stays in.
    const containerignore = readFileSync(join(repoRoot, '.containerignore'), 'utf8')
    for (const folder of folders)
      expect(containerignore, `.containerignore keeps ${folder}`).toMatch(new RegExp(`^!${folder}$`, 'm'))
    for (const folder of folders)
      expect(containerfile, `COPY ${folder}`).toMatch(new RegExp(`^COPY ${folder} \\./${folder}$`, 'm'))
    for (const objects of overlaysOnly)
      for (const { template } of templatesOf(objects))
        if (garageContainers(template).length > 0) {
          expect(template.spec.securityContext?.runAsUser).toBe(10001)
          expect(template.spec.securityContext?.runAsGroup).toBe(10001)
        }
  })

  it('passes only commands of the command table and flags their parseOptions tables define, with values they take', () => {
    const checked: string[] = []
    for (const objects of overlaysOnly) {
      for (const { where, template } of templatesOf(objects)) {
        for (const c of garageContainers(template)) {
          const args = c.args ?? []
          const command = args[0]!
          expect(Object.keys(commands), where).toContain(command)
          const flags = commandFlags(command)
          const envNames = new Set((c.env ?? []).map((e) => e.name))
          const counts = new Map<string, number>()
          for (const { flag, value } of parseArgs(args)) {
            const spec = flags.get(flag)
            expect(spec, `${where}: garage ${command} has no --${flag}`).toBeDefined()
            if (spec!.type === 'boolean') expect(value, `${where}: --${flag} takes no value`).toBeNull()
            else expect(value, `${where}: --${flag} needs a value`).not.toBeNull()
            counts.set(flag, (counts.get(flag) ?? 0) + 1)
            // $(VAR) is expanded by Kubernetes from the container's env: VAR must be there.
            for (const m of (value ?? '').matchAll(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g))
              expect(envNames, `${where}: --${flag} uses $(${m[1]})`).toContain(m[1])
            checked.push(`${command} --${flag}`)
          }
          for (const [flag, n] of counts)
            if (n > 1) expect(flags.get(flag)!.multiple, `${where}: --${flag} given ${n} times`).toBe(true)
        }
      }
    }
    expect(new Set(checked)).toEqual(
      new Set([
        'bootstrap --region',
        'bootstrap --cert',
        'bootstrap --authority',
        'bootstrap --listen',
        'bootstrap --announce',
        'bootstrap --bootstrap',
        'bootstrap --http',
        'bootstrap --policy',
        'bootstrap --head-http',
        'bootstrap --federation',
        'bootstrap --data-dir',
        'federation --http',
        'federation --listen',
        'federation --data-dir',
      ]),
    )
  })

  it("declares exactly the ports the flags bind, on the code's default ports", () => {
    const defaults: Record<string, number> = {
      'bootstrap --http': defaultBootstrapHttpPort,
      'bootstrap --head-http': defaultHeadHttpPort,
      'federation --http': defaultFederationPort,
    }
    const defaultListenPorts = defaultBootstrapListen.map(tcpPort)
    for (const objects of overlaysOnly) {
      for (const { where, template } of templatesOf(objects)) {
        for (const c of garageContainers(template)) {
          const command = c.args![0]!
          const bound: number[] = []
          for (const { flag, value } of parseArgs(c.args!)) {
            if (flag === 'http' || flag === 'head-http') {
              const { host, port } = parseHostPort(value!, `--${flag}`)
              // Probes and the Services reach the pod's address, not its loopback.
              expect(host, `${where} --${flag}`).toBe('0.0.0.0')
              expect(port, `${where} --${flag}: the code's default`).toBe(defaults[`${command} --${flag}`])
              bound.push(port)
            }
            if (flag === 'listen') bound.push(tcpPort(value!))
          }
          if (command === 'bootstrap')
            expect(bound.filter((p) => defaultListenPorts.includes(p)).sort()).toEqual(
              [...defaultListenPorts].sort(),
            )
          expect((c.ports ?? []).map((p) => p.containerPort).sort(), where).toEqual(bound.sort())
        }
      }
    }
  })

  it('probes /health on ports the flags bind to a server that serves it; every garage container has readiness and liveness', () => {
    // Which server answers on each flag's port (each serves GET /health: bootstrap/bootstrap-node.ts,
    // bootstrap/head/head.ts, federation/api.ts; the devnet test fetches them for real).
    const servers: Record<string, string> = {
      'bootstrap --http': 'bootstrap node',
      'bootstrap --head-http': 'head',
      'federation --http': 'federation gateway',
    }
    const probed: string[] = []
    for (const objects of overlaysOnly) {
      for (const { where, template } of templatesOf(objects)) {
        for (const c of garageContainers(template)) {
          expect(c.readinessProbe, where).toBeDefined()
          expect(c.livenessProbe, where).toBeDefined()
          const command = c.args![0]!
          for (const probe of [c.startupProbe, c.readinessProbe, c.livenessProbe]) {
            if (probe == null) continue
            const port = probe.httpGet?.port ?? probe.tcpSocket?.port
            const declared = c.ports!.find((p) => p.name === port || p.containerPort === port)
            expect(declared, `${where}: probe port ${port}`).toBeDefined()
            const flag = parseArgs(c.args!).find(
              (a) =>
                (a.flag === 'http' || a.flag === 'head-http') &&
                a.value!.endsWith(`:${declared!.containerPort}`),
            )
            expect(flag, `${where}: port ${port} is an HTTP server's`).toBeDefined()
            if (probe.httpGet != null) {
              expect(probe.httpGet.path).toBe('/health')
              probed.push(`${servers[`${command} --${flag!.flag}`]} /health`)
            }
          }
        }
      }
    }
    expect(new Set(probed)).toEqual(
      new Set(['head /health', 'bootstrap node /health', 'federation gateway /health']),
    )
  })

  it('sets only env vars the code reads or the args expand', () => {
    const read = envReadByCode()
    expect(read).toContain('GARAGE_DATA_DIR')
    for (const objects of overlaysOnly) {
      for (const { where, template } of templatesOf(objects)) {
        for (const c of garageContainers(template)) {
          const expanded = new Set(
            [...(c.args ?? []).join(' ').matchAll(/\$\(([A-Za-z0-9_]+)\)/g)].map((m) => m[1]!),
          )
          for (const e of c.env ?? []) {
            const known = read.has(e.name) || expanded.has(e.name)
            expect(known, `${where}: env ${e.name} is neither read by the code nor used in the args`).toBe(
              true,
            )
          }
          const dataDir = (c.env ?? []).find((e) => e.name === 'GARAGE_DATA_DIR')?.value
          expect(dataDir, `${where}: GARAGE_DATA_DIR`).toBe('/var/lib/garage')
        }
      }
    }
  })

  it('mounts the files the flags name from the volumes that hold them; the data dir is writable', () => {
    for (const objects of overlaysOnly) {
      for (const { where, template } of templatesOf(objects)) {
        for (const c of garageContainers(template)) {
          const volumes = new Map((template.spec.volumes ?? []).map((v) => [v.name, v]))
          const mountOf = (path: string) =>
            (c.volumeMounts ?? [])
              .filter((m) => path === m.mountPath || path.startsWith(`${m.mountPath}/`))
              .sort((a, b) => b.mountPath.length - a.mountPath.length)[0]
          for (const { flag, value } of parseArgs(c.args!)) {
            if (flag === 'cert' || flag === 'policy') {
              const mount = mountOf(value!)
              expect(mount, `${where} --${flag}`).toBeDefined()
              const v = volumes.get(mount!.name)!
              const items = v.secret?.items ?? v.configMap?.items ?? []
              expect(
                items.map((i) => `${mount!.mountPath}/${i.path}`),
                `${where} --${flag}`,
              ).toContain(value)
              expect(mount!.readOnly).toBe(true)
            }
            if (flag === 'data-dir') {
              const mount = mountOf(value!)!
              expect(volumes.get(mount.name)?.emptyDir, `${where} --data-dir`).toBeDefined()
              expect(mount.readOnly ?? false).toBe(false)
            }
          }
          // The identity key reaches <data dir>/identity.key through the init container.
          const init = template.spec.initContainers?.find((i) => i.name === 'identity')
          expect(init?.command?.[0], where).toBe('install')
          expect(init!.command).toContain('0600')
        }
      }
    }
  })

  it('runs every pod non-root with RuntimeDefault seccomp, every container without privileges, with resources', () => {
    // The Ray head writes into its image's home at run time: the one writable root filesystem.
    const writableRoot = new Set(['RayCluster/garage-ray head ray-head'])
    for (const objects of overlaysOnly) {
      for (const { where, template } of templatesOf(objects)) {
        const pod = template.spec.securityContext
        expect(pod?.runAsNonRoot, where).toBe(true)
        expect(pod?.seccompProfile?.type, where).toBe('RuntimeDefault')
        expect(template.spec.automountServiceAccountToken, where).toBe(false)
        for (const c of [...template.spec.containers, ...(template.spec.initContainers ?? [])]) {
          const name = `${where} ${c.name}`
          expect(c.securityContext?.allowPrivilegeEscalation, name).toBe(false)
          expect(c.securityContext?.capabilities?.drop, name).toEqual(['ALL'])
          expect(c.securityContext?.capabilities?.add, name).toBeUndefined()
          expect(c.securityContext?.readOnlyRootFilesystem, name).toBe(!writableRoot.has(name))
          for (const r of ['cpu', 'memory']) {
            expect(c.resources?.requests?.[r], `${name} requests ${r}`).toBeDefined()
            expect(c.resources?.limits?.[r], `${name} limits ${r}`).toBeDefined()
          }
        }
        // A read-only root needs its writable paths as volumes.
        for (const c of garageContainers(template))
          expect((c.volumeMounts ?? []).map((m) => m.mountPath)).toEqual(
            expect.arrayContaining(['/tmp', '/var/lib/garage']),
          )
      }
    }
  })

  it("the Ray head is the regional head's: the pinned image, its ray start flags, its GCS port, token auth", () => {
    const ray = rendered.get('overlays/ray-example')!.find((o) => o.kind === 'RayCluster')!
    const spec = ray.spec as {
      rayVersion: string
      authOptions: { mode: string; secretName: string }
      headGroupSpec: { rayStartParams: Record<string, string>; template: PodTemplate }
    }
    const head = spec.headGroupSpec.template.spec.containers[0]!
    expect(head.image).toBe(rayImage)
    expect(rayImage).toContain(`:${spec.rayVersion}-`)
    expect(spec.authOptions.mode).toBe('token')
    // ray start's flags as the regional head passes them (bootstrap/head/ray-head.ts).
    const code = new Map(
      rayHeadContainerSpec({
        image: rayImage,
        name: 'n',
        nodePeerId: 'p',
        nodeIpAddress: '10.0.0.1',
        gcsPort: defaultRayGcsPort,
        envFile: '/e',
        shmSize: '2g',
      })
        .args!.filter((a) => a.startsWith('--'))
        .map((a) => {
          const [flag, value] = a.slice(2).split('=') as [string, string | undefined]
          return [flag, value ?? 'true'] as const
        }),
    )
    const params = spec.headGroupSpec.rayStartParams
    for (const [flag, value] of Object.entries(params)) {
      expect(code.has(flag), `rayStartParams ${flag} is not a flag the head passes`).toBe(true)
      if (flag === 'node-ip-address') expect(value).toMatch(/^\d+\.\d+\.\d+\.\d+$/)
      else expect(value, flag).toBe(code.get(flag))
    }
    // KubeRay passes --head and --block itself.
    for (const flag of code.keys())
      if (flag !== 'head' && flag !== 'block') expect(Object.keys(params)).toContain(flag)
    expect(head.ports).toEqual([{ name: 'gcs-server', containerPort: defaultRayGcsPort, protocol: 'TCP' }])
    expect(spec.headGroupSpec.template.spec.hostNetwork).toBe(true)
    const shm = spec.headGroupSpec.template.spec.volumes!.find((v) => v.emptyDir?.medium === 'Memory')
    expect(head.volumeMounts!.find((m) => m.name === shm!.name)!.mountPath).toBe('/dev/shm')
  })

  it('wires the objects together: selectors, named ports, ConfigMaps with their keys, the region policy', () => {
    for (const objects of overlaysOnly) {
      const byKind = (kind: string) => objects.filter((o) => o.kind === kind)
      const pods = objects.flatMap(podTemplates).map((p) => p.template)
      for (const svc of byKind('Service')) {
        const spec = svc.spec as {
          selector: Record<string, string>
          ports: Array<{ name: string; targetPort: string }>
        }
        const selected = pods.filter((p) => selects(spec.selector, p.metadata?.labels))
        expect(selected.length, `Service/${svc.metadata.name} selects a pod`).toBeGreaterThan(0)
        for (const port of spec.ports) {
          const names = selected.flatMap((p) =>
            p.spec.containers.flatMap((c) => (c.ports ?? []).map((q) => q.name)),
          )
          expect(names, `Service/${svc.metadata.name} targetPort`).toContain(port.targetPort)
        }
      }
      for (const sm of byKind('ServiceMonitor')) {
        const spec = sm.spec as {
          selector: { matchLabels: Record<string, string> }
          endpoints: Array<{ port: string; path: string }>
        }
        const services = byKind('Service').filter((s) =>
          selects(spec.selector.matchLabels, s.metadata.labels),
        )
        expect(services.length, `ServiceMonitor/${sm.metadata.name}`).toBe(1)
        const ports = (services[0]!.spec as { ports: Array<{ name: string }> }).ports.map((p) => p.name)
        for (const e of spec.endpoints) {
          expect(ports).toContain(e.port)
          expect(e.path).toBe('/metrics')
        }
      }
      for (const pdb of byKind('PodDisruptionBudget')) {
        const selector = (pdb.spec as { selector: { matchLabels: Record<string, string> } }).selector
          .matchLabels
        expect(pods.filter((p) => selects(selector, p.metadata?.labels)).length).toBeGreaterThan(0)
      }
      const configMaps = new Map(
        byKind('ConfigMap').map((c) => [c.metadata.name, c.data as Record<string, string>]),
      )
      for (const p of pods) {
        for (const c of p.spec.containers)
          for (const e of c.env ?? []) {
            const ref = e.valueFrom?.configMapKeyRef
            if (ref != null)
              expect(Object.keys(configMaps.get(ref.name) ?? {}), `${ref.name}`).toContain(ref.key)
          }
        for (const v of p.spec.volumes ?? [])
          if (v.configMap != null)
            for (const item of v.configMap.items ?? [])
              expect(Object.keys(configMaps.get(v.configMap.name) ?? {})).toContain(item.key)
      }
      // The region's policy is one the head accepts, for the region the pod runs.
      const policy = configMaps.get('garage-region-policy')
      if (policy != null) {
        const parsed = parseRegionPolicy(JSON.parse(policy['policy.json']!))
        expect(parsed.region).toBe(configMaps.get('garage-region')!.region)
      }
    }
  })

  it('every Secret the manifests read, and its keys, is one the docs tell operators to create', () => {
    const secrets = new Set<string>()
    for (const objects of overlaysOnly) {
      for (const o of objects) {
        if (o.kind === 'RayCluster')
          secrets.add(
            `${(o.spec as { authOptions: { secretName: string } }).authOptions.secretName} auth_token`,
          )
        for (const { template } of podTemplates(o)) {
          for (const v of template.spec.volumes ?? [])
            if (v.secret != null)
              for (const i of v.secret.items ?? []) secrets.add(`${v.secret.secretName} ${i.key}`)
          for (const c of template.spec.containers)
            for (const e of c.env ?? [])
              if (e.valueFrom?.secretKeyRef != null)
                secrets.add(`${e.valueFrom.secretKeyRef.name} ${e.valueFrom.secretKeyRef.key}`)
        }
      }
    }
    expect([...secrets].sort()).toEqual([
      'garage-federation-database url',
      'garage-federation-identity admin.token',
      'garage-federation-identity identity.key',
      'garage-ray-token auth_token',
      'garage-region-certificate region.cert',
      'garage-region-identity identity.key',
    ])
    const section = coordinatorDocs.slice(coordinatorDocs.search(/^## (?:\d+\. )?Running on Kubernetes$/m))
    for (const s of secrets) {
      const [name, key] = s.split(' ') as [string, string]
      expect(
        section,
        `docs/coordinator.md: kubectl create secret generic ${name} --from-...=${key}=`,
      ).toMatch(
        new RegExp(
          `create secret generic ${name} [^\\n]*--from-(?:file|literal)=${key.replace('.', '\\.')}=`,
        ),
      )
    }
  })
})
