import { GarageError } from '../core/errors.ts'

/** Neither Podman nor Docker answers; the message says what to install or start. */
export class ContainerRuntimeUnavailableError extends GarageError {}

/** A spec the daemon refuses to run (a non-loopback port, an unsafe name or image reference). */
export class ContainerSpecError extends GarageError {}

/** The CLI ran and failed; `stderr` holds its words. */
export class ContainerCommandError extends GarageError {
  readonly command: string
  readonly exitCode: number | null
  readonly stderr: string

  constructor(command: string, exitCode: number | null, stderr: string, options?: ErrorOptions) {
    const reason = stderr.trim().split('\n').filter(Boolean).pop() ?? `exit code ${exitCode ?? 'none'}`
    super(`${command} failed: ${reason}`, 'CONTAINER_COMMAND_FAILED', options)
    this.command = command
    this.exitCode = exitCode
    this.stderr = stderr
  }
}

/** The CLI did not finish within its deadline (a hung engine, a stalled registry). */
export class ContainerCommandTimeoutError extends GarageError {}

export class ImagePullError extends GarageError {}
