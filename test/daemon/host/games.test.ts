import { readFile } from 'node:fs/promises'
import { describe, expect, it } from 'vitest'
import { defaultGames, GameList, normalizeProcessName } from '../../../daemon/host/games.ts'

const proc = (name: string, commandLine?: string) => ({
  pid: 1,
  name,
  ...(commandLine != null ? { commandLine } : {}),
})

describe('game list', () => {
  const list = new GameList()

  it('matches case-insensitively, with .exe optional, Windows paths reduced to the file name', () => {
    expect(list.match(proc('Cyberpunk2077.exe'))).toBe('Cyberpunk2077.exe')
    expect(list.match(proc('Cyberpunk2077'))).toBe('Cyberpunk2077')
    expect(list.match(proc('cyberpunk2077.EXE'))).toBe('cyberpunk2077.EXE')
    expect(list.match(proc('C:\\Games\\Cyberpunk 2077\\bin\\x64\\Cyberpunk2077.exe'))).toBe(
      'Cyberpunk2077.exe',
    )
    expect(list.match(proc('cs2'))).toBe('cs2')
    expect(normalizeProcessName('/usr/lib/xorg/Xorg')).toBe('xorg')
  })

  it('does not take a launcher left open for a game', () => {
    for (const launcher of [
      'steam',
      'steam.exe',
      'steamwebhelper',
      'EpicGamesLauncher.exe',
      'Battle.net.exe',
      'EADesktop.exe',
      'GalaxyClient.exe',
      'RiotClientServices.exe',
      'LeagueClient.exe',
    ]) {
      expect(list.match(proc(launcher)), launcher).toBeNull()
    }
  })

  it('takes Steam reaper as a game only with SteamLaunch, and names the app id', () => {
    expect(list.match(proc('reaper'))).toBeNull()
    expect(list.match(proc('reaper', '/usr/bin/reaper -nosplash'))).toBeNull()
    expect(
      list.match(
        proc(
          'reaper',
          '/home/u/.steam/steam/ubuntu12_32/reaper SteamLaunch AppId=1091500 -- /proton waitforexitandrun',
        ),
      ),
    ).toBe('Steam game (AppId=1091500)')
    expect(list.needsCommandLine('reaper')).toBe(true)
    expect(list.needsCommandLine('bash')).toBe(false)
  })

  it('matches a Linux comm truncated to 15 characters, with or without the .exe', () => {
    expect(list.match(proc('FortniteClient-'))).toBe('FortniteClient-')
    // Proton: comm is the Windows exe name, cut inside its ".exe".
    expect(list.match(proc('HogwartsLegacy.'))).toBe('HogwartsLegacy.')
    expect(list.match(proc('Cyberpunk2077.e'))).toBe('Cyberpunk2077.e')
    expect(list.match(proc('FortniteClient'))).toBeNull()
    expect(list.match(proc('systemd-journal'))).toBeNull()
  })

  it("adds the user's games to the defaults, same matching rules", () => {
    const mine = new GameList([
      'MyIndieGame.exe',
      'factorio-headless',
      '  ',
      'ASuperLongGameNameForTruncation',
    ])
    expect(mine.match(proc('myindiegame'))).toBe('myindiegame')
    expect(mine.match(proc('Factorio-Headless.exe'))).toBe('Factorio-Headless.exe')
    expect(mine.match(proc('ASuperLongGameN'))).toBe('ASuperLongGameN')
    expect(mine.match(proc('Cyberpunk2077.exe'))).toBe('Cyberpunk2077.exe')
    expect(new GameList().match(proc('MyIndieGame.exe'))).toBeNull()
  })

  it('docs/host-policies.md lists every default name', async () => {
    const doc = await readFile(new URL('../../../docs/host-policies.md', import.meta.url), 'utf8')
    const missing = defaultGames.map((g) => g.name).filter((n) => !doc.includes(`\`${n}\``))
    expect(missing).toEqual([])
  })
})
