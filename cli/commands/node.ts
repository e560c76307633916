import { createLogger, LogTail } from '../../core/logger.ts'
import { defaultDataDir } from '../../core/paths.ts'
import { startControlServer } from '../../daemon/control/server.ts'
import { loadSettings, saveSettings } from '../../daemon/control/settings.ts'
import { defaultDrainGraceMs, NodeDaemon } from '../../daemon/node-daemon.ts'
import {
  authorityOption,
  bootstrapOption,
  type CommandContext,
  parseDuration,
  parseHostPort,
  parseOptions,
  print,
  splitList,
  UsageError,
} from '../io.ts'
import { garageVersion } from './version.ts'

export const usage = `Usage: garage node --authority ID --bootstrap MULTIADDR [options]

Runs a Garage node: probes the machine, finds its regional head through the DHT (certificates
checked against the pinned authority), joins with a signed capability report, starts the engine
the head assigns, reports telemetry every 2 s and serves requests that reach it over the mesh
(/garage/infer/1.0.0, from its head only: this machine opens no port). SIGINT or SIGTERM drain
(no new requests; in-flight ones finish within the grace period), leave the region and stop.

Options:
  --authority ID            the federation authority's id to trust (required; default: $GARAGE_AUTHORITY)
  --bootstrap MULTIADDR     a bootstrap node, repeatable (required; default: $GARAGE_BOOTSTRAP)
  --region NAME             join this region instead of the nearest
  --listen MULTIADDR        listen address, repeatable (default: TCP and WebSockets, random ports)
  --vram-cap MIB            the most GPU memory Garage may use (default: 90% of the largest GPU)
  --ram-cap MIB             the most RAM a CPU model may use (default: 75% of RAM)
  --threads N               CPU threads of the embedded engine (default: all cores but one)
  --max-tokens-per-second N cap each sequence's speed (a volunteer's limit)
  --drain-grace D           how long in-flight requests may finish on stop (default: ${defaultDrainGraceMs / 1000}s)
  --vllm-image IMAGE        the vLLM image to run for a vllm assignment (default: the pinned
                            vllm/vllm-openai build for this NVIDIA driver)
  --ray                     agree to join the region's trusted Ray cluster when it runs one
  --ray-node-ip ADDRESS     the address the region's Ray head reaches this machine at (LAN or VPN)
  --control HOST:PORT       the local control API and dashboard (default: 127.0.0.1, a random port;
                            the URL is in <data dir>/control.json, the token in control.token)
  --control-allow-remote    let --control bind a non-loopback address (anyone who can reach it and
                            holds the token can pause the node and read its logs)
  --no-host-policies        do not pause for games, battery, schedule or temperature
  --allow-private           dial private and loopback addresses (LAN, devnet, tests)
  --data-dir DIR            identity, models and state (default: $GARAGE_DATA_DIR or the OS's data folder)`

function positive(text: string | undefined, what: string): number | undefined {
  if (text == null) return undefined
  const n = Number(text)
  if (!Number.isFinite(n) || n <= 0) throw new UsageError(`${what} must be a positive number`)
  return n
}

export async function run(argv: string[], ctx: CommandContext): Promise<number> {
  const { values } = parseOptions(argv, {
    authority: { type: 'string' },
    bootstrap: { type: 'string', multiple: true },
    region: { type: 'string' },
    listen: { type: 'string', multiple: true },
    'vram-cap': { type: 'string' },
    'ram-cap': { type: 'string' },
    threads: { type: 'string' },
    'max-tokens-per-second': { type: 'string' },
    'drain-grace': { type: 'string' },
    ray: { type: 'boolean', default: false },
    'ray-node-ip': { type: 'string' },
    'vllm-image': { type: 'string' },
    'allow-private': { type: 'boolean', default: false },
    control: { type: 'string' },
    'control-allow-remote': { type: 'boolean', default: false },
    'no-host-policies': { type: 'boolean', default: false },
    'data-dir': { type: 'string' },
  })
  const authority = authorityOption(values.authority, ctx.env)
  const bootstrap = bootstrapOption(values.bootstrap, ctx.env)
  const threads = positive(values.threads, '--threads')
  if (threads != null && !Number.isInteger(threads)) throw new UsageError('--threads must be a whole number')
  const listen = splitList(values.listen)
  const vramCapMiB = positive(values['vram-cap'], '--vram-cap')
  const ramCapMiB = positive(values['ram-cap'], '--ram-cap')
  const maxTokensPerSecond = positive(values['max-tokens-per-second'], '--max-tokens-per-second')
  const control =
    values.control != null ? parseHostPort(values.control, '--control') : { host: '127.0.0.1', port: 0 }
  const dataDir = values['data-dir'] ?? defaultDataDir(ctx.env)
  const logTail = new LogTail()
  const logger = createLogger('garage', 'info', logTail)
  const daemon = new NodeDaemon({
    dataDir,
    settings: await loadSettings(dataDir),
    saveSettings: (s) => saveSettings(dataDir, s),
    logTail,
    hostPolicies: !values['no-host-policies'],
    authority,
    bootstrap,
    ...(values.region != null ? { region: values.region } : {}),
    ...(listen.length > 0 ? { listen } : {}),
    allowPrivateAddresses: values['allow-private'],
    ...(vramCapMiB != null ? { vramCapMiB } : {}),
    ...(ramCapMiB != null ? { ramCapMiB } : {}),
    ...(threads != null ? { threads } : {}),
    ...(maxTokensPerSecond != null ? { maxTokensPerSecond } : {}),
    drainGraceMs:
      values['drain-grace'] != null
        ? parseDuration(values['drain-grace'], '--drain-grace')
        : defaultDrainGraceMs,
    rayOptIn: values.ray,
    ...(values['vllm-image'] != null ? { vllmImage: values['vllm-image'] } : {}),
    ...(values['ray-node-ip'] != null ? { rayNodeIpAddress: values['ray-node-ip'] } : {}),
    daemonVersion: await garageVersion(),
    logger,
  })
  // The control API comes up first: the tray app and `garage status` can watch the start.
  const server = await startControlServer(daemon, {
    dataDir,
    host: control.host,
    port: control.port,
    allowRemote: values['control-allow-remote'],
    logger,
  })
  if (server.warning != null) print(ctx.stderr, `warning: ${server.warning}`)
  print(ctx.stderr, 'starting node: probing hardware, finding a region')
  // While its region cannot be reached the node waits and tries again, saying why; Ctrl-C ends that.
  let waitingFor: string | null = null
  const onState = (evt: CustomEvent<{ state: string; reason: string | null }>): void => {
    const { state, reason } = evt.detail
    if (state === 'starting' && reason != null && reason !== waitingFor)
      print(ctx.stderr, `waiting: ${reason}`)
    waitingFor = reason
  }
  daemon.addEventListener('state', onState)
  const stopStarting = (): void => void daemon.stop()
  ctx.shutdown.addEventListener('abort', stopStarting, { once: true })
  try {
    await daemon.start()
  } catch (err) {
    await server.close()
    if (ctx.shutdown.aborted) return 0
    throw err
  } finally {
    daemon.removeEventListener('state', onState)
    ctx.shutdown.removeEventListener('abort', stopStarting)
  }
  const info = daemon.info()
  print(ctx.stdout, 'node serving')
  print(ctx.stdout, `  peer id  ${info.peerId}`)
  print(
    ctx.stdout,
    `  region   ${info.region} (head ${info.head}${info.rttMs != null ? `, ${info.rttMs} ms` : ''})`,
  )
  print(ctx.stdout, `  model    ${info.model}`)
  const engine = daemon.status().engine
  print(ctx.stdout, `  engine   ${info.engineUrl} (${engine?.kind ?? 'engine'}, loopback only)`)
  for (const f of engine?.failed ?? []) print(ctx.stdout, `  note     ${f.engine} failed here: ${f.reason}`)
  print(ctx.stdout, `  control  ${server.url}/ (dashboard; token in ${server.tokenPath})`)
  await new Promise<void>((resolve) => {
    if (ctx.shutdown.aborted) resolve()
    ctx.shutdown.addEventListener('abort', () => resolve(), { once: true })
  })
  print(ctx.stderr, 'draining: finishing in-flight requests, then leaving the region')
  await daemon.stop()
  await server.close()
  return 0
}
