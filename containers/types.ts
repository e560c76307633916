import type { Logger } from '../core/logger.ts'

/**
 * One interface over the Podman and Docker CLIs. The daemon never talks to a container engine's
 * socket: the CLI is what the user installed and configured (rootless Podman, Docker Desktop, CDI).
 */

export type ContainerRuntimeName = 'podman' | 'docker'

/** What a Garage container is for; also its `garage.role` label. */
export type GarageContainerRole = 'vllm' | 'vllm-group' | 'ray-worker' | 'ray-head'

export interface ContainerRuntimeDetails {
  name: ContainerRuntimeName
  version: string | null
  rootless: boolean | null
}

/** Host side is always 127.0.0.1: nothing a container serves is reachable from another machine. */
export interface PublishedPort {
  hostPort: number
  containerPort: number
  /** Only loopback is accepted; anything else is refused when the argv is built. */
  hostIp?: '127.0.0.1'
}

export interface VolumeMount {
  hostPath: string
  containerPath: string
  readOnly?: boolean
  /** SELinux hosts (Fedora, RHEL): relabel the host folder so the container may use it (`:z`). */
  relabel?: boolean
}

/** `all`: every GPU (CDI `nvidia.com/gpu=all` on Podman, `--gpus all` on Docker). */
export type GpuRequest = 'none' | 'all' | { devices: string[] }

export interface ContainerSpec {
  image: string
  name: string
  role: GarageContainerRole
  /** PeerId of the node that owns the container (the `garage.node` label, used to find orphans). */
  nodePeerId: string
  /** Replaces the image's ENTRYPOINT (the Ray worker runs `ray` from whichever image the head uses). */
  entrypoint?: string
  args?: string[]
  /** Non-secret environment only: it shows in `ps` on the host. Secrets go in `envFile`. */
  env?: Record<string, string>
  /** A 0600 file of KEY=value lines (see writeSecretEnvFile); read by the CLI, never on the command line. */
  envFile?: string
  /** Extra labels; the garage.* labels are always set from role and nodePeerId. */
  labels?: Record<string, string>
  ports?: PublishedPort[]
  volumes?: VolumeMount[]
  gpu?: GpuRequest
  /** `host` only for the Ray worker of a trusted cluster (Ray's many ports must reach its peers). */
  network?: 'bridge' | 'host'
  /** `uid:gid` to run as, instead of the image's user. */
  user?: string
  /** Size of /dev/shm, e.g. `8g`. */
  shmSize?: string
  /** Added to `no-new-privileges`, which is always set. */
  securityOpts?: string[]
  capDrop?: string[]
}

export type ContainerStateName =
  | 'created'
  | 'running'
  | 'paused'
  | 'restarting'
  | 'exited'
  | 'stopped'
  | 'removing'
  | 'dead'
  | 'unknown'

export interface ContainerStatus {
  id: string
  name: string
  image: string
  state: ContainerStateName
  running: boolean
  /** Last exit code; null while it never exited. */
  exitCode: number | null
  oomKilled: boolean
  /** From the image's HEALTHCHECK, when it has one. */
  health: 'starting' | 'healthy' | 'unhealthy' | null
  startedAt: string | null
  finishedAt: string | null
  labels: Record<string, string>
}

export type PullPhase = 'resolving' | 'downloading' | 'extracting' | 'writing' | 'done'

export interface PullProgress {
  image: string
  phase: PullPhase
  /** Layers seen so far; grows while the CLI announces them. */
  layersTotal: number
  layersDone: number
  /** Bytes, when the CLI prints them (it does when its output is a terminal). */
  bytesDone: number | null
  bytesTotal: number | null
  /** 0..1 when it can be told, from bytes or else from layers. */
  fraction: number | null
  /** The CLI line this report came from. */
  line: string
}

export interface CommandOptions {
  signal?: AbortSignal
  timeoutMs?: number
}

export interface PullOptions extends CommandOptions {
  onProgress?: (progress: PullProgress) => void
}

export interface LogFollowOptions {
  logger: Logger
  /** Only lines written after this time (RFC 3339), e.g. the StartedAt of a restart. */
  since?: string
  signal?: AbortSignal
  /** Every line, for callers that wait for one (the Ray worker waits for "Ray runtime started"). */
  onLine?: (line: string) => void
}

export interface LogFollower {
  /** Resolves when the container stops writing (it exited or was removed) or the signal aborted. */
  done: Promise<void>
  /** The last lines, for error messages. */
  tail(): string[]
}

export interface ContainerRuntime {
  readonly name: ContainerRuntimeName
  details(options?: CommandOptions): Promise<ContainerRuntimeDetails>
  /** The argv after the binary for `run` (pure: tests and docs read it). */
  runArgs(spec: ContainerSpec): string[]
  imageExists(image: string, options?: CommandOptions): Promise<boolean>
  pull(image: string, options?: PullOptions): Promise<void>
  /** Creates and starts a detached container; resolves with its id. */
  run(spec: ContainerSpec, options?: CommandOptions): Promise<string>
  start(id: string, options?: CommandOptions): Promise<void>
  /** null when no such container exists. */
  inspect(id: string, options?: CommandOptions): Promise<ContainerStatus | null>
  /** Resolves with the exit code when the container stops; null when `timeoutMs` passed first. */
  wait(id: string, options?: CommandOptions): Promise<number | null>
  followLogs(id: string, options: LogFollowOptions): LogFollower
  kill(id: string, options?: CommandOptions & { killSignal?: string }): Promise<void>
  /** SIGTERM, then SIGKILL after the grace period. */
  stop(id: string, options?: CommandOptions & { graceMs?: number }): Promise<void>
  remove(id: string, options?: CommandOptions): Promise<void>
  list(labels: Record<string, string>, options?: CommandOptions): Promise<ContainerStatus[]>
  /** Removes every Garage container of this node that an earlier run left behind; returns their names. */
  removeOrphans(
    nodePeerId: string,
    options?: CommandOptions & { role?: GarageContainerRole; keep?: string[] },
  ): Promise<string[]>
}

/** What the probe found of one container runtime. */
export interface ContainerRuntimeInfo {
  name: 'podman' | 'docker'
  installed: boolean
  version: string | null
  /** The engine answers (Docker's daemon, Podman's service or machine). */
  reachable: boolean
  rootless: boolean | null
  /** Docker: an `nvidia` runtime registered in the daemon. */
  nvidiaRuntime: boolean
  /** Docker: CDI support enabled in the daemon (`CDISpecDirs` in docker info). */
  cdiEnabled: boolean
  message: string | null
}
