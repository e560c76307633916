import { isAbsolute, posix, win32 } from 'node:path'
import { ContainerSpecError } from './errors.ts'
import { garageLabelKeys, garageLabels } from './labels.ts'
import type { ContainerRuntimeName, ContainerSpec, GpuRequest } from './types.ts'

// Everything here ends up as argv (no shell), but the CLI parses some values itself (`-v a:b:ro`,
// `--label k=v`, `--gpus "device=0,1"`): the checks keep those values from meaning something else.
const namePattern = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$/
const imagePattern = /^[a-zA-Z0-9][a-zA-Z0-9._\-/:@]{0,254}$/
const peerIdPattern = /^[a-zA-Z0-9]{1,128}$/
const labelKeyPattern = /^[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$/
const envKeyPattern = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/
const gpuDevicePattern = /^[a-zA-Z0-9][a-zA-Z0-9._\-/=]{0,127}$/
const shmSizePattern = /^[1-9][0-9]{0,9}[bkmg]?$/i
const capabilityPattern = /^[A-Z_]{2,40}$/
/** Options that would undo the isolation the daemon promises the gamer. */
const loosening = [/unconfined/i, /^label[=:]disable$/i]

export const loopbackHost = '127.0.0.1'

function refuse(message: string): never {
  throw new ContainerSpecError(message, 'CONTAINER_SPEC_INVALID')
}

function noLineBreaks(what: string, value: string): void {
  if (/[\0\r\n]/.test(value)) refuse(`${what} must be one line`)
}

export function isValidImageReference(image: string): boolean {
  return imagePattern.test(image) && !image.includes('//') && !image.includes('..')
}

function gpuArgs(runtime: ContainerRuntimeName, gpu: GpuRequest): string[] {
  if (gpu === 'none') return []
  if (runtime === 'podman') {
    // Podman reads the NVIDIA Container Toolkit's CDI spec (`nvidia-ctk cdi generate`) natively.
    if (gpu === 'all') return ['--device', 'nvidia.com/gpu=all']
    return gpu.devices.flatMap((d) => ['--device', d.includes('=') ? d : `nvidia.com/gpu=${d}`])
  }
  if (gpu === 'all') return ['--gpus', 'all']
  // Docker splits --gpus as CSV: a device list needs its own double quotes inside the value.
  return ['--gpus', `"device=${gpu.devices.join(',')}"`]
}

/** The argv after the `podman` / `docker` binary that creates and starts the container described by `spec`. */
export function buildRunArgs(runtime: ContainerRuntimeName, spec: ContainerSpec): string[] {
  if (!namePattern.test(spec.name)) refuse(`container name ${JSON.stringify(spec.name)} is not allowed`)
  if (!isValidImageReference(spec.image))
    refuse(`image reference ${JSON.stringify(spec.image)} is not allowed`)
  if (!peerIdPattern.test(spec.nodePeerId)) refuse('the node PeerId label must be a base58 PeerId')

  const labels: Record<string, string> = {}
  for (const [key, value] of Object.entries(spec.labels ?? {})) {
    if (!labelKeyPattern.test(key)) refuse(`label key ${JSON.stringify(key)} is not allowed`)
    if ((Object.values(garageLabelKeys) as string[]).includes(key))
      refuse(`label ${key} is set by the daemon`)
    noLineBreaks(`label ${key}`, value)
    labels[key] = value
  }
  const args = ['run', '--detach', '--name', spec.name, '--pull=never']
  for (const [key, value] of Object.entries({ ...garageLabels(spec.nodePeerId, spec.role), ...labels })) {
    args.push('--label', `${key}=${value}`)
  }

  if (spec.network === 'host') args.push('--network', 'host')
  for (const port of spec.ports ?? []) {
    if ((port.hostIp ?? loopbackHost) !== loopbackHost) refuse('published ports bind 127.0.0.1 only')
    for (const p of [port.hostPort, port.containerPort]) {
      if (!Number.isInteger(p) || p < 1 || p > 65_535) refuse(`port ${p} is out of range`)
    }
    args.push('--publish', `${loopbackHost}:${port.hostPort}:${port.containerPort}`)
  }
  if (spec.network === 'host' && (spec.ports?.length ?? 0) > 0) refuse('host networking publishes no ports')

  for (const volume of spec.volumes ?? []) {
    // A Windows host path (Docker Desktop) starts with its drive letter: C:\Users\...
    const host = volume.hostPath.replace(/^[A-Za-z]:(?=\\)/, '')
    if (!(posix.isAbsolute(host) || win32.isAbsolute(host)) || /[:,\0\r\n]/.test(host)) {
      refuse(`volume path ${JSON.stringify(volume.hostPath)} is not allowed`)
    }
    if (!posix.isAbsolute(volume.containerPath) || /[:,\0\r\n]/.test(volume.containerPath)) {
      refuse(`volume path ${JSON.stringify(volume.containerPath)} is not allowed`)
    }
    const options = [volume.readOnly === true ? 'ro' : null, volume.relabel === true ? 'z' : null].filter(
      (o) => o != null,
    )
    args.push(
      '--volume',
      `${volume.hostPath}:${volume.containerPath}${options.length > 0 ? `:${options.join(',')}` : ''}`,
    )
  }

  const gpu = spec.gpu ?? 'none'
  if (typeof gpu === 'object') {
    if (gpu.devices.length === 0) refuse('a GPU device list cannot be empty')
    for (const d of gpu.devices)
      if (!gpuDevicePattern.test(d)) refuse(`GPU device ${JSON.stringify(d)} is not allowed`)
  }
  args.push(...gpuArgs(runtime, gpu))

  if (spec.user != null) {
    if (!/^[0-9]{1,10}(:[0-9]{1,10})?$/.test(spec.user))
      refuse(`user ${JSON.stringify(spec.user)} is not uid[:gid]`)
    args.push('--user', spec.user)
  }
  if (spec.shmSize != null) {
    if (!shmSizePattern.test(spec.shmSize)) refuse(`shm size ${JSON.stringify(spec.shmSize)} is not allowed`)
    args.push('--shm-size', spec.shmSize)
  }
  args.push('--security-opt', 'no-new-privileges')
  for (const option of spec.securityOpts ?? []) {
    noLineBreaks('security option', option)
    if (option === 'no-new-privileges') continue
    if (loosening.some((re) => re.test(option))) refuse(`security option ${option} would weaken isolation`)
    args.push('--security-opt', option)
  }
  for (const cap of spec.capDrop ?? []) {
    if (!capabilityPattern.test(cap)) refuse(`capability ${JSON.stringify(cap)} is not allowed`)
    args.push('--cap-drop', cap)
  }

  for (const [key, value] of Object.entries(spec.env ?? {})) {
    if (!envKeyPattern.test(key)) refuse(`environment variable name ${JSON.stringify(key)} is not allowed`)
    noLineBreaks(`environment variable ${key}`, value)
    args.push('--env', `${key}=${value}`)
  }
  if (spec.envFile != null) {
    if (!isAbsolute(spec.envFile)) refuse('the env file path must be absolute')
    noLineBreaks('env file path', spec.envFile)
    args.push('--env-file', spec.envFile)
  }

  // Bounded logs: vLLM logs for as long as it runs, and the engines' default log files grow forever.
  if (runtime === 'podman') args.push('--log-driver', 'k8s-file', '--log-opt', 'max-size=20mb')
  else args.push('--log-driver', 'local')

  if (spec.entrypoint != null) {
    if (!/^[a-zA-Z0-9_./-]{1,255}$/.test(spec.entrypoint)) refuse('entrypoint is not allowed')
    args.push('--entrypoint', spec.entrypoint)
  }
  if (args.includes('--privileged')) refuse('privileged containers are never run')
  args.push(spec.image)
  for (const arg of spec.args ?? []) {
    if (arg.includes('\0')) refuse('container arguments cannot hold NUL')
    args.push(arg)
  }
  return args
}
