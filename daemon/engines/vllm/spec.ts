import type { ContainerSpec, GpuRequest } from '../../../containers/types.ts'

/** The port vLLM listens on inside its container; the host side is a free 127.0.0.1 port. */
export const vllmContainerPort = 8000
/** Where the image's Hugging Face cache lives (it runs as root). */
export const vllmCacheMount = '/root/.cache/huggingface'

export interface VllmContainerInput {
  image: string
  name: string
  nodePeerId: string
  hostPort: number
  /** Hugging Face repo id or a path inside the container. */
  model: string
  servedModelName: string
  gpuMemoryUtilization: number
  maxModelLen?: number
  maxNumSeqs?: number
  /** `embed`: a pooling model for /v1/embeddings (`--runner pooling`); default generate. */
  task?: 'generate' | 'embed'
  /** Host folder for the Hugging Face cache (under the daemon's data dir). */
  cacheDir: string
  gpu: GpuRequest
  shmSize: string
  /** 0600 env file holding VLLM_API_KEY (and HF_TOKEN when the user gave one); see vllmSecrets. */
  envFile: string
  /**
   * A pipeline group's vLLM on the region's Ray cluster (a regional head runs it): Ray's distributed
   * executor over the cluster's GPUs, on the host network (Ray's ports), listening on 127.0.0.1.
   * RAY_AUTH_TOKEN goes in the env file (vllmSecrets).
   */
  ray?: { address: string; pipelineParallel: number; tensorParallel: number }
  /** The container's role label; default `vllm`. */
  role?: 'vllm' | 'vllm-group'
}

/**
 * The secrets of one start, for the 0600 env file. The key goes in VLLM_API_KEY rather than
 * `--api-key`: a container's processes are host processes, and every local user can read their
 * command lines (`ps`), while a process's environment is readable by its own user and root only.
 * vLLM reads VLLM_API_KEY when `--api-key` is absent and checks it on every /v1 route.
 */
export function vllmSecrets(
  apiKey: string,
  huggingFaceToken?: string,
  rayToken?: string,
): Record<string, string> {
  return {
    VLLM_API_KEY: apiKey,
    ...(huggingFaceToken != null ? { HF_TOKEN: huggingFaceToken } : {}),
    ...(rayToken != null ? { RAY_AUTH_MODE: 'token', RAY_AUTH_TOKEN: rayToken } : {}),
  }
}

/** The container that serves one model with vLLM's OpenAI-compatible server. */
export function vllmContainerSpec(input: VllmContainerInput): ContainerSpec {
  if (!(input.gpuMemoryUtilization > 0 && input.gpuMemoryUtilization <= 1)) {
    throw new RangeError('gpuMemoryUtilization must be in (0, 1]')
  }
  const args = [
    // The image's entrypoint is `vllm serve`, which takes the model as its positional argument.
    input.model,
    // Bridge: inside the container only, the published port is bound to 127.0.0.1 on the host.
    // Host network (a Ray group): loopback itself, on the port picked for it.
    '--host',
    input.ray != null ? '127.0.0.1' : '0.0.0.0',
    '--port',
    String(input.ray != null ? input.hostPort : vllmContainerPort),
    '--served-model-name',
    input.servedModelName,
    '--gpu-memory-utilization',
    String(input.gpuMemoryUtilization),
  ]
  if (input.maxModelLen != null) args.push('--max-model-len', String(input.maxModelLen))
  if (input.maxNumSeqs != null) args.push('--max-num-seqs', String(input.maxNumSeqs))
  // vLLM serves /v1/embeddings from its pooling runner; the default runner generates.
  if (input.task === 'embed') args.push('--runner', 'pooling')
  if (input.ray != null)
    args.push(
      '--distributed-executor-backend',
      'ray',
      '--pipeline-parallel-size',
      String(input.ray.pipelineParallel),
      '--tensor-parallel-size',
      String(input.ray.tensorParallel),
    )
  return {
    image: input.image,
    name: input.name,
    role: input.role ?? 'vllm',
    nodePeerId: input.nodePeerId,
    args,
    // A volunteer's machine reports nothing to vLLM's usage statistics.
    env: {
      VLLM_NO_USAGE_STATS: '1',
      DO_NOT_TRACK: '1',
      ...(input.ray != null ? { RAY_ADDRESS: input.ray.address } : {}),
    },
    envFile: input.envFile,
    ...(input.ray != null
      ? { network: 'host' as const }
      : { ports: [{ hostPort: input.hostPort, containerPort: vllmContainerPort }] }),
    volumes: [{ hostPath: input.cacheDir, containerPath: vllmCacheMount, relabel: true }],
    gpu: input.gpu,
    shmSize: input.shmSize,
  }
}
