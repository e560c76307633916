import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { parseRocmSmi } from '../../../daemon/hardware/amd.ts'
import { kvCacheMiB, loadCatalog, requiredVramMiB } from '../../../daemon/hardware/catalog.ts'
import { cdiSpecDirs, cdiSpecDirsOf, containersConfFiles } from '../../../daemon/hardware/containers.ts'
import { parseNvidiaComputeApps, parseNvidiaGpus } from '../../../daemon/hardware/nvidia.ts'
import { isWsl2, parseOsRelease } from '../../../daemon/hardware/system.ts'

describe('nvidia-smi parsing', () => {
  it('reads [N/A] and [Not Supported] as unknown, not zero', () => {
    const [g] = parseNvidiaGpus(
      '0, GPU-1, NVIDIA GeForce GTX 1650, 4096, [N/A], [Not Supported], 50, [N/A], [N/A], 470.256.02, 7.5\n',
    )
    expect(g).toMatchObject({
      vramTotalMiB: 4096,
      vramUsedMiB: null,
      utilizationPct: null,
      powerDrawW: null,
      computeCapability: '7.5',
    })
  })

  it('refuses a line with missing fields instead of guessing', () => {
    expect(() => parseNvidiaGpus('0, GPU-1, NVIDIA GeForce RTX 4090, 24564\n')).toThrow(
      /unexpected nvidia-smi line/,
    )
  })

  it('reads compute apps, including paths with commas and unknown memory (WDDM)', () => {
    expect(
      parseNvidiaComputeApps(
        '4242, C:\\Games\\Cyberpunk 2077\\bin\\x64\\Cyberpunk2077.exe, [N/A]\n77, /opt/a,b/game, 3000\n',
      ),
    ).toEqual([
      {
        pid: 4242,
        processName: 'C:\\Games\\Cyberpunk 2077\\bin\\x64\\Cyberpunk2077.exe',
        usedMemoryMiB: null,
      },
      { pid: 77, processName: '/opt/a,b/game', usedMemoryMiB: 3000 },
    ])
    expect(parseNvidiaComputeApps('No devices were found\n')).toEqual([])
  })
})

describe('rocm-smi parsing', () => {
  it('lists cards in order and ignores the system block', () => {
    const gpus = parseRocmSmi(
      JSON.stringify({
        card1: { 'Card series': 'Radeon RX 6600', 'VRAM Total Memory (B)': '8573157376' },
        card0: {
          'Card series': 'Radeon RX 7800 XT',
          'VRAM Total Memory (B)': '17163091968',
          'GPU use (%)': 'N/A',
        },
        system: { 'Driver version': '6.7.0' },
      }),
    )
    expect(gpus.map((g) => [g.index, g.name, g.vramTotalMiB, g.utilizationPct, g.driverVersion])).toEqual([
      [0, 'Radeon RX 7800 XT', 16368, null, '6.7.0'],
      [1, 'Radeon RX 6600', 8176, null, '6.7.0'],
    ])
  })

  it('throws on output that is not JSON (the probe reports it as an error)', () => {
    expect(() => parseRocmSmi('ERROR: GPU[0] : Unable to read VRAM')).toThrow()
  })
})

describe('system detection', () => {
  it('recognises WSL2 kernels and reads os-release', () => {
    expect(isWsl2('5.15.167.4-microsoft-standard-WSL2', {})).toBe(true)
    expect(isWsl2('6.8.0-45-generic', { WSL_DISTRO_NAME: 'Ubuntu' })).toBe(false)
    expect(parseOsRelease('ID=ubuntu\nPRETTY_NAME="Ubuntu 24.04.1 LTS"\n')).toEqual({
      id: 'ubuntu',
      pretty: 'Ubuntu 24.04.1 LTS',
    })
  })
})

describe('model catalog', () => {
  it('holds real models whose stored minimum VRAM is the documented arithmetic', async () => {
    const catalog = await loadCatalog()
    expect(catalog.length).toBeGreaterThanOrEqual(10)
    expect(new Set(catalog.map((m) => m.id)).size).toBe(catalog.length)
    for (const m of catalog) {
      expect(m.kvCacheMiB, m.id).toBe(Math.ceil(kvCacheMiB(m)))
      for (const engine of m.engines)
        expect(m.minVramMiB[engine], `${m.id} ${engine}`).toBe(requiredVramMiB(m, engine))
      expect(m.contextLength).toBeLessThanOrEqual(m.maxContextLength)
      expect(m.weightsMiB).toBeGreaterThan(0)
    }
    // Llama 3.1 8B: 32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes = 128 KiB per token; 8192 tokens = 1 GiB
    const llama = catalog.find((m) => m.id === 'llama-3.1-8b-instruct-awq')!
    expect(kvCacheMiB(llama)).toBe(1024)
    expect(llama.minVramMiB.vllm).toBe(Math.ceil((5465 + 1024 + 1536) / 0.9))
  })
})

describe("where Podman looks for CDI specs (containers.conf's cdi_spec_dirs)", () => {
  it('reads the [engine] table only, quoted either way, comments and other tables ignored', () => {
    const conf = [
      '[containers]',
      'cdi_spec_dirs = ["/not/here"]',
      '[engine] # the engine',
      'runtime = "runc"',
      'cdi_spec_dirs = ["/etc/cdi", \'/opt/cdi\']',
      '[network]',
    ].join('\n')
    expect(cdiSpecDirsOf(conf)).toEqual(['/etc/cdi', '/opt/cdi'])
    expect(cdiSpecDirsOf('[engine]\nruntime = "runc"')).toBeNull()
  })

  it('follows CONTAINERS_CONF and CONTAINERS_CONF_OVERRIDE as Podman does, the last setting winning', async () => {
    expect(containersConfFiles({ HOME: '/home/me' })).toEqual([
      '/usr/share/containers/containers.conf',
      '/etc/containers/containers.conf',
      '/home/me/.config/containers/containers.conf',
    ])
    const dir = await mkdtemp(join(tmpdir(), 'garage-conf-'))
    try {
      await writeFile(join(dir, 'a.conf'), '[engine]\ncdi_spec_dirs = ["/a"]\n')
      await writeFile(join(dir, 'b.conf'), '[engine]\ncdi_spec_dirs = ["/b"]\n')
      expect(await cdiSpecDirs({ CONTAINERS_CONF: join(dir, 'a.conf') })).toEqual(['/a'])
      expect(
        await cdiSpecDirs({
          CONTAINERS_CONF: join(dir, 'a.conf'),
          CONTAINERS_CONF_OVERRIDE: join(dir, 'b.conf'),
        }),
      ).toEqual(['/b'])
      expect(await cdiSpecDirs({ CONTAINERS_CONF: join(dir, 'missing.conf') })).toEqual([
        '/etc/cdi',
        '/var/run/cdi',
      ])
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})
