/**
 * How the long-running node daemon should be started by whatever launches it (the tray app, the
 * service units, benchmarks). V8 sizes its young generation for throughput by default (16 MB semi-
 * spaces); the daemon idles almost all the time, and 2 MB keeps an idle node near 130 MB of RSS
 * instead of 165 (bench/footprint.ts measures both ways).
 */
export const daemonNodeOptions = '--max-semi-space-size=2'

/** NODE_OPTIONS for a `garage node` child: the daemon's options after any the user set. */
export function daemonEnv(env: NodeJS.ProcessEnv = process.env): { NODE_OPTIONS: string } {
  const own = env.NODE_OPTIONS?.trim()
  return { NODE_OPTIONS: own != null && own !== '' ? `${own} ${daemonNodeOptions}` : daemonNodeOptions }
}
