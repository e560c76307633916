import { GarageError } from '../core/errors.ts'
import { type CommandContext, type CommandRun, print, UsageError } from './io.ts'

interface CommandSpec {
  summary: string
  load: () => Promise<{ run: CommandRun; usage: string }>
}

/** The one command table: each command lives in its own module and is imported only when used. */
export const commands: Record<string, CommandSpec> = {
  id: {
    summary: "Print this machine's mesh PeerId (creates the identity key)",
    load: () => import('./commands/id.ts'),
  },
  authority: {
    summary: 'Federation authority: init its key, issue and inspect region certificates',
    load: () => import('./commands/authority.ts'),
  },
  bootstrap: {
    summary: 'Run a bootstrap node: DHT server, relay, region announcement',
    load: () => import('./commands/bootstrap.ts'),
  },
  node: {
    summary: 'Run a node: join the nearest region, serve the model it assigns over the mesh',
    load: () => import('./commands/node.ts'),
  },
  federation: {
    summary: 'Run the federation gateway: the public OpenAI API across regions',
    load: () => import('./commands/federation.ts'),
  },
  regions: {
    summary: 'Discover regional heads and show their certificates and RTT',
    load: () => import('./commands/regions.ts'),
  },
  doctor: {
    summary: 'Check this machine: GPUs, drivers, containers, engines, models that fit, what to fix',
    load: () => import('./commands/doctor.ts'),
  },
  model: {
    summary: "Models: write Garage's tiny test model, pull a real GGUF, inspect a GGUF file",
    load: () => import('./commands/model.ts'),
  },
  keys: {
    summary: 'API keys of the federation gateway: create (printed once), list, revoke',
    load: () => import('./commands/keys.ts'),
  },
  ledger: {
    summary: "The federation gateway's usage per API key and credits per node",
    load: () => import('./commands/ledger.ts'),
  },
  status: {
    summary: "Show the running node's state, model, GPU, speed, tokens and credits today",
    load: () => import('./commands/status.ts'),
  },
  pause: {
    summary: 'Pause the running node (for N minutes, until a time, or until resumed)',
    load: () => import('./commands/pause.ts'),
  },
  resume: {
    summary: 'Resume the running node after garage pause',
    load: () => import('./commands/resume.ts'),
  },
  settings: {
    summary: "Show or change the running node's settings: games, schedule, VRAM and temperature caps",
    load: () => import('./commands/settings.ts'),
  },
  logs: {
    summary: "Print the running node's last log lines; --follow for new ones",
    load: () => import('./commands/logs.ts'),
  },
  devnet: {
    summary: 'Run a whole mesh on this machine (what npm start runs)',
    load: () => import('./commands/devnet.ts'),
  },
  version: { summary: 'Print the Garage version', load: () => import('./commands/version.ts') },
}

function help(): string {
  const width = Math.max(...Object.keys(commands).map((c) => c.length))
  const rows = Object.entries(commands).map(([name, spec]) => `  ${name.padEnd(width)}  ${spec.summary}`)
  return [
    'Usage: garage <command> [options]',
    '',
    'Commands:',
    ...rows,
    '',
    'Run garage <command> --help for its options.',
  ].join('\n')
}

export function defaultContext(): CommandContext {
  const controller = new AbortController()
  const stop = (): void => {
    if (controller.signal.aborted) {
      process.stderr.write('garage: stopping now\n')
      process.exit(130)
    }
    controller.abort()
  }
  // `on`, not `once`: signal-exit (pulled in by execa) re-raises a signal when it finds no other
  // listener left, which would kill us in the middle of a clean stop.
  process.on('SIGINT', stop)
  process.on('SIGTERM', stop)
  return { stdout: process.stdout, stderr: process.stderr, env: process.env, shutdown: controller.signal }
}

export async function main(argv: string[], ctx: CommandContext = defaultContext()): Promise<number> {
  const [name, ...rest] = argv
  if (name == null || name === 'help' || name === '--help' || name === '-h') {
    print(ctx.stdout, help())
    return name == null ? 2 : 0
  }
  if (name === '--version' || name === '-v') return main(['version', ...rest], ctx)
  const spec = commands[name]
  if (spec == null) {
    print(ctx.stderr, `garage: unknown command ${JSON.stringify(name)}\n\n${help()}`)
    return 2
  }
  const command = await spec.load()
  if (rest.includes('--help') || rest.includes('-h')) {
    print(ctx.stdout, command.usage)
    return 0
  }
  try {
    return await command.run(rest, ctx)
  } catch (err) {
    if (err instanceof UsageError) {
      print(ctx.stderr, `garage ${name}: ${err.message}\n\n${command.usage}`)
      return 2
    }
    if (err instanceof GarageError) {
      print(ctx.stderr, `garage ${name}: ${(err as Error).message}`)
      return 1
    }
    print(
      ctx.stderr,
      `garage ${name}: internal error, this is a bug; please report it with the output below.\n${(err as Error).stack ?? String(err)}`,
    )
    return 70
  }
}
