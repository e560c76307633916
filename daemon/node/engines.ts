import { join } from 'node:path'
import { CliContainerRuntime } from '../../containers/cli.ts'
import { vllmImageForDriver } from '../../containers/images.ts'
import type { ContainerRuntimeName, GpuRequest, PullProgress } from '../../containers/types.ts'
import { GarageError } from '../../core/errors.ts'
import type { Logger } from '../../core/logger.ts'
import { readSecretIfPresent } from '../../core/secret-file.ts'
import type { Assignment } from '../../mesh/region-messages.ts'
import { LlamaCppEngine } from '../engines/llamacpp/engine.ts'
import type { Engine } from '../engines/types.ts'
import { VllmEngine } from '../engines/vllm/engine.ts'
import { vllmCapability } from '../hardware/capability.ts'
import type { HardwareReport } from '../hardware/types.ts'

/** The engine an assignment names cannot run on this machine as probed. */
export class EngineUnavailableError extends GarageError {}

/** What the node tells the engine it makes, to hear back while it starts. */
export interface EngineContext {
  /** Image pull progress (vLLM). */
  onPullProgress(progress: PullProgress): void
}

export interface NodeEnginesInit {
  dataDir: string
  nodePeerId(): string
  hardware(): HardwareReport | null
  logger: Logger
  /** Another vLLM image than the one pinned for the driver (a coordinator's build; tests' stand-in). */
  vllmImage?: string
  /** For gated Hugging Face models (`<data dir>/huggingface.token`). */
  huggingFaceToken?(): string | undefined
}

/** Where a node keeps its Hugging Face token for gated models (0600, like every secret Garage reads). */
export const huggingFaceTokenFile = 'huggingface.token'

/** The Hugging Face token in the data dir, or undefined when there is none; refused when others can read it. */
export function readHuggingFaceToken(dataDir: string): Promise<string | undefined> {
  return readSecretIfPresent(
    join(dataDir, huggingFaceTokenFile),
    'the Hugging Face token file',
    (message) => new GarageError(message, 'HF_TOKEN_PERMISSIONS'),
  )
}

/**
 * How a container gets the GPU on the path the probe found: Podman through the CDI devices the
 * specs declare (all of them when a spec names `all`), Docker through `--gpus all` (its nvidia
 * runtime or CDI).
 */
export function vllmGpuRequest(hardware: HardwareReport, runtime: ContainerRuntimeName): GpuRequest {
  if (runtime === 'docker') return 'all'
  const devices = hardware.nvidiaContainer.cdiDevices
  if (devices.includes('nvidia.com/gpu=all') || devices.length === 0) return 'all'
  return { devices }
}

/**
 * The one place an assignment becomes an engine, for `garage node`, the devnet and the tests:
 * `llamacpp` → the embedded engine (its own process), `vllm` → vLLM in Podman or Docker, whichever
 * the probe found with a path to the NVIDIA GPU, with the image for the driver.
 */
export function createNodeEngine(
  assignment: Assignment,
  context: EngineContext,
  init: NodeEnginesInit,
): Engine {
  if (assignment.engine === 'llamacpp') return new LlamaCppEngine()
  const hardware = init.hardware()
  if (hardware == null) throw new EngineUnavailableError('vLLM needs the hardware probe first', 'NO_HARDWARE')
  const capability = vllmCapability(hardware)
  if (!capability.available || capability.runtime == null)
    throw new EngineUnavailableError(capability.reason ?? 'vLLM cannot run here', 'VLLM_UNAVAILABLE')
  const token = init.huggingFaceToken?.()
  return new VllmEngine({
    nodePeerId: init.nodePeerId(),
    dataDir: init.dataDir,
    runtime: new CliContainerRuntime(capability.runtime),
    image:
      init.vllmImage ?? vllmImageForDriver(hardware.gpus.find((g) => g.vendor === 'nvidia')?.driverVersion),
    gpu: vllmGpuRequest(hardware, capability.runtime),
    ...(token != null ? { huggingFaceToken: token } : {}),
    logger: init.logger,
    onPullProgress: (p) => context.onPullProgress(p),
  })
}
