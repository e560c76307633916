import { readFile } from 'node:fs/promises'
import { type CommandContext, print } from '../io.ts'

export const usage = 'Usage: garage version\n\nPrints the Garage version and the Node.js it runs on.'

export async function garageVersion(): Promise<string> {
  const pkg = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as {
    version: string
  }
  return pkg.version
}

export async function run(_argv: string[], ctx: CommandContext): Promise<number> {
  print(ctx.stdout, `garage ${await garageVersion()} (node ${process.version})`)
  return 0
}
