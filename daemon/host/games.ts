import type { HostProcess } from './types.ts'

/** Linux truncates a process's `comm` to 15 characters (TASK_COMM_LEN 16, with the NUL). */
export const linuxCommMaxChars = 15

/**
 * A process that means "a game is running or starting". Launchers alone (Steam, Epic, Battle.net,
 * EA app, Ubisoft Connect, GOG Galaxy) are not listed: people leave them open all day.
 */
export interface GameSignature {
  /** Process name: case-insensitive, `.exe` optional, Windows or Linux. */
  name: string
  /** What the process is: a game, a process Steam runs only while one of its games runs, ... */
  kind: 'game' | 'steam-game' | 'game-session' | 'anti-cheat'
  /** Only when the command line holds this too: for generic names (Cockos REAPER is also `reaper`). */
  commandLineIncludes?: string
  /** What the pause reason names instead of the process name. */
  label?: string
}

const games = (kind: GameSignature['kind'], names: string[]): GameSignature[] =>
  names.map((name) => ({ name, kind }))

/** The built-in list; NodeSettings.games adds to it. docs/host-policies.md lists the same names. */
export const defaultGames: readonly GameSignature[] = Object.freeze([
  // Steam starts every game under `reaper SteamLaunch AppId=N -- ...` on Linux: present from the first
  // second of a launch (Proton's warm-up included) until the game exits.
  { name: 'reaper', kind: 'steam-game', commandLineIncludes: 'SteamLaunch', label: 'Steam game' },
  // Steam's in-game overlay process runs beside each game that has the overlay (Windows and Linux).
  { name: 'GameOverlayUI.exe', kind: 'steam-game' },
  // Valve's game-session compositor: run per game (`gamescope -- %command%`) on a desktop.
  { name: 'gamescope', kind: 'game-session' },
  // These anti-cheat services are started by a protected game before its window and stop with it.
  ...games('anti-cheat', [
    'EasyAntiCheat.exe',
    'EasyAntiCheat_EOS.exe',
    'BEService.exe',
    'BEService_x64.exe',
  ]),
  ...games('game', [
    'AlanWake2.exe',
    'Among Us.exe',
    'ACValhalla.exe',
    'arma3_x64.exe',
    'b1-Win64-Shipping.exe',
    'bf2042.exe',
    'bg3.exe',
    'bg3_dx11.exe',
    'BlackOpsColdWar.exe',
    'Cities2.exe',
    'CivilizationVI.exe',
    'CivilizationVI_DX12.exe',
    'cod.exe',
    'cs2.exe',
    'csgo.exe',
    'Cyberpunk2077.exe',
    'D2R.exe',
    'DarkSoulsIII.exe',
    'DeadByDaylight-Win64-Shipping.exe',
    'deadlock.exe',
    'destiny2.exe',
    'Diablo IV.exe',
    'DOOMEternalx64vk.exe',
    'dota2.exe',
    'eldenring.exe',
    'EscapeFromTarkov.exe',
    'factorio.exe',
    'FactoryGame-Win64-Shipping.exe',
    'FactoryGameSteam-Win64-Shipping.exe',
    'Fallout4.exe',
    'FallGuys_client_game.exe',
    'FC24.exe',
    'FC25.exe',
    'ffxiv_dx11.exe',
    'FortniteClient-Win64-Shipping.exe',
    'ForzaHorizon5.exe',
    'GenshinImpact.exe',
    'gmod.exe',
    'GTA5.exe',
    'GTA5_Enhanced.exe',
    'Hades.exe',
    'Hades2.exe',
    'HaloInfinite.exe',
    'Hearthstone.exe',
    'helldivers2.exe',
    'hl2.exe',
    'hl2_linux',
    'HogwartsLegacy.exe',
    'League of Legends.exe',
    'Lethal Company.exe',
    'LOSTARK.exe',
    'Marvel-Win64-Shipping.exe',
    'Minecraft.Windows.exe',
    'ModernWarfare.exe',
    'MonsterHunterWilds.exe',
    'MonsterHunterWorld.exe',
    'NMS.exe',
    'osu!.exe',
    'Overwatch.exe',
    'Palworld-Win64-Shipping.exe',
    'PathOfExile.exe',
    'PathOfExile_x64.exe',
    'PathOfExileSteam.exe',
    'PathOfExile_x64Steam.exe',
    'Phasmophobia.exe',
    'r5apex.exe',
    'r5apex_dx12.exe',
    'RainbowSix.exe',
    'RainbowSix_Vulkan.exe',
    'RDR2.exe',
    'ReadyOrNot-Win64-Shipping.exe',
    'RobloxPlayerBeta.exe',
    'RocketLeague.exe',
    'RustClient.exe',
    'SC2_x64.exe',
    'sekiro.exe',
    'SkyrimSE.exe',
    'SoTGame.exe',
    'StarCitizen.exe',
    'Stardew Valley.exe',
    'StardewValley',
    'Starfield.exe',
    'StarRail.exe',
    'supertuxkart',
    'Terraria.exe',
    'Terraria.bin.x86_64',
    'tf_linux64',
    'tf_win64.exe',
    'Titanfall2.exe',
    'TS4_x64.exe',
    'TslGame.exe',
    'VALORANT-Win64-Shipping.exe',
    'valheim.exe',
    'valheim.x86_64',
    'Warframe.x64.exe',
    'Warhammer3.exe',
    'witcher3.exe',
    'Wow.exe',
    'WowClassic.exe',
    'YuanShen.exe',
    'ZenlessZoneZero.exe',
  ]),
])

/** The executable's base name, lower case, without `.exe`: `C:\Games\Foo.EXE` and `foo` are one name. */
export function normalizeProcessName(name: string): string {
  const lower = baseName(name).trim().toLowerCase()
  return lower.endsWith('.exe') ? lower.slice(0, -4) : lower
}

/** Splits on both separators: nvidia-smi and Wine print Windows paths, even on Linux. */
export function baseName(path: string): string {
  const i = Math.max(path.lastIndexOf('/'), path.lastIndexOf('\\'))
  return i < 0 ? path : path.slice(i + 1)
}

/** Matches processes against the default list plus the user's names. */
export class GameList {
  private readonly exact = new Map<string, GameSignature[]>()
  private readonly truncated = new Map<string, GameSignature[]>()
  /** Normalized names whose signatures read the command line (the sampler fetches it only for these). */
  readonly commandLineNames: ReadonlySet<string>

  constructor(userGames: readonly string[] = [], defaults: readonly GameSignature[] = defaultGames) {
    const all: GameSignature[] = [
      ...defaults,
      ...userGames
        .filter((n) => n.trim() !== '')
        .map((name) => ({ name: name.trim(), kind: 'game' as const })),
    ]
    const needArgs = new Set<string>()
    for (const sig of all) {
      const n = normalizeProcessName(sig.name)
      add(this.exact, n, sig)
      if (sig.commandLineIncludes != null) needArgs.add(n)
      // A 15-char Linux comm is the first 15 chars of the real name, with or without its `.exe`.
      for (const full of [n, `${n}.exe`]) {
        if (full.length > linuxCommMaxChars) add(this.truncated, full.slice(0, linuxCommMaxChars), sig)
      }
    }
    this.commandLineNames = needArgs
  }

  /** The label a pause reason names (`game: <label>`), or null when the process is not a game. */
  match(process: HostProcess): string | null {
    const base = baseName(process.name).trim()
    const n = normalizeProcessName(base)
    for (const sig of this.exact.get(n) ?? []) {
      if (accepts(sig, process)) return label(sig, process, base)
    }
    if (base.length === linuxCommMaxChars) {
      for (const sig of this.truncated.get(base.toLowerCase()) ?? []) {
        if (accepts(sig, process)) return label(sig, process, base)
      }
    }
    return null
  }

  /** Whether the sampler should read this process's command line (a signature needs it). */
  needsCommandLine(name: string): boolean {
    return this.commandLineNames.has(normalizeProcessName(name))
  }
}

function add(map: Map<string, GameSignature[]>, key: string, sig: GameSignature): void {
  const list = map.get(key)
  if (list == null) map.set(key, [sig])
  else list.push(sig)
}

function accepts(sig: GameSignature, process: HostProcess): boolean {
  return sig.commandLineIncludes == null || (process.commandLine ?? '').includes(sig.commandLineIncludes)
}

function label(sig: GameSignature, process: HostProcess, base: string): string {
  if (sig.label == null) return base
  const appId = /\bAppId=(\d+)/.exec(process.commandLine ?? '')?.[1]
  return appId == null ? sig.label : `${sig.label} (AppId=${appId})`
}

let cached: { key: string; list: GameList } | null = null

/** Reuses the last GameList while settings.games is unchanged: the monitor evaluates twice a second. */
export function gameListFor(userGames: readonly string[]): GameList {
  const key = userGames.join('\n')
  if (cached?.key !== key) cached = { key, list: new GameList(userGames) }
  return cached.list
}
