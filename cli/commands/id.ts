import { join } from 'node:path'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { defaultDataDir } from '../../core/paths.ts'
import { identityFileName, loadOrCreateIdentity } from '../../mesh/identity.ts'
import { type CommandContext, parseOptions, print } from '../io.ts'

export const usage = `Usage: garage id [--data-dir DIR]

Prints this machine's mesh PeerId, creating the Ed25519 identity key (mode 0600) on first use.
A coordinator passes this PeerId to 'garage authority issue --head'.

Options:
  --data-dir DIR   where Garage keeps its state (default: $GARAGE_DATA_DIR or the OS's data folder)`

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, { 'data-dir': { type: 'string' } })
  const dataDir = values['data-dir'] ?? defaultDataDir(ctx.env)
  const key = await loadOrCreateIdentity(dataDir)
  print(ctx.stdout, peerIdFromPrivateKey(key).toString())
  print(ctx.stderr, `identity: ${join(dataDir, identityFileName)}`)
  return 0
}
