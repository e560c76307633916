import { type ChildProcess, spawn } from 'node:child_process'
import { readFile, symlink } from 'node:fs/promises'
import { join } from 'node:path'
import { ControlClient, type ControlEvent } from '../daemon/control/client.ts'
import { type BenchCluster, startBenchCluster } from './cluster.ts'
import { percentile, progress, table, writeResult } from './report.ts'

/**
 * What a volunteer's node costs its PC when it serves nothing, and how fast it gets out of a game's
 * way: the `garage node` process alone (its engine, a process of its own, excluded), and the time
 * from a game's process starting to the node's engine having let go of the model.
 */
const idleSeconds = 60
const gameStarts = 10
const clockTicks = 100

async function cpuSeconds(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8')
  // Fields after the command name (which may hold spaces) start at ")"; utime and stime are 14 and 15.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / clockTicks
}

async function rssMb(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8')
  const kb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? Number.NaN)
  return kb / 1024
}

export async function run(): Promise<Record<string, unknown>> {
  let cluster: BenchCluster | undefined
  const games: ChildProcess[] = []
  try {
    cluster = await startBenchCluster({ parallel: 2, contextLength: 256, federation: false })
    const pid = cluster.node.pid
    progress(`node daemon pid ${pid}: settling, then measuring ${idleSeconds} s of idle`)
    await new Promise((r) => setTimeout(r, 5_000))
    const rss: number[] = []
    const cpu0 = await cpuSeconds(pid)
    const t0 = performance.now()
    for (let s = 0; s < idleSeconds; s += 5) {
      rss.push(await rssMb(pid))
      await new Promise((r) => setTimeout(r, 5_000))
    }
    const idleCpu = ((await cpuSeconds(pid)) - cpu0) / ((performance.now() - t0) / 1000)
    rss.push(await rssMb(pid))
    progress(`idle: rss ${Math.max(...rss).toFixed(1)} MB, cpu ${(idleCpu * 100).toFixed(2)} %`)

    // Game starts: a process named like a listed game; the node reports paused with no engine.
    const control = await ControlClient.connect(cluster.node.dataDir)
    await control.updateSettings({ resumeAfterSeconds: 1 })
    const exe = join(cluster.node.dataDir, 'FortniteClient-Win64-Shipping')
    await symlink('/bin/sleep', exe)
    const times: number[] = []
    for (let i = 0; i < gameStarts; i++) {
      const watcher = new AbortController()
      const events = control.events({ signal: watcher.signal })
      // One iterator for the whole round: `for await ... break` would close it.
      const until = async (test: (e: ControlEvent) => boolean): Promise<void> => {
        for (;;) {
          const next = await events.next()
          if (next.done === true) throw new Error('the control API closed its event stream')
          if (test(next.value)) return
        }
      }
      // Start the clock on a serving node with its engine up (the first event is the state at connect).
      await until((e) => e.type === 'state' && e.status.state === 'serving' && e.status.engine?.url != null)
      const started = performance.now()
      const game = spawn(exe, ['600'], { stdio: 'ignore' })
      games.push(game)
      await until((e) => e.type === 'state' && e.status.state === 'paused' && e.status.engine?.url == null)
      times.push(performance.now() - started)
      game.kill('SIGKILL')
      await until((e) => e.type === 'state' && e.status.state === 'serving')
      watcher.abort()
      progress(
        `game ${i + 1}/${gameStarts}: model released ${times.at(-1)!.toFixed(0)} ms after the game started`,
      )
    }
    const result = {
      idle_seconds: idleSeconds,
      idle_rss_mb: Number(Math.max(...rss).toFixed(1)),
      idle_cpu_percent: Number((idleCpu * 100).toFixed(2)),
      pause_to_gpu_free_ms_p50: Math.round(percentile(times, 50)),
      pause_to_gpu_free_ms_max: Math.round(Math.max(...times)),
      note: 'no GPU here: "GPU free" is the engine process having exited with its model',
      goal: { idle_rss_mb: '<= 150', idle_cpu_percent: '<= 1', pause_to_gpu_free_ms_p50: '<= 2000' },
      goal_met: false,
    }
    result.goal_met =
      result.idle_rss_mb <= 150 && result.idle_cpu_percent <= 1 && result.pause_to_gpu_free_ms_p50 <= 2000
    const path = await writeResult('footprint', result)
    process.stdout.write(
      `\nfootprint: an idle joined node daemon (engine excluded), and game start → model released\n${table([
        ['idle_rss_mb (max)', String(result.idle_rss_mb), '<= 150'],
        ['idle_cpu_percent', String(result.idle_cpu_percent), '<= 1'],
        ['pause_to_gpu_free_ms_p50', String(result.pause_to_gpu_free_ms_p50), '<= 2000'],
        ['pause_to_gpu_free_ms_max', String(result.pause_to_gpu_free_ms_max), ''],
      ])}\n${result.goal_met ? 'goal met' : 'GOAL MISSED'}; written to ${path}\n`,
    )
    return result
  } finally {
    for (const g of games) g.kill('SIGKILL')
    await cluster?.stop()
  }
}
