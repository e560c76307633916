import type { NodeSettings } from '../control/types.ts'
import { baseName, gameListFor, normalizeProcessName } from './games.ts'
import type { HostInput, HostProcess, HostVerdict } from './types.ts'

/** GPU utilisation above this, with no engine of ours running, means someone else uses the GPU. */
export const gpuBusyUtilizationPct = 30

/** A foreign compute context smaller than this (a video decoder, a browser) does not count. */
export const gpuAppMinMemoryMiB = 256

/** Once paused, the temperature rule clears only this far below the cap (no fan-noise cycling). */
export const temperatureResumeMarginC = 5

/** Desktop processes that hold a GPU context all day: never a reason to pause. */
export const desktopGpuProcesses: ReadonlySet<string> = new Set(
  [
    'Xorg',
    'Xwayland',
    'gnome-shell',
    'kwin_wayland',
    'kwin_x11',
    'plasmashell',
    'mutter',
    'sway',
    'Hyprland',
    'picom',
    'compiz',
    'cinnamon',
    'xfwm4',
    'dwm.exe',
    'explorer.exe',
    'csrss.exe',
    'nvcontainer.exe',
    'NVIDIA Share.exe',
    'NVIDIA Overlay.exe',
    'NVIDIA Web Helper.exe',
  ].map(normalizeProcessName),
)

export interface EvaluateOptions {
  /** The node is paused now: the temperature rule uses its resume margin. */
  paused?: boolean
}

/** Whether `now` (local time) falls in one of the schedule's windows; an empty schedule always does. */
export function inSchedule(schedule: NodeSettings['schedule'], now: Date): boolean {
  if (schedule.length === 0) return true
  const day = now.getDay()
  const hour = now.getHours()
  const yesterday = (day + 6) % 7
  return schedule.some(({ days, startHour, endHour }) => {
    if (startHour === endHour) return false // empty; the settings validation rejects it too
    if (startHour < endHour) return days.includes(day) && hour >= startHour && hour < endHour
    // Crosses midnight: a listed day names the evening the window opens.
    return (days.includes(day) && hour >= startHour) || (days.includes(yesterday) && hour < endHour)
  })
}

/** ourPids and every descendant: a container engine's workers are children of the pid we know. */
export function ourProcessTree(processes: readonly HostProcess[], ourPids: ReadonlySet<number>): Set<number> {
  const tree = new Set(ourPids)
  if (tree.size === 0) return tree
  const children = new Map<number, number[]>()
  for (const p of processes) {
    if (p.ppid == null) continue
    const list = children.get(p.ppid)
    if (list == null) children.set(p.ppid, [p.pid])
    else list.push(p.pid)
  }
  const queue = [...tree]
  for (let pid = queue.pop(); pid != null; pid = queue.pop()) {
    for (const child of children.get(pid) ?? []) {
      if (!tree.has(child)) {
        tree.add(child)
        queue.push(child)
      }
    }
  }
  return tree
}

/**
 * The host rules (docs/host-policies.md): pure, so the monitor and the tests share them. Reasons
 * come in a fixed order: game, gpu-busy, battery, schedule, temperature, not-idle.
 */
export function evaluateHost(
  input: HostInput,
  settings: NodeSettings,
  now: Date,
  options: EvaluateOptions = {},
): HostVerdict {
  const reasons: string[] = []
  const push = (reason: string): void => {
    if (!reasons.includes(reason)) reasons.push(reason)
  }
  const ours = ourProcessTree(input.processes, input.ourPids)

  const games = gameListFor(settings.games)
  const gamePids = new Set<number>()
  for (const p of input.processes) {
    if (ours.has(p.pid)) continue
    const game = games.match(p)
    if (game == null) continue
    gamePids.add(p.pid)
    push(`game: ${game}`)
  }

  for (const app of input.gpuApps) {
    if (ours.has(app.pid) || gamePids.has(app.pid)) continue
    const name = baseName(app.name).trim()
    if (desktopGpuProcesses.has(normalizeProcessName(name))) continue
    if (app.usedMemoryMiB != null && app.usedMemoryMiB < gpuAppMinMemoryMiB) continue
    push(`gpu-busy: ${name === '' || name.startsWith('[') ? `pid ${app.pid}` : name}`)
  }
  const util = input.gpu?.utilizationPct
  // While an engine of ours runs the utilisation may be its own: nvidia-smi's query does not split it.
  if (util != null && util > gpuBusyUtilizationPct && input.ourPids.size === 0) {
    push(`gpu-busy: ${Math.round(util)}% utilization`)
  }

  if (settings.pauseOnBattery && input.onBattery === true) push('battery')

  if (!inSchedule(settings.schedule, now)) push('schedule')

  const temp = input.gpu?.temperatureC
  const cap = settings.maxGpuTemperatureC
  if (temp != null && cap != null) {
    const limit = options.paused === true ? cap - temperatureResumeMarginC : cap
    if (temp > limit) push(`temperature: ${Math.round(temp)} °C`)
  }

  if (settings.idleOnlyMinutes != null) {
    if (input.idleSeconds == null) push('not-idle: idle time unknown')
    else if (input.idleSeconds < settings.idleOnlyMinutes * 60) push('not-idle')
  }

  return { pause: reasons.length > 0, reasons }
}
