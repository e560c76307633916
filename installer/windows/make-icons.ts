import { writeFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { drawIcon, encodePng } from '../../tray-app/assets/make-icons.ts'

/**
 * The packaged app's icons: the tray's "serving" disc (tray-app/assets/make-icons.ts) drawn at
 * the sizes electron-builder needs: 256 px for Windows (its .ico tops out there) and 512 px for
 * macOS (the least it takes for an .icns) and Linux. Run `node installer/windows/make-icons.ts`
 * after changing the tray's design; the PNGs are committed and a test compares them with this.
 */
export const appIcons = [
  { file: fileURLToPath(new URL('icon.png', import.meta.url)), size: 256 },
  { file: fileURLToPath(new URL('../macos/icon.png', import.meta.url)), size: 512 },
] as const

export function appIconPng(size: number): Buffer {
  return encodePng(size, size, drawIcon('serving', size))
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  for (const { file, size } of appIcons) {
    await writeFile(file, appIconPng(size))
    console.log(file)
  }
}
