import { defaultDataDir } from '../../core/paths.ts'
import { formatDoctor, runDoctor } from '../../daemon/hardware/doctor.ts'
import { defaultCommandTimeoutMs } from '../../daemon/hardware/probe.ts'
import { type CommandContext, parseDuration, parseOptions, print } from '../io.ts'

export const usage = `Usage: garage doctor [--json] [--data-dir DIR] [--timeout D]

Checks whether this machine can serve: GPUs and drivers (nvidia-smi, rocm-smi), CPU, RAM, free disk,
OS and WSL2, Podman and Docker, the NVIDIA container path (CDI or the nvidia runtime), the embedded
engine's GPU back-ends, which engines can run and which models fit. Prints the exact fix for each
missing piece on this OS. Exits 0 when some engine can serve some model, 1 otherwise.

Options:
  --json          the same as a JSON document (schema: docs/doctor.md)
  --data-dir DIR  where models will be stored: free disk is measured there
  --timeout D     deadline for each external tool such as nvidia-smi (default: ${defaultCommandTimeoutMs / 1000}s)`

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    json: { type: 'boolean', default: false },
    'data-dir': { type: 'string' },
    timeout: { type: 'string', default: `${defaultCommandTimeoutMs}ms` },
  })
  const report = await runDoctor({
    dataDir: values['data-dir'] ?? defaultDataDir(ctx.env),
    env: ctx.env,
    commandTimeoutMs: parseDuration(values.timeout, '--timeout'),
  })
  print(ctx.stdout, values.json ? JSON.stringify(report, null, 2) : formatDoctor(report))
  return report.canServe ? 0 : 1
}
