/**
 * The images Garage runs, pinned: the gamer's daemon (vLLM, a Ray worker) and the coordinator's head
 * (the Ray head) must agree on them, so they live in one place.
 */

/**
 * The pinned vLLM image. Fully qualified, so rootless Podman never has to ask which registry a short
 * name means. v0.30.0's default image is built on CUDA 13.0 (NVIDIA driver 580 or newer); the
 * `-cu129` image of the same release runs on the drivers before it.
 */
export const vllmImage = 'docker.io/vllm/vllm-openai:v0.30.0'
export const vllmImageCuda129 = 'docker.io/vllm/vllm-openai:v0.30.0-cu129'

/** The image for a driver version as nvidia-smi prints it ("550.120"); the default image when unknown. */
export function vllmImageForDriver(driverVersion: string | null | undefined): string {
  const major = Number.parseInt(driverVersion ?? '', 10)
  return Number.isFinite(major) && major < 580 ? vllmImageCuda129 : vllmImage
}

/**
 * The pinned Ray image (Ray 2.58.0, Python 3.12, CUDA). Token authentication needs Ray 2.52 or newer.
 * Every node of a Ray cluster must run the head's Ray and Python versions, and for vLLM across nodes
 * the head's vLLM too: an assignment names its image, and this is only the default.
 */
export const rayImage = 'docker.io/rayproject/ray:2.58.0-py312-gpu'
