import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { chmod, copyFile, mkdir, mkdtemp, realpath, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { execa } from 'execa'
import { nodeLabelFilter } from '../../containers/labels.ts'

/** Helpers for the suites that run real Podman: the CLI, cleanup by label, the local stand-in image. */

const fixtures = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'vllm')
export const standInRepository = 'localhost/garage-test-stand-in'
// Bump when the image layout below changes (the content hash covers the files themselves).
const layoutVersion = '1'

export async function podman(args: string[], timeoutMs = 60_000): Promise<string> {
  const result = await execa('podman', args, { timeout: timeoutMs, stdin: 'ignore' })
  return String(result.stdout)
}

/** The parts of `podman container inspect` the suites check. */
export interface InspectedContainer {
  Path: string
  Args: string[]
  State: { Status: string }
  Config: { Labels: Record<string, string>; Env: string[] }
  HostConfig: {
    PortBindings: Record<string, Array<{ HostIp: string; HostPort: string }>>
    Privileged: boolean
    SecurityOpt: string[] | null
    IpcMode: string
    ShmSize: number
    NetworkMode: string
  }
}

export async function inspectContainer(name: string): Promise<InspectedContainer> {
  return (JSON.parse(await podman(['container', 'inspect', name])) as InspectedContainer[])[0]!
}

/** Fails the suite with the fix when Podman is missing or does not work here. */
export async function requirePodman(): Promise<void> {
  try {
    await podman(['info', '--format', '{{.Host.OCIRuntime.Name}}'], 30_000)
  } catch (err) {
    throw new Error(
      `these tests run real Podman: apt-get install -y podman runc, then configure it as .ci/run does (${(err as Error).message})`,
    )
  }
}

/** Every container of these node ids, whatever its state. */
export async function containersOf(nodePeerId: string): Promise<string[]> {
  const filters = Object.entries(nodeLabelFilter(nodePeerId)).flatMap(([k, v]) => [
    '--filter',
    `label=${k}=${v}`,
  ])
  const out = await podman(['ps', '--all', '--quiet', '--no-trunc', ...filters])
  return out.split('\n').filter(Boolean)
}

export async function removeContainersOf(nodePeerIds: string[]): Promise<void> {
  for (const id of nodePeerIds) {
    const ids = await containersOf(id).catch(() => [])
    if (ids.length > 0) await podman(['rm', '--force', '--time', '0', ...ids]).catch(() => undefined)
  }
}

/** A fake base58-looking PeerId, unique per call: labels of one test never match another's. */
export function testPeerId(): string {
  const alphabet = '123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz'
  let s = '12D3KooWTest'
  for (let i = 0; i < 20; i++) s += alphabet[Math.floor(Math.random() * alphabet.length)]
  return s
}

async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256')
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer)
  return hash.digest('hex')
}

async function sharedLibraries(binary: string): Promise<string[]> {
  const { stdout } = await execa('ldd', [binary])
  return [...String(stdout).matchAll(/(\/[^\s]+) \(0x[0-9a-f]+\)/g)].map((m) => m[1]!)
}

/**
 * The image the vLLM and Ray tests run: this Node 22 binary and the libraries ldd lists, the vLLM
 * stand-in server as the entrypoint (like `vllm serve`), and the Ray stand-in as /usr/bin/ray.
 * Tagged by a hash of its content, so a rerun finds it and skips the build; an image of an older
 * content is removed when a new one is built.
 */
export async function standInImage(): Promise<string> {
  const node = await realpath(process.execPath)
  const libraries = await sharedLibraries(node)
  const files: Array<[string, string]> = [
    [node, '/bin/node'],
    ...libraries.map((l): [string, string] => [l, l]),
    [join(fixtures, 'vllm-stand-in.mjs'), '/app/vllm-stand-in.mjs'],
    [join(fixtures, 'ray-stand-in.mjs'), '/usr/bin/ray'],
  ]
  const hash = createHash('sha256').update(`layout ${layoutVersion}\n`)
  for (const [from, to] of files) hash.update(`${to} ${await sha256File(from)}\n`)
  const tag = `${standInRepository}:${hash.digest('hex').slice(0, 16)}`
  if ((await execa('podman', ['image', 'exists', tag], { reject: false })).exitCode === 0) return tag

  const dir = await mkdtemp(join(tmpdir(), 'garage-stand-in-'))
  try {
    const root = join(dir, 'rootfs')
    for (const [from, to] of files) {
      await mkdir(join(root, dirname(to)), { recursive: true })
      await copyFile(from, join(root, to))
    }
    await chmod(join(root, 'usr/bin/ray'), 0o755)
    await mkdir(join(root, 'tmp'), { recursive: true })
    await chmod(join(root, 'tmp'), 0o1777)
    await mkdir(join(root, 'root'), { recursive: true })
    await execa('tar', ['-C', root, '-cf', join(dir, 'rootfs.tar'), '.'])
    await podman(
      [
        'import',
        '--change',
        'ENTRYPOINT ["/bin/node", "/app/vllm-stand-in.mjs"]',
        join(dir, 'rootfs.tar'),
        tag,
      ],
      120_000,
    )
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
  const old = (await podman(['images', '--format', '{{.Repository}}:{{.Tag}}', standInRepository]))
    .split('\n')
    .filter((t) => t !== '' && t !== tag)
  for (const t of old) await podman(['rmi', t]).catch(() => undefined)
  return tag
}
