import { homedir } from 'node:os'
import { join } from 'node:path'

/** Where Garage keeps its keys and state: --data-dir, then GARAGE_DATA_DIR, then the OS's place. */
export function defaultDataDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.GARAGE_DATA_DIR != null && env.GARAGE_DATA_DIR !== '') return env.GARAGE_DATA_DIR
  if (process.platform === 'win32')
    return join(env.APPDATA ?? join(homedir(), 'AppData', 'Roaming'), 'Garage')
  if (process.platform === 'darwin') return join(homedir(), 'Library', 'Application Support', 'Garage')
  return join(env.XDG_DATA_HOME ?? join(homedir(), '.local', 'share'), 'garage')
}
