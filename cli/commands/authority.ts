import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { GarageError } from '../../core/errors.ts'
import { defaultDataDir } from '../../core/paths.ts'
import { initAuthority, loadAuthority } from '../../mesh/authority.ts'
import {
  decodeRegionCertificate,
  issueRegionCertificate,
  type RegionCertificate,
  RegionCertificateError,
  verifyRegionCertificate,
} from '../../mesh/certificate.ts'
import { type CommandContext, parseDuration, parseOptions, print, UsageError } from '../io.ts'

export const usage = `Usage:
  garage authority init [--dir DIR]
  garage authority show [--dir DIR]
  garage authority issue --region NAME --head PEER_ID [--addr MULTIADDR]... [--ttl 30d]
                         [--not-before ISO_DATE] [--ray-trusted] [--out FILE] [--dir DIR]
  garage authority inspect FILE [--authority AUTHORITY_ID] [--region NAME] [--json]

The federation authority key signs region certificates; nodes pin its public id (--authority).
  init      creates the key (mode 0600) and prints the id to pin
  show      prints the id of an existing key
  issue     writes a signed certificate naming PEER_ID as the head of region NAME
            (default file: ./NAME.cert; addresses are the head's public multiaddrs)
  inspect   prints a certificate; with --authority, verifies it and exits 1 if invalid

Options:
  --dir DIR   where the authority key lives (default: <data dir>/authority)`

function authorityDir(dir: string | undefined, ctx: CommandContext): string {
  return dir ?? join(defaultDataDir(ctx.env), 'authority')
}

export function describeCertificate(cert: RegionCertificate): Record<string, unknown> {
  return {
    version: cert.version,
    region: cert.region,
    head: cert.head,
    addrs: cert.addrs,
    rayTrusted: cert.rayTrusted,
    notBefore: cert.notBefore.toISOString(),
    expiresAt: cert.expiresAt.toISOString(),
    issuer: cert.issuer,
  }
}

async function inspect(argv: string[], ctx: CommandContext): Promise<number> {
  const { values, positionals } = parseOptions(
    argv,
    { authority: { type: 'string' }, region: { type: 'string' }, json: { type: 'boolean', default: false } },
    true,
  )
  const file = positionals[0]
  if (file == null || positionals.length > 1) throw new UsageError('inspect takes one certificate file')
  const bytes = new Uint8Array(await readFile(file))
  let cert: RegionCertificate
  let status: { valid: boolean | null; error?: string; message?: string } = { valid: null }
  try {
    cert = decodeRegionCertificate(bytes)
  } catch (err) {
    if (!(err instanceof RegionCertificateError)) throw err
    throw new GarageError(`${file}: ${err.name}: ${err.message}`, err.code)
  }
  if (values.authority != null) {
    try {
      await verifyRegionCertificate(bytes, {
        authority: values.authority,
        ...(values.region != null ? { region: values.region } : {}),
      })
      status = { valid: true }
    } catch (err) {
      if (!(err instanceof RegionCertificateError)) throw err
      status = { valid: false, error: err.name, message: err.message }
    }
  }
  if (values.json) {
    print(ctx.stdout, JSON.stringify({ ...describeCertificate(cert), ...status }, null, 2))
  } else {
    const d = describeCertificate(cert)
    for (const [k, v] of Object.entries(d))
      print(ctx.stdout, `${k.padEnd(11)} ${Array.isArray(v) ? v.join(' ') || '-' : String(v)}`)
    if (status.valid === true) print(ctx.stdout, 'status      valid')
    if (status.valid === false) print(ctx.stdout, `status      INVALID ${status.error}: ${status.message}`)
  }
  return status.valid === false ? 1 : 0
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const [sub, ...rest] = argv
  switch (sub) {
    case 'init': {
      const { values } = parseOptions(rest, { dir: { type: 'string' } })
      const authority = await initAuthority(authorityDir(values.dir, ctx))
      print(ctx.stdout, authority.id)
      print(
        ctx.stderr,
        `authority key written to ${authority.path} (mode 0600); keep it offline and backed up.`,
      )
      print(ctx.stderr, `nodes pin this authority with --authority ${authority.id}`)
      return 0
    }
    case 'show': {
      const { values } = parseOptions(rest, { dir: { type: 'string' } })
      print(ctx.stdout, (await loadAuthority(authorityDir(values.dir, ctx))).id)
      return 0
    }
    case 'issue': {
      const { values } = parseOptions(rest, {
        region: { type: 'string' },
        head: { type: 'string' },
        addr: { type: 'string', multiple: true },
        ttl: { type: 'string', default: '30d' },
        'not-before': { type: 'string' },
        'ray-trusted': { type: 'boolean', default: false },
        out: { type: 'string' },
        dir: { type: 'string' },
      })
      if (values.region == null) throw new UsageError('--region is required')
      if (values.head == null)
        throw new UsageError('--head is required (the head\'s PeerId, from "garage id" on that machine)')
      let notBefore: Date | undefined
      if (values['not-before'] != null) {
        notBefore = new Date(values['not-before'])
        if (Number.isNaN(notBefore.getTime()))
          throw new UsageError(`--not-before ${values['not-before']} is not a date`)
      }
      const authority = await loadAuthority(authorityDir(values.dir, ctx))
      let bytes: Uint8Array
      try {
        bytes = await issueRegionCertificate(authority.key, {
          region: values.region,
          head: values.head,
          addrs: values.addr ?? [],
          rayTrusted: values['ray-trusted'],
          ttlMs: parseDuration(values.ttl, '--ttl'),
          ...(notBefore != null ? { notBefore } : {}),
        })
      } catch (err) {
        if (err instanceof RegionCertificateError) throw new UsageError(err.message)
        throw err
      }
      const out = values.out ?? `${values.region}.cert`
      await writeFile(out, bytes, { mode: 0o644 })
      const cert = decodeRegionCertificate(bytes)
      print(ctx.stdout, out)
      print(
        ctx.stderr,
        `certificate for region ${cert.region}, head ${cert.head}, valid ${cert.notBefore.toISOString()} to ${cert.expiresAt.toISOString()}`,
      )
      return 0
    }
    case 'inspect':
      return inspect(rest, ctx)
    default:
      throw new UsageError(sub == null ? 'missing subcommand' : `unknown subcommand ${JSON.stringify(sub)}`)
  }
}
