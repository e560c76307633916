import { defaultDataDir } from '../../core/paths.ts'
import { ControlClient } from '../../daemon/control/client.ts'
import { type CommandContext, parseOptions, print } from '../io.ts'
import { describeState } from './status.ts'

export const usage = `Usage: garage resume [--data-dir DIR]

Lifts your pause (garage pause, the tray's Pause). The node serves again unless something else
still holds it paused (a game running, the schedule, the battery): garage status says what.

Options:
  --data-dir DIR   the node's data dir (default: $GARAGE_DATA_DIR or the OS's data folder)`

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, { 'data-dir': { type: 'string' } })
  const client = await ControlClient.connect(values['data-dir'] ?? defaultDataDir(ctx.env))
  const status = await client.resume()
  print(ctx.stdout, describeState(status))
  return 0
}
