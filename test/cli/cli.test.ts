import type { ChildProcess } from 'node:child_process'
import { chmod, mkdtemp, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { garage, spawnBootstrap } from '../helpers/cli.ts'

describe('garage CLI', () => {
  let dir: string
  let authorityDir: string
  let authorityId: string
  const children: ChildProcess[] = []

  /** garage authority issue for region eu-north with this head, plus any options. */
  const issue = (head: string, ...options: string[]) =>
    garage(['authority', 'issue', '--dir', authorityDir, '--region', 'eu-north', '--head', head, ...options])

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'garage-cli-'))
    authorityDir = join(dir, 'authority')
  })
  afterAll(async () => {
    for (const c of children) if (c.exitCode == null) c.kill('SIGKILL')
    await rm(dir, { recursive: true, force: true })
  })

  it('prints help, and rejects unknown commands and bad options with the usage (exit 2)', async () => {
    const help = await garage(['--help'])
    expect(help.code).toBe(0)
    for (const c of ['id', 'authority', 'bootstrap', 'regions', 'devnet']) expect(help.stdout).toContain(c)
    const unknown = await garage(['fly'])
    expect(unknown.code).toBe(2)
    expect(unknown.stderr).toContain('unknown command "fly"')
    const missing = await garage(['authority', 'issue', '--dir', authorityDir])
    expect(missing.code).toBe(2)
    expect(missing.stderr).toContain('--region is required')
    expect(missing.stderr).toContain('Usage:')
    const badOption = await garage(['regions', '--frobnicate'])
    expect(badOption.code).toBe(2)
    expect((await garage(['version'])).stdout).toMatch(/^garage \d+\.\d+\.\d+ \(node v22\./)
  })

  it('creates the authority once, and refuses to overwrite it', async () => {
    const init = await garage(['authority', 'init', '--dir', authorityDir])
    expect(init.code).toBe(0)
    authorityId = init.stdout.trim()
    expect(authorityId).toMatch(/^12D3KooW/)
    expect((await stat(join(authorityDir, 'authority.key'))).mode & 0o777).toBe(0o600)
    const again = await garage(['authority', 'init', '--dir', authorityDir])
    expect(again.code).toBe(1)
    expect(again.stderr).toContain('already exists')
    expect((await garage(['authority', 'show', '--dir', authorityDir])).stdout.trim()).toBe(authorityId)
  })

  it('prints the identity, and refuses a key file others can read, saying how to fix it', async () => {
    const dataDir = join(dir, 'id-node')
    const id = await garage(['id', '--data-dir', dataDir])
    expect(id.code).toBe(0)
    expect((await garage(['id', '--data-dir', dataDir])).stdout).toBe(id.stdout)
    await chmod(join(dataDir, 'identity.key'), 0o640)
    const refused = await garage(['id', '--data-dir', dataDir])
    expect(refused.code).toBe(1)
    expect(refused.stderr).toContain(`chmod 600 '${join(dataDir, 'identity.key')}'`)
  })

  it('issues certificates and inspects them, naming what is wrong', async () => {
    const head = (await garage(['id', '--data-dir', join(dir, 'some-head')])).stdout.trim()
    const out = join(dir, 'eu-north.cert')
    const issued = await issue(
      head,
      '--addr',
      '/dns4/eu.example.net/tcp/4001',
      '--addr',
      '/dns4/eu.example.net/tcp/4002/ws',
      '--ttl',
      '30d',
      '--ray-trusted',
      '--out',
      out,
    )
    expect(issued.code, issued.stderr).toBe(0)
    const ok = await garage(['authority', 'inspect', out, '--authority', authorityId, '--json'])
    expect(ok.code).toBe(0)
    const cert = JSON.parse(ok.stdout)
    expect(cert).toMatchObject({
      valid: true,
      region: 'eu-north',
      head,
      rayTrusted: true,
      issuer: authorityId,
    })
    expect(cert.addrs).toHaveLength(2)
    expect(new Date(cert.expiresAt).getTime() - new Date(cert.notBefore).getTime()).toBe(30 * 86_400_000)

    const otherAuthority = (
      await garage(['authority', 'init', '--dir', join(dir, 'other-authority')])
    ).stdout.trim()
    const wrong = await garage(['authority', 'inspect', out, '--authority', otherAuthority])
    expect(wrong.code).toBe(1)
    expect(wrong.stdout).toContain('INVALID RegionCertificateWrongSignerError')
    const region = await garage([
      'authority',
      'inspect',
      out,
      '--authority',
      authorityId,
      '--region',
      'us-east',
      '--json',
    ])
    expect(JSON.parse(region.stdout).error).toBe('RegionCertificateWrongRegionError')

    const future = join(dir, 'future.cert')
    await issue(head, '--not-before', '2099-01-01T00:00:00Z', '--out', future)
    const early = await garage(['authority', 'inspect', future, '--authority', authorityId, '--json'])
    expect(JSON.parse(early.stdout).error).toBe('RegionCertificateNotYetValidError')

    const badTtl = await issue(head, '--ttl', 'forever')
    expect(badTtl.code).toBe(2)
    expect(badTtl.stderr).toContain('--ttl must be a duration')
    const badHead = await issue('nobody')
    expect(badHead.code).toBe(2)
    expect(badHead.stderr).toContain('is not a PeerId')
  })

  it('runs a bootstrap node: health, metrics, regions, clean stop on SIGTERM', async () => {
    const dataDir = join(dir, 'bootstrap-eu')
    const head = (await garage(['id', '--data-dir', dataDir])).stdout.trim()
    const cert = join(dir, 'bootstrap-eu.cert')
    await issue(head, '--ttl', '2d', '--out', cert)

    // a certificate for another head is refused at start
    const mismatch = await garage([
      'bootstrap',
      '--region',
      'eu-north',
      '--cert',
      cert,
      '--data-dir',
      join(dir, 'not-the-head'),
      '--listen',
      '/ip4/127.0.0.1/tcp/0',
      '--http',
      '127.0.0.1:0',
    ])
    expect(mismatch.code).toBe(1)
    expect(mismatch.stderr).toContain(`issue one with --head`)

    const running = await spawnBootstrap([
      '--region',
      'eu-north',
      '--cert',
      cert,
      '--authority',
      authorityId,
      '--data-dir',
      dataDir,
      '--listen',
      '/ip4/127.0.0.1/tcp/0',
      '--http',
      '127.0.0.1:0',
      '--allow-private',
    ])
    children.push(running.child)
    const field = running.field
    const address = field('address')
    const metricsUrl = field('metrics')
    expect(metricsUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/)

    const health = await fetch(metricsUrl.replace('/metrics', '/health'))
    expect(health.status).toBe(200)
    expect(await health.json()).toMatchObject({ status: 'ok', region: 'eu-north', peerId: head })

    const regions = await garage([
      'regions',
      '--json',
      '--allow-private',
      '--authority',
      authorityId,
      '--bootstrap',
      address,
    ])
    expect(regions.code, regions.stderr).toBe(0)
    const report = JSON.parse(regions.stdout)
    expect(report.chosen).toBe(head)
    expect(report.heads).toEqual([
      // A bootstrap node without a head says nothing of nodes.
      expect.objectContaining({
        region: 'eu-north',
        head,
        valid: true,
        reason: null,
        nodes: null,
        quarantined: null,
      }),
    ])
    expect(report.heads[0].rttMs).toBeGreaterThanOrEqual(0)

    const table = await garage(['regions', '--allow-private', '--bootstrap', address], {
      GARAGE_AUTHORITY: authorityId,
    })
    expect(table.stdout).toMatch(/^\*\s+eu-north\s+12D3KooW\S+\s+\d+ ms\s+\S+\s+-\s+valid$/m)
    const pinnedElsewhere = await garage([
      'regions',
      '--allow-private',
      '--authority',
      authorityId,
      '--bootstrap',
      address,
      '--region',
      'us-east',
      '--timeout',
      '2s',
    ])
    expect(pinnedElsewhere.code).toBe(1)

    const metrics = await (await fetch(metricsUrl)).text()
    for (const name of [
      'garage_bootstrap_connected_peers',
      'garage_bootstrap_routing_table_size',
      'garage_bootstrap_relay_reservations',
      'garage_bootstrap_certificate_expiry_seconds',
    ]) {
      expect(metrics).toMatch(new RegExp(`^${name} -?[\\d.e+]+$`, 'm'))
    }
    // prom-client's process metrics, prefixed once.
    expect(metrics).toMatch(/^garage_bootstrap_process_cpu_user_seconds_total /m)
    expect(metrics).not.toMatch(/process_process_/)
    const expiry = Number(/^garage_bootstrap_certificate_expiry_seconds (\S+)$/m.exec(metrics)![1])
    expect(expiry).toBeGreaterThan(2 * 86_400 - 600)
    expect(expiry).toBeLessThanOrEqual(2 * 86_400)
    expect((await fetch(metricsUrl, { method: 'POST' })).status).toBe(405)
    expect((await fetch(metricsUrl.replace('/metrics', '/nope'))).status).toBe(404)

    running.child.kill('SIGTERM')
    expect(await running.exited).toBe(0)
  })

  it('turns bad values into one clear line, never an internal error', async () => {
    const bogus = await garage([
      'regions',
      '--authority',
      'bogus',
      '--bootstrap',
      '/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRHB6MBRzE4ZrS4Cvo91fUsMQFcCsHPaQRyw9otbLwQVv',
    ])
    expect(bogus.code).toBe(2)
    expect(bogus.stderr).toContain('authority "bogus" is not a PeerId')
    const noPeer = await garage([
      'regions',
      '--authority',
      authorityId,
      '--bootstrap',
      '/ip4/127.0.0.1/tcp/4001',
    ])
    expect(noPeer.code).toBe(1)
    expect(noPeer.stderr).toContain('has no /p2p/<peer id>')
    const head = (await garage(['id', '--data-dir', join(dir, 'ttl-head')])).stdout.trim()
    const longTtl = await issue(head, '--ttl', '99999999d', '--out', join(dir, 'never.cert'))
    expect(longTtl.code).toBe(2)
    expect(longTtl.stderr).toContain('at most 730 days')
    const cert = join(dir, 'interval.cert')
    await issue(head, '--out', cert)
    const fast = await garage([
      'bootstrap',
      '--region',
      'eu-north',
      '--cert',
      cert,
      '--data-dir',
      join(dir, 'ttl-head'),
      '--listen',
      '/ip4/127.0.0.1/tcp/0',
      '--http',
      '127.0.0.1:0',
      '--announce-interval',
      '1s',
    ])
    expect(fast.code).toBe(1)
    expect(fast.stderr).toContain('announce interval must be between 10 s and 30 min')
    // The head's integrity options, checked before anything starts.
    for (const [args, message] of [
      [['--integrity-rate', '2'], '--integrity-rate must be a number from 0 to 1, not "2"'],
      [
        ['--trusted-engine', 'http://127.0.0.1:9'],
        '--trusted-engine and --trusted-engine-key-file go together',
      ],
      [
        ['--trusted-engine', 'http://127.0.0.1:9', '--trusted-engine-key-file', join(dir, 'none')],
        'is missing or empty',
      ],
    ] as const) {
      const r = await garage(['bootstrap', '--region', 'eu-north', '--cert', cert, ...args])
      expect(r.code, r.stderr).toBe(2)
      expect(r.stderr).toContain(message)
    }

    // garage node: what it needs, said in one line each
    const noAuthority = await garage(['node', '--bootstrap', '/ip4/127.0.0.1/tcp/1'])
    expect(noAuthority.code).toBe(2)
    expect(noAuthority.stderr).toContain('--authority (or GARAGE_AUTHORITY) is required')
    const noBootstrap = await garage(['node', '--authority', authorityId])
    expect(noBootstrap.code).toBe(2)
    expect(noBootstrap.stderr).toContain('--bootstrap (or GARAGE_BOOTSTRAP) is required')
    // The environment stands in for both flags (what the installers' config files set).
    const fromEnv = await garage(['federation', '--http', '127.0.0.1:nope'], {
      GARAGE_AUTHORITY: authorityId,
      GARAGE_BOOTSTRAP: '/ip4/127.0.0.1/tcp/1',
    })
    expect(fromEnv.code).toBe(2)
    expect(fromEnv.stderr).not.toContain('is required')
    expect(fromEnv.stderr).toContain('--http')
    const threads = await garage([
      'node',
      '--authority',
      authorityId,
      '--bootstrap',
      '/ip4/127.0.0.1/tcp/1',
      '--threads',
      '1.5',
    ])
    expect(threads.code).toBe(2)
    expect(threads.stderr).toContain('--threads must be a whole number')

    // garage bootstrap --policy: a broken policy names its field; another region's policy is refused
    const policyPath = join(dir, 'policy.json')
    await writeFile(
      policyPath,
      JSON.stringify({
        region: 'eu-north',
        models: [
          {
            name: 'm',
            engine: ['llamacpp'],
            source: { gguf: 'garage-tiny' },
            replicas: 0,
            minVramMiB: 0,
            minRamMiB: 1,
          },
        ],
      }),
    )
    const badPolicy = await garage([
      'bootstrap',
      '--region',
      'eu-north',
      '--cert',
      cert,
      '--data-dir',
      join(dir, 'ttl-head'),
      '--policy',
      policyPath,
    ])
    expect(badPolicy.code).toBe(1)
    expect(badPolicy.stderr).toContain('replicas')
    expect(badPolicy.stderr.trim().split('\n')).toHaveLength(1)
    await writeFile(
      policyPath,
      JSON.stringify({
        region: 'us-east',
        models: [
          {
            name: 'm',
            engine: ['llamacpp'],
            source: { gguf: 'garage-tiny' },
            replicas: 1,
            minVramMiB: 0,
            minRamMiB: 1,
          },
        ],
      }),
    )
    const otherRegion = await garage([
      'bootstrap',
      '--region',
      'eu-north',
      '--cert',
      cert,
      '--data-dir',
      join(dir, 'ttl-head'),
      '--policy',
      policyPath,
    ])
    expect(otherRegion.code).toBe(2)
    expect(otherRegion.stderr).toContain('is for region us-east, not eu-north')
  })
})
