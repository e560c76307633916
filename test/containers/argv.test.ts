import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { buildRunArgs } from '../../containers/argv.ts'
import { CliContainerRuntime } from '../../containers/cli.ts'
import { writeSecretEnvFile } from '../../containers/env-file.ts'
import { rayImage, vllmImage, vllmImageForDriver } from '../../containers/images.ts'
import type { ContainerSpec } from '../../containers/types.ts'
import { rayWorkerContainerSpec } from '../../daemon/engines/ray/spec.ts'
import {
  type RayClusterAssignment,
  RayClusterNotTrustedError,
  RayClusterOptInRequiredError,
  RayWorker,
} from '../../daemon/engines/ray/worker.ts'
import { vllmContainerSpec, vllmSecrets } from '../../daemon/engines/vllm/spec.ts'
import { FakeRuntime } from './fake-runtime.ts'

const peer = '12D3KooWRHB6gqzSZSmC8V2JoUf8y5ZwpgCJmrEw6T8fXkgG7Xbe'
const dirs: string[] = []
afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
})

// Flags of `podman run` / `docker run` (docs.podman.io podman-run(1), docs.docker.com "docker container run").
const runFlags = new Set([
  '--detach',
  '--name',
  '--pull=never',
  '--label',
  '--network',
  '--publish',
  '--volume',
  '--device',
  '--gpus',
  '--user',
  '--shm-size',
  '--security-opt',
  '--cap-drop',
  '--env',
  '--env-file',
  '--log-driver',
  '--log-opt',
  '--entrypoint',
])
// `vllm serve` options (docs.vllm.ai, "vllm serve" CLI reference). The key is not among them: it
// travels as VLLM_API_KEY in the env file (see vllmSecrets).
const vllmServeFlags = new Set([
  '--host',
  '--port',
  '--served-model-name',
  '--gpu-memory-utilization',
  '--max-model-len',
  '--max-num-seqs',
])
// `ray start` options (docs.ray.io, "ray start" CLI reference).
const rayStartFlags = new Set([
  '--address',
  '--block',
  '--node-ip-address',
  '--num-gpus',
  '--resources',
  '--disable-usage-stats',
])

/** The run options before the image, and the container's own arguments after it. */
function split(argv: string[], image: string): { options: string[]; command: string[] } {
  const at = argv.indexOf(image)
  return { options: argv.slice(1, at), command: argv.slice(at + 1) }
}

const vllmInput = {
  image: vllmImage,
  name: 'garage-vllm-0a1b2c3d4e',
  nodePeerId: peer,
  hostPort: 41234,
  model: 'Qwen/Qwen2.5-7B-Instruct',
  servedModelName: 'qwen2.5-7b',
  gpuMemoryUtilization: 0.85,
  maxModelLen: 8192,
  maxNumSeqs: 16,
  cacheDir: '/var/lib/garage/huggingface',
  gpu: 'all' as const,
  shmSize: '8g',
  envFile: '/var/lib/garage/run/c2VjcmV0cw.env',
}

const vllmCommand = [
  'Qwen/Qwen2.5-7B-Instruct',
  '--host',
  '0.0.0.0',
  '--port',
  '8000',
  '--served-model-name',
  'qwen2.5-7b',
  '--gpu-memory-utilization',
  '0.85',
  '--max-model-len',
  '8192',
  '--max-num-seqs',
  '16',
]

describe('vLLM container argv', () => {
  it('Podman: GPUs by CDI, published on 127.0.0.1 only, labels, shm, no-new-privileges', () => {
    const argv = new CliContainerRuntime('podman').runArgs(vllmContainerSpec(vllmInput))
    expect(argv).toEqual([
      'run',
      '--detach',
      '--name',
      'garage-vllm-0a1b2c3d4e',
      '--pull=never',
      '--label',
      'garage.managed=true',
      '--label',
      `garage.node=${peer}`,
      '--label',
      'garage.role=vllm',
      '--publish',
      '127.0.0.1:41234:8000',
      '--volume',
      '/var/lib/garage/huggingface:/root/.cache/huggingface:z',
      '--device',
      'nvidia.com/gpu=all',
      '--shm-size',
      '8g',
      '--security-opt',
      'no-new-privileges',
      '--env',
      'VLLM_NO_USAGE_STATS=1',
      '--env',
      'DO_NOT_TRACK=1',
      '--env-file',
      '/var/lib/garage/run/c2VjcmV0cw.env',
      '--log-driver',
      'k8s-file',
      '--log-opt',
      'max-size=20mb',
      'docker.io/vllm/vllm-openai:v0.30.0',
      ...vllmCommand,
    ])
  })

  it('serves an embedding model with the pooling runner', () => {
    const argv = new CliContainerRuntime('podman').runArgs(vllmContainerSpec({ ...vllmInput, task: 'embed' }))
    expect(argv.slice(-vllmCommand.length - 2)).toEqual([...vllmCommand, '--runner', 'pooling'])
  })

  it('Docker: --gpus all instead of CDI, the local log driver, the same vLLM arguments', () => {
    const argv = new CliContainerRuntime('docker').runArgs(vllmContainerSpec(vllmInput))
    expect(argv).toEqual([
      'run',
      '--detach',
      '--name',
      'garage-vllm-0a1b2c3d4e',
      '--pull=never',
      '--label',
      'garage.managed=true',
      '--label',
      `garage.node=${peer}`,
      '--label',
      'garage.role=vllm',
      '--publish',
      '127.0.0.1:41234:8000',
      '--volume',
      '/var/lib/garage/huggingface:/root/.cache/huggingface:z',
      '--gpus',
      'all',
      '--shm-size',
      '8g',
      '--security-opt',
      'no-new-privileges',
      '--env',
      'VLLM_NO_USAGE_STATS=1',
      '--env',
      'DO_NOT_TRACK=1',
      '--env-file',
      '/var/lib/garage/run/c2VjcmV0cw.env',
      '--log-driver',
      'local',
      'docker.io/vllm/vllm-openai:v0.30.0',
      ...vllmCommand,
    ])
  })

  it('uses only documented flags, never --privileged, never a non-loopback publish', () => {
    for (const runtime of ['podman', 'docker'] as const) {
      const argv = buildRunArgs(runtime, vllmContainerSpec(vllmInput))
      const { options, command } = split(argv, vllmImage)
      expect(options.filter((a) => a.startsWith('--')).filter((f) => !runFlags.has(f))).toEqual([])
      expect(command.filter((a) => a.startsWith('--')).filter((f) => !vllmServeFlags.has(f))).toEqual([])
      expect(argv).not.toContain('--privileged')
      expect(argv).not.toContain('--ipc=host')
      expect(argv).not.toContain('--api-key')
      const publishes = argv.flatMap((a, i) => (a === '--publish' ? [argv[i + 1]] : []))
      expect(publishes).toEqual(['127.0.0.1:41234:8000'])
    }
  })

  it('device lists: one CDI device per GPU on Podman, a quoted device list on Docker', () => {
    const spec = vllmContainerSpec({ ...vllmInput, gpu: { devices: ['0', '1'] } })
    const podman = buildRunArgs('podman', spec)
    expect(podman.slice(podman.indexOf('--device'), podman.indexOf('--device') + 4)).toEqual([
      '--device',
      'nvidia.com/gpu=0',
      '--device',
      'nvidia.com/gpu=1',
    ])
    const docker = buildRunArgs('docker', spec)
    expect(docker[docker.indexOf('--gpus') + 1]).toBe('"device=0,1"')
    expect(buildRunArgs('podman', vllmContainerSpec({ ...vllmInput, gpu: 'none' }))).not.toContain('--device')
  })

  it('the API key and a Hugging Face token go to the env file', () => {
    expect(vllmSecrets('k3y')).toEqual({ VLLM_API_KEY: 'k3y' })
    expect(vllmSecrets('k3y', 'hf_abc')).toEqual({ VLLM_API_KEY: 'k3y', HF_TOKEN: 'hf_abc' })
  })

  it('picks the CUDA 12.9 image for drivers before 580', () => {
    expect(vllmImageForDriver('550.120')).toBe('docker.io/vllm/vllm-openai:v0.30.0-cu129')
    expect(vllmImageForDriver('580.65.06')).toBe(vllmImage)
    expect(vllmImageForDriver(null)).toBe(vllmImage)
  })
})

describe('container spec checks', () => {
  const base: ContainerSpec = { image: 'localhost/x:1', name: 'garage-x', role: 'vllm', nodePeerId: peer }
  const refused = (spec: ContainerSpec) => () => buildRunArgs('podman', spec)

  it('refuses to publish on anything but 127.0.0.1', () => {
    expect(
      refused({
        ...base,
        ports: [{ hostPort: 8000, containerPort: 8000, hostIp: '0.0.0.0' as '127.0.0.1' }],
      }),
    ).toThrow(expect.objectContaining({ name: 'ContainerSpecError' }))
  })

  it('refuses options that would weaken isolation and values that would be parsed as more options', () => {
    for (const spec of [
      { ...base, securityOpts: ['seccomp=unconfined'] },
      { ...base, securityOpts: ['label=disable'] },
      { ...base, name: 'x --privileged' },
      { ...base, image: "vllm'; rm -rf /" },
      { ...base, nodePeerId: 'peer=1,garage.role=x' },
      { ...base, labels: { 'garage.node': 'someone-else' } },
      { ...base, volumes: [{ hostPath: '/data:/etc', containerPath: '/x' }] },
      { ...base, env: { 'A B': '1' } },
      { ...base, env: { A: 'line\nB=2' } },
      { ...base, gpu: { devices: ['0,1'] } },
      { ...base, network: 'host' as const, ports: [{ hostPort: 1, containerPort: 1 }] },
    ]) {
      expect(refused(spec)).toThrow(expect.objectContaining({ name: 'ContainerSpecError' }))
    }
  })

  it('accepts a Windows host folder (Docker Desktop), refuses relative paths', () => {
    const volume = {
      hostPath: 'C:\\Users\\gamer\\garage\\huggingface',
      containerPath: '/root/.cache/huggingface',
    }
    expect(buildRunArgs('docker', { ...base, volumes: [volume] })).toContain(
      'C:\\Users\\gamer\\garage\\huggingface:/root/.cache/huggingface',
    )
    expect(refused({ ...base, volumes: [{ hostPath: 'data', containerPath: '/x' }] })).toThrow(/not allowed/)
    expect(refused({ ...base, volumes: [{ hostPath: '/data', containerPath: 'x' }] })).toThrow(/not allowed/)
  })

  it('writes secrets to a new 0600 file in a 0700 folder, one variable a line', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'garage-env-'))
    dirs.push(dir)
    const file = await writeSecretEnvFile(join(dir, 'run'), {
      RAY_AUTH_MODE: 'token',
      RAY_AUTH_TOKEN: 's3cret',
    })
    expect((await stat(file.path)).mode & 0o777).toBe(0o600)
    expect((await stat(join(dir, 'run'))).mode & 0o777).toBe(0o700)
    await file.remove()
    await expect(stat(file.path)).rejects.toThrow(/ENOENT/)
    await expect(writeSecretEnvFile(join(dir, 'run'), { T: 'a\nB=1' })).rejects.toThrow(
      expect.objectContaining({ name: 'ContainerSpecError' }),
    )
  })
})

describe('Ray worker argv', () => {
  const input = {
    image: rayImage,
    name: 'garage-ray-worker-0a1b2c3d4e',
    nodePeerId: peer,
    headAddress: '10.8.0.1:6379',
    nodeIpAddress: '10.8.0.7',
    numGpus: 1,
    region: 'eu-north',
    vramMiB: 24564,
    envFile: '/var/lib/garage/run/Zm9vYmFy.env',
    cacheDir: '/var/lib/garage/huggingface',
    gpu: 'all' as const,
    shmSize: '8g',
  }

  it('ray start --block joining the head, host network, token only through the env file', () => {
    const argv = buildRunArgs('podman', rayWorkerContainerSpec(input))
    expect(argv).toEqual([
      'run',
      '--detach',
      '--name',
      'garage-ray-worker-0a1b2c3d4e',
      '--pull=never',
      '--label',
      'garage.managed=true',
      '--label',
      `garage.node=${peer}`,
      '--label',
      'garage.role=ray-worker',
      '--network',
      'host',
      '--volume',
      '/var/lib/garage/huggingface:/garage/huggingface:z',
      '--device',
      'nvidia.com/gpu=all',
      '--user',
      '0:0',
      '--shm-size',
      '8g',
      '--security-opt',
      'no-new-privileges',
      '--env',
      'HF_HOME=/garage/huggingface',
      '--env-file',
      '/var/lib/garage/run/Zm9vYmFy.env',
      '--log-driver',
      'k8s-file',
      '--log-opt',
      'max-size=20mb',
      '--entrypoint',
      'ray',
      'docker.io/rayproject/ray:2.58.0-py312-gpu',
      'start',
      '--address=10.8.0.1:6379',
      '--block',
      '--node-ip-address=10.8.0.7',
      '--num-gpus=1',
      '--resources={"garage_region:eu-north":1,"garage_vram_mib":24564}',
      '--disable-usage-stats',
    ])
    const { options, command } = split(argv, rayImage)
    expect(options.filter((a) => a.startsWith('--')).filter((f) => !runFlags.has(f))).toEqual([])
    expect(
      command
        .slice(1)
        .map((a) => a.split('=')[0])
        .filter((f) => !rayStartFlags.has(f!)),
    ).toEqual([])
    expect(argv).not.toContain('--privileged')
    expect(JSON.parse(argv.find((a) => a.startsWith('--resources='))!.slice('--resources='.length))).toEqual({
      'garage_region:eu-north': 1,
      garage_vram_mib: 24564,
    })
  })

  it('refuses a malformed head address, node IP or region', () => {
    expect(() => rayWorkerContainerSpec({ ...input, headAddress: '10.8.0.1' })).toThrow(RangeError)
    expect(() => rayWorkerContainerSpec({ ...input, nodeIpAddress: 'eth0' })).toThrow(RangeError)
    expect(() => rayWorkerContainerSpec({ ...input, region: 'EU North' })).toThrow(RangeError)
  })

  const assignment: RayClusterAssignment = {
    region: 'eu-north',
    headAddress: '10.8.0.1:6379',
    token: 'ray-cluster-token-Zx81',
    trusted: true,
    nodeIpAddress: '10.8.0.7',
  }

  it('a started worker got the token in a 0600 env file, and in no argv or label', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'garage-ray-'))
    dirs.push(dataDir)
    const runtime = new FakeRuntime()
    runtime.startupLines = ['Local node IP: 10.8.0.7', 'Ray runtime started.']
    const worker = new RayWorker({ nodePeerId: peer, dataDir, optIn: true, runtime })
    await worker.start({ assignment, numGpus: 1, vramMiB: 24564 })
    expect(worker.state).toBe('ready')
    const [run] = runtime.runs
    expect(run?.envFile).toEqual({
      mode: 0o600,
      text: 'RAY_AUTH_MODE=token\nRAY_AUTH_TOKEN=ray-cluster-token-Zx81\n',
    })
    expect(run?.argv.join(' ')).not.toContain(assignment.token)
    expect(JSON.stringify(run?.spec.labels ?? {})).not.toContain(assignment.token)
    // The file is gone once the container holds its environment.
    await expect(stat(run!.spec.envFile!)).rejects.toThrow(/ENOENT/)
    await worker.stop()
    expect(runtime.calls.slice(-2)).toEqual(['stop c0ffee', 'remove c0ffee'])
  })

  it('refuses a cluster the certificate does not mark trusted, and one the user did not opt in to', async () => {
    const runtime = new FakeRuntime()
    const dataDir = await mkdtemp(join(tmpdir(), 'garage-ray-'))
    dirs.push(dataDir)
    const optedIn = new RayWorker({ nodePeerId: peer, dataDir, optIn: true, runtime })
    await expect(
      optedIn.start({ assignment: { ...assignment, trusted: false }, numGpus: 1, vramMiB: 1 }),
    ).rejects.toThrow(RayClusterNotTrustedError)
    const notOptedIn = new RayWorker({ nodePeerId: peer, dataDir, optIn: false, runtime })
    await expect(notOptedIn.start({ assignment, numGpus: 1, vramMiB: 1 })).rejects.toMatchObject({
      name: 'RayClusterOptInRequiredError',
    })
    expect(RayClusterOptInRequiredError.name).toBe('RayClusterOptInRequiredError')
    expect(runtime.runs).toHaveLength(0)
  })
})
