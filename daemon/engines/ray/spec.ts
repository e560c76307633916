import { isIP } from 'node:net'
import type { ContainerSpec, GpuRequest } from '../../../containers/types.ts'
import { regionNamePattern } from '../../../mesh/certificate.ts'

/** The model cache inside the container; HF_HOME points at it, whichever user the image runs as. */
export const rayCacheMount = '/garage/huggingface'

export interface RayWorkerContainerInput {
  image: string
  name: string
  nodePeerId: string
  /** host:port of the head's GCS, e.g. 10.8.0.1:6379. */
  headAddress: string
  /** The address the head and the other nodes reach this node at. */
  nodeIpAddress: string
  numGpus: number
  region: string
  vramMiB: number
  /** 0600 file with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN. */
  envFile: string
  cacheDir: string
  gpu: GpuRequest
  shmSize: string
}

const hostPortPattern =
  /^(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9.-]{0,251}[a-zA-Z0-9])?):([0-9]{1,5})$/

export function isValidHeadAddress(address: string): boolean {
  const m = hostPortPattern.exec(address)
  const port = Number(m?.[1])
  return m != null && port >= 1 && port <= 65_535
}

/** Ray custom resources: the region (vLLM's placement groups ask for it) and the VRAM this node brings. */
export function rayResources(region: string, vramMiB: number): string {
  return JSON.stringify({ [`garage_region:${region}`]: 1, garage_vram_mib: vramMiB })
}

/** `ray start` joining a head and blocking in the foreground, so the container lives as long as the node. */
export function rayWorkerContainerSpec(input: RayWorkerContainerInput): ContainerSpec {
  if (!isValidHeadAddress(input.headAddress))
    throw new RangeError(`head address ${input.headAddress} is not host:port`)
  if (isIP(input.nodeIpAddress) === 0)
    throw new RangeError(`node IP ${input.nodeIpAddress} is not an IP address`)
  if (!regionNamePattern.test(input.region))
    throw new RangeError(`region ${input.region} is not a region name`)
  if (!Number.isInteger(input.numGpus) || input.numGpus < 0)
    throw new RangeError('numGpus must be a whole number')
  if (!Number.isInteger(input.vramMiB) || input.vramMiB < 0)
    throw new RangeError('vramMiB must be a whole number')
  return {
    image: input.image,
    name: input.name,
    role: 'ray-worker',
    nodePeerId: input.nodePeerId,
    // The head's image may be vLLM's (whose entrypoint is `vllm serve`): run `ray` whatever the image.
    entrypoint: 'ray',
    args: [
      'start',
      `--address=${input.headAddress}`,
      '--block',
      `--node-ip-address=${input.nodeIpAddress}`,
      `--num-gpus=${input.numGpus}`,
      `--resources=${rayResources(input.region, input.vramMiB)}`,
      '--disable-usage-stats',
    ],
    env: { HF_HOME: rayCacheMount },
    envFile: input.envFile,
    // Ray's raylet, object manager and worker ports must be reachable by the cluster's other nodes.
    network: 'host',
    // rayproject/ray runs as uid 1000, vLLM's image as root: root in both, so the shared model cache
    // (owned by the daemon's user, which rootless Podman maps to root) is writable whatever the image.
    user: '0:0',
    volumes: [{ hostPath: input.cacheDir, containerPath: rayCacheMount, relabel: true }],
    gpu: input.gpu,
    shmSize: input.shmSize,
  }
}
