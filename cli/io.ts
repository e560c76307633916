import { parseArgs } from 'node:util'
import { GarageError } from '../core/errors.ts'

/** What a command may touch besides its arguments; tests pass their own. */
export interface CommandContext {
  stdout: NodeJS.WritableStream
  stderr: NodeJS.WritableStream
  env: NodeJS.ProcessEnv
  /** Resolves when the user asks a long-running command to stop (SIGINT/SIGTERM). */
  shutdown: AbortSignal
}

export type CommandRun = (argv: string[], ctx: CommandContext) => Promise<number>

/** A mistake in how the command was called: printed with the command's usage, exit code 2. */
export class UsageError extends GarageError {
  constructor(message: string) {
    super(message, 'USAGE')
  }
}

const durationUnits: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }

/** "30d", "12h", "90m", "45s", "500ms" → milliseconds. */
export function parseDuration(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(text.trim())
  if (m == null)
    throw new UsageError(`${what} must be a duration like 30d, 12h, 90m or 45s, not ${JSON.stringify(text)}`)
  return Math.round(Number(m[1]) * (durationUnits[m[2] as string] as number))
}

/** "host:port" → parts; "[::1]:80" works too. */
export function parseHostPort(text: string, what: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(text)
  const port = Number(m?.[3])
  if (m == null || port > 65_535)
    throw new UsageError(`${what} must be HOST:PORT, not ${JSON.stringify(text)}`)
  return { host: (m[1] ?? m[2]) as string, port }
}

export function splitList(values: string[] | undefined): string[] {
  return (values ?? [])
    .flatMap((v) => v.split(','))
    .map((v) => v.trim())
    .filter((v) => v !== '')
}

/** --authority, else $GARAGE_AUTHORITY: the authority a node, gateway or lookup pins. */
export function authorityOption(value: string | undefined, env: NodeJS.ProcessEnv): string {
  const authority = value ?? env.GARAGE_AUTHORITY
  if (authority == null || authority === '')
    throw new UsageError('--authority (or GARAGE_AUTHORITY) is required')
  return authority
}

/** --bootstrap (repeatable, comma-separated), else $GARAGE_BOOTSTRAP (comma-separated). */
export function bootstrapOption(values: string[] | undefined, env: NodeJS.ProcessEnv): string[] {
  const bootstrap = splitList(values ?? (env.GARAGE_BOOTSTRAP != null ? [env.GARAGE_BOOTSTRAP] : []))
  if (bootstrap.length === 0)
    throw new UsageError('--bootstrap (or GARAGE_BOOTSTRAP) is required (at least one)')
  return bootstrap
}

export function print(stream: NodeJS.WritableStream, text: string): void {
  stream.write(text.endsWith('\n') ? text : `${text}\n`)
}

type ParseArgsOptions = NonNullable<Parameters<typeof parseArgs>[0]>['options']

/** node:util parseArgs, with its errors turned into UsageErrors (exit 2 with the usage text). */
export function parseOptions<T extends ParseArgsOptions>(
  argv: string[],
  options: T,
  allowPositionals = false,
) {
  try {
    return parseArgs({ args: argv, options: options as T, allowPositionals, strict: true })
  } catch (err) {
    if (String((err as { code?: string }).code).startsWith('ERR_PARSE_ARGS'))
      throw new UsageError((err as Error).message)
    throw err
  }
}
