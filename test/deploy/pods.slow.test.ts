import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { chmod, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Authority, initAuthority } from '../../mesh/authority.ts'
import { issueRegionCertificate } from '../../mesh/certificate.ts'
import { identityFileName, loadOrCreateIdentity } from '../../mesh/identity.ts'
import { type RunningGarage, spawnGarage } from '../helpers/cli.ts'
import type { KubeObject } from '../helpers/kustomize.ts'
import { type Container, type PodTemplate, podTemplates, renderOverlay } from './manifests.ts'

/**
 * The region's and the gateway's pods as the kubelet would run them, on this machine (no
 * Kubernetes here): their volumes made from the overlay's ConfigMaps and from Secrets made as
 * docs/coordinator.md says (Secret files group-readable, as fsGroup leaves them), their init
 * container's own command, then `garage` with the container's args and env, $(VAR) expanded.
 * What differs from a cluster: mount paths map to temporary folders, the fixed ports to free ones
 * (0), and GARAGE_DATABASE_URL is left out: the gateway runs on its SQLite default here (the store on
 * PostgreSQL, with two gateways, is test/e2e/federation-postgres.slow.test.ts).
 */

const run = promisify(execFile)
const requestTimeoutMs = 10_000
/** Set by the manifests, left out here: no PostgreSQL server in this test. */
const leftOut = new Set(['GARAGE_DATABASE_URL'])

interface PodInput {
  configMaps: Map<string, Record<string, string>>
  secrets: Map<string, Record<string, Uint8Array | string>>
}

interface Pod {
  /** Starts the main container's garage command; resolves at its banner. */
  start(readyLine: string): Promise<RunningGarage>
  /** A path inside the pod, on this machine. */
  path(inPod: string): string
}

/** Lays out a pod's volumes under `root`, runs its init containers, and returns how to start it. */
async function preparePod(root: string, template: PodTemplate, input: PodInput): Promise<Pod> {
  const volumeDirs = new Map<string, string>()
  for (const v of template.spec.volumes ?? []) {
    const dir = join(root, 'volumes', v.name)
    await mkdir(dir, { recursive: true })
    volumeDirs.set(v.name, dir)
    const source =
      v.secret != null
        ? input.secrets.get(v.secret.secretName)
        : v.configMap != null
          ? input.configMaps.get(v.configMap.name)
          : null
    const items = v.secret?.items ?? v.configMap?.items ?? []
    if (v.emptyDir == null && source == null)
      throw new Error(`volume ${v.name}: no Secret or ConfigMap for it`)
    for (const item of items) {
      const value = source?.[item.key]
      if (value == null) throw new Error(`volume ${v.name}: no key ${item.key}`)
      await writeFile(join(dir, item.path), value)
      // A Secret's file under fsGroup: defaultMode | 0440, readable by the pod's group.
      if (v.secret != null) await chmod(join(dir, item.path), 0o440)
    }
  }
  const mapper = (c: Container) => {
    const mounts = (c.volumeMounts ?? []).map((m) => ({ at: m.mountPath, dir: volumeDirs.get(m.name)! }))
    return (value: string): string => {
      const m = mounts
        .filter((x) => value === x.at || value.startsWith(`${x.at}/`))
        .sort((a, b) => b.at.length - a.at.length)[0]
      return m == null ? value : `${m.dir}${value.slice(m.at.length)}`
    }
  }
  const envOf = (c: Container): Record<string, string> => {
    const env: Record<string, string> = {}
    for (const e of c.env ?? []) {
      if (leftOut.has(e.name)) continue
      const cm = e.valueFrom?.configMapKeyRef
      const secret = e.valueFrom?.secretKeyRef
      const value =
        e.value ??
        (cm != null ? input.configMaps.get(cm.name)?.[cm.key] : undefined) ??
        (secret != null ? String(input.secrets.get(secret.name)?.[secret.key]) : undefined)
      if (value == null) throw new Error(`env ${e.name} has no value`)
      env[e.name] = mapper(c)(value)
    }
    return env
  }
  const expand = (text: string, env: Record<string, string>): string =>
    text.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (_, name: string) => env[name] ?? `$(${name})`)
  for (const init of template.spec.initContainers ?? []) {
    const map = mapper(init)
    const [command, ...args] = init.command!.map(map)
    await run(command!, args, { timeout: requestTimeoutMs })
  }
  const main = template.spec.containers[0]!
  return {
    path: (inPod) => mapper(main)(inPod),
    start(readyLine) {
      const env = envOf(main)
      const map = mapper(main)
      const args = main.args!.map((a) =>
        map(
          expand(a, env).replace(/^(--[a-z-]+=)(.*)$/, (_, flag: string, value: string) => flag + map(value)),
        )
          // Free ports instead of the pod's fixed ones, on this shared machine.
          .replace(/^(--(?:http|head-http)=.*):\d+$/, '$1:0')
          .replace(/^(--listen=.*\/tcp\/)\d+/, '$10'),
      )
      return spawnGarage(args, { readyLine, env, timeoutMs: 30_000 })
    },
  }
}

function templateOf(objects: KubeObject[], kind: string): PodTemplate {
  return podTemplates(objects.find((o) => o.kind === kind)!)[0]!.template
}

function configMapsOf(objects: KubeObject[]): Map<string, Record<string, string>> {
  return new Map(
    objects
      .filter((o) => o.kind === 'ConfigMap')
      .map((o) => [o.metadata.name, { ...(o.data as Record<string, string>) }]),
  )
}

/** The port a banner line's URL names (servers bound to 0.0.0.0:0 print the port they got). */
function urlOf(running: RunningGarage, field: string): string {
  return running
    .field(field)
    .replace(/\/(v1|metrics|health)$/, '')
    .replace('0.0.0.0', '127.0.0.1')
}

async function stopped(running: RunningGarage | undefined): Promise<void> {
  if (running == null || running.child.exitCode != null) return
  running.child.kill('SIGTERM')
  expect(await running.exited).toBe(0)
}

describe('the pods of deploy/kubernetes run as the kubelet would start them', () => {
  let root: string
  let region: RunningGarage | undefined
  let federation: RunningGarage | undefined
  let authority: Authority
  let federationPeerId: string
  let federationKey: Uint8Array
  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'garage-pods-'))
    authority = await initAuthority(join(root, 'authority'))
    // As docs/coordinator.md: `garage id --data-dir ./federation-identity`.
    const fedDir = join(root, 'federation-identity')
    federationPeerId = peerIdFromPrivateKey(await loadOrCreateIdentity(fedDir)).toString()
    federationKey = await readFile(join(fedDir, identityFileName))
  })
  afterAll(async () => {
    await stopped(federation).catch(() => {})
    await stopped(region).catch(() => {})
    if (root != null) await rm(root, { recursive: true, force: true })
  })

  it('the region pod: the init container installs the key, garage bootstrap verifies the certificate and serves both probes', async () => {
    const objects = await renderOverlay('region-example')
    const configMaps = configMapsOf(objects)
    const settings = configMaps.get('garage-region')!
    settings.authority = authority.id
    settings['federation-peer-id'] = federationPeerId
    // As docs/coordinator.md: `garage id --data-dir ./eu-north-head`, then `garage authority issue`.
    const headDir = join(root, 'eu-north-head')
    const headId = peerIdFromPrivateKey(await loadOrCreateIdentity(headDir)).toString()
    const cert = await issueRegionCertificate(authority.key, {
      region: settings.region!,
      head: headId,
      addrs: settings.announce!.split(','),
      ttlMs: 86_400_000,
    })
    const pod = await preparePod(join(root, 'region-pod'), templateOf(objects, 'StatefulSet'), {
      configMaps,
      secrets: new Map<string, Record<string, Uint8Array | string>>([
        ['garage-region-identity', { 'identity.key': await readFile(join(headDir, identityFileName)) }],
        ['garage-region-certificate', { 'region.cert': cert }],
      ]),
    })
    region = await pod.start('cert until')
    expect(region.field('region')).toBe('eu-north')
    // The key the init container copied, the one the certificate names (--authority verified it at start).
    expect(region.lines.find((l) => l.trim().startsWith('peer id'))).toContain(headId)
    // The probes: bootstrap /health (readiness) and the head's /health (startup, liveness).
    const bootstrapUrl = urlOf(region, 'health')
    const health = await fetch(`${bootstrapUrl}/health`, { signal: AbortSignal.timeout(requestTimeoutMs) })
    expect(health.status).toBe(200)
    expect(await health.json()).toMatchObject({ status: 'ok', region: 'eu-north', peerId: headId })
    // The head's banner line comes after "cert until".
    const headLine = await region.waitForLine('head api', requestTimeoutMs)
    const headUrl = headLine.split(/\s+/)[2]!.replace(/\/v1$/, '').replace('0.0.0.0', '127.0.0.1')
    const headHealth = await fetch(`${headUrl}/health`, { signal: AbortSignal.timeout(requestTimeoutMs) })
    expect(headHealth.status).toBe(200)
    await headHealth.body?.cancel()
    // The head's token went to the data dir the manifests make an emptyDir, as a 0600 file.
    const token = await readFile(pod.path('/var/lib/garage/head-api.token'), 'utf8')
    expect(token.trim().length).toBeGreaterThanOrEqual(16)
    // The identity key in the data dir is 0600, copied from a 0440 Secret file.
    expect((await stat(pod.path('/var/lib/garage/identity.key'))).mode & 0o777).toBe(0o600)
  })

  it('the gateway pod: garage federation runs on the shared identity; readiness fails (503 no-region) while it reaches no region, liveness accepts', async () => {
    const objects = await renderOverlay('federation-example')
    const configMaps = configMapsOf(objects)
    const settings = configMaps.get('garage-federation')!
    settings.authority = authority.id
    // A bootstrap node that does not answer: the gateway starts, but reaches no region.
    const nobody = peerIdFromPrivateKey(await loadOrCreateIdentity(join(root, 'nobody'))).toString()
    settings.bootstrap = `/ip4/127.0.0.1/tcp/9/p2p/${nobody}`
    const adminToken = randomBytes(24).toString('base64url')
    const pod = await preparePod(join(root, 'federation-pod'), templateOf(objects, 'Deployment'), {
      configMaps,
      secrets: new Map<string, Record<string, Uint8Array | string>>([
        ['garage-federation-identity', { 'identity.key': federationKey, 'admin.token': `${adminToken}\n` }],
        ['garage-federation-database', { url: 'postgres://unused' }],
      ]),
    })
    federation = await pod.start('peer id')
    // Every replica is the same gateway to the heads: the PeerId of the Secret's key.
    expect(federation.lines.find((l) => l.trim().startsWith('peer id'))).toContain(federationPeerId)
    const api = urlOf(federation, 'api')
    const health = await fetch(`${api}/health`, { signal: AbortSignal.timeout(requestTimeoutMs) })
    expect(health.status).toBe(503)
    expect(await health.json()).toMatchObject({ status: 'no-region' })
    // The admin token is the Secret's (every replica takes the same one).
    const admin = await fetch(`${api}/admin/keys`, {
      headers: { authorization: `Bearer ${adminToken}` },
      signal: AbortSignal.timeout(requestTimeoutMs),
    })
    expect(admin.status).toBe(200)
    await admin.body?.cancel()
    // Liveness: a TCP connection to the HTTP port.
    const port = Number(new URL(api).port)
    await new Promise<void>((resolve, reject) => {
      const socket = connect({ host: '127.0.0.1', port, timeout: requestTimeoutMs })
      socket.once('connect', () => {
        socket.destroy()
        resolve()
      })
      socket.once('error', reject)
      socket.once('timeout', () => reject(new Error('liveness connect timed out')))
    })
    await stopped(federation)
  })
})
