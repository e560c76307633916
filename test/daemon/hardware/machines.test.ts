import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type DoctorReport, formatDoctor, runDoctor } from '../../../daemon/hardware/doctor.ts'
import { fakeMachine } from '../../helpers/fake-tools.ts'

const dirs: string[] = []
let dataDir: string
beforeAll(async () => {
  dataDir = await mkdtemp(join(tmpdir(), 'garage-doctor-'))
  dirs.push(dataDir)
})
afterAll(async () => {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
})

async function doctor(machine: string, commandTimeoutMs = 5_000): Promise<DoctorReport> {
  const { options, binDir } = await fakeMachine(machine, dataDir)
  dirs.push(binDir)
  return runDoctor({ ...options, commandTimeoutMs })
}

const fitting = (d: DoctorReport, engine: string): string[] =>
  d.capability.models.filter((m) => m.fits && m.engine === engine).map((m) => m.id)
const engine = (d: DoctorReport, name: string) => d.capability.engines.find((e) => e.engine === name)!
const adviceIds = (d: DoctorReport): string[] => d.advice.map((a) => a.id)

describe('hardware probe and doctor on recorded machines', () => {
  it('one RTX 4090 with rootless Podman and a CDI spec: vLLM on CUDA, models up to 32B AWQ', async () => {
    const d = await doctor('rtx4090')
    expect(d.hardware.gpus).toHaveLength(1)
    expect(d.hardware.gpus[0]).toMatchObject({
      vendor: 'nvidia',
      name: 'NVIDIA GeForce RTX 4090',
      vramTotalMiB: 24564,
      vramUsedMiB: 1387,
      computeCapability: '8.9',
      driverVersion: '550.120',
      powerDrawW: 31.26,
      powerLimitW: 450,
      temperatureC: 42,
    })
    expect(d.hardware.computeApps).toEqual([
      { pid: 2231, processName: '/usr/lib/xorg/Xorg', usedMemoryMiB: 412 },
      { pid: 3150, processName: '/usr/bin/gnome-shell', usedMemoryMiB: 96 },
    ])
    expect(d.hardware.containers.podman).toMatchObject({
      installed: true,
      version: '4.9.3',
      reachable: true,
      rootless: true,
    })
    expect(d.hardware.nvidiaContainer.cdiDevices).toContain('nvidia.com/gpu=all')
    expect(engine(d, 'vllm')).toMatchObject({ available: true, runtime: 'podman', device: 'cuda', gpus: [0] })
    expect(engine(d, 'llamacpp')).toMatchObject({ available: true, device: 'cuda' })
    expect(fitting(d, 'vllm')).toEqual([
      'llama-3.1-8b-instruct-awq',
      'llama-3.1-8b-instruct-bf16',
      'qwen2.5-14b-instruct-awq',
      'qwen2.5-32b-instruct-awq',
    ])
    const seventy = d.capability.models.find((m) => m.id === 'llama-3.3-70b-instruct-awq')!
    expect(seventy.fits).toBe(false)
    expect(seventy.reason).toMatch(/needs 2 GPUs/)
    expect(d.canServe).toBe(true)
    expect(d.advice).toEqual([])
    expect(formatDoctor(d)).toContain('✓ vLLM (container)      on cuda (GPU 0) via podman')
  })

  it('an RTX 3060 12 GB with Docker and the nvidia runtime: 8B AWQ yes, 14B no', async () => {
    const d = await doctor('rtx3060')
    expect(d.hardware.gpus.map((g) => [g.name, g.vramTotalMiB, g.computeCapability])).toEqual([
      ['NVIDIA GeForce RTX 3060', 12288, '8.6'],
    ])
    expect(d.hardware.computeApps).toEqual([])
    expect(d.hardware.containers.docker).toMatchObject({
      installed: true,
      version: '27.3.1',
      reachable: true,
      nvidiaRuntime: true,
      rootless: false,
    })
    expect(d.hardware.containers.podman.installed).toBe(false)
    expect(engine(d, 'vllm')).toMatchObject({ available: true, runtime: 'docker' })
    expect(fitting(d, 'vllm')).toEqual(['llama-3.1-8b-instruct-awq'])
    const fourteen = d.capability.models.find((m) => m.id === 'qwen2.5-14b-instruct-awq')!
    expect(fourteen.reason).toBe('needs 13989 MiB of VRAM; the largest GPU here has 12288 MiB')
    expect(fitting(d, 'llamacpp')).toContain('mistral-nemo-12b-instruct-q4_k_m')
    expect(d.capability.models.find((m) => m.id === 'mistral-nemo-12b-instruct-q4_k_m')!.placement).toBe(
      'gpu',
    )
    expect(d.canServe).toBe(true)
  })

  it('two different GPUs in one machine: both listed, each model placed on a GPU large enough', async () => {
    const d = await doctor('two-gpus')
    expect(d.hardware.gpus.map((g) => [g.index, g.name, g.vramTotalMiB])).toEqual([
      [0, 'NVIDIA GeForce RTX 4090', 24564],
      [1, 'NVIDIA GeForce RTX 3060', 12288],
    ])
    expect(d.hardware.system.os.distroId).toBe('fedora')
    expect(engine(d, 'vllm')).toMatchObject({ available: true, gpus: [0, 1] })
    const m = (id: string) => d.capability.models.find((x) => x.id === id)!
    expect(m('llama-3.1-8b-instruct-awq').gpus).toEqual([0])
    expect(m('qwen2.5-32b-instruct-awq')).toMatchObject({ fits: true, gpus: [0] })
    // two GPUs, but the 3060 is too small for half of a 70B model
    expect(m('llama-3.3-70b-instruct-awq')).toMatchObject({
      fits: false,
      reason: 'needs 2 GPUs with 24269 MiB each; 1 here',
    })
  })

  it('a workstation card under WSL2 with no container runtime: WSL-specific fixes', async () => {
    const d = await doctor('wsl2-a4000')
    expect(d.hardware.system.wsl2).toBe(true)
    expect(d.hardware.gpus[0]).toMatchObject({
      name: 'NVIDIA RTX A4000',
      vramTotalMiB: 16376,
      powerDrawW: null,
      driverVersion: '566.03',
    })
    expect(engine(d, 'vllm')).toMatchObject({ available: false, missing: ['container-runtime'] })
    expect(engine(d, 'llamacpp').device).toBe('cuda')
    expect(adviceIds(d)).toEqual(['container-runtime', 'gpu-container-path'])
    const text = formatDoctor(d)
    expect(text).toContain('Inside WSL: sudo apt-get install -y podman')
    expect(text).toContain('nvidia-ctk cdi generate --mode=wsl')
    expect(d.canServe).toBe(true)
  })

  it('nvidia-smi missing: no GPU, the embedded engine on the CPU, vLLM needs an NVIDIA GPU', async () => {
    const d = await doctor('no-nvidia-smi')
    expect(d.hardware.nvidia).toMatchObject({ status: 'not-installed', gpus: [] })
    expect(d.hardware.gpus).toEqual([])
    expect(engine(d, 'llamacpp')).toMatchObject({ available: true, device: 'cpu' })
    expect(engine(d, 'vllm').reason).toBe('vLLM needs an NVIDIA GPU')
    expect(adviceIds(d)).toEqual(['nvidia-gpu'])
    expect(d.advice[0]!.fix.join('\n')).toContain('sudo apt-get install -y nvidia-driver')
    expect(d.capability.models.filter((m) => m.fits).every((m) => m.placement === 'cpu')).toBe(true)
    expect(d.canServe).toBe(true)
  })

  it('"NVIDIA-SMI has failed ... couldn\'t communicate with the NVIDIA driver": a driver error with its fix', async () => {
    const d = await doctor('driver-error')
    expect(d.hardware.nvidia.status).toBe('driver-error')
    expect(d.hardware.nvidia.message).toMatch(
      /^NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver/,
    )
    expect(engine(d, 'vllm').missing).toContain('nvidia-driver')
    expect(adviceIds(d)[0]).toBe('nvidia-driver-error')
    expect(d.advice[0]!.fix.join('\n')).toMatch(/lsmod \| grep nvidia.*Secure Boot/s)
    expect(d.canServe).toBe(true)
  })

  it('a hung nvidia-smi: the probe returns within its timeout and says the driver is hung', async () => {
    const started = Date.now()
    const d = await doctor('hang', 500)
    expect(Date.now() - started).toBeLessThan(3_000)
    expect(d.hardware.nvidia).toMatchObject({
      status: 'timeout',
      message: 'nvidia-smi did not answer within 500 ms',
    })
    expect(adviceIds(d)).toContain('nvidia-driver-hung')
    expect(d.canServe).toBe(true)
  })

  it('rocm-smi JSON of a Radeon RX 7900 XTX: the embedded engine on Vulkan, vLLM needs NVIDIA', async () => {
    const d = await doctor('radeon-7900xtx')
    expect(d.hardware.amd.status).toBe('ok')
    expect(d.hardware.gpus).toEqual([
      expect.objectContaining({
        vendor: 'amd',
        name: 'Navi 31 [Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M]',
        vramTotalMiB: 24560,
        vramUsedMiB: 972,
        temperatureC: 44,
        utilizationPct: 2,
        powerDrawW: 21,
      }),
    ])
    expect(engine(d, 'llamacpp')).toMatchObject({ device: 'vulkan', gpus: [0] })
    expect(engine(d, 'vllm').reason).toBe('vLLM needs an NVIDIA GPU')
    expect(d.advice[0]!.problem).toContain('this machine has Navi 31')
    expect(d.capability.models.find((m) => m.id === 'mistral-nemo-12b-instruct-q4_k_m')).toMatchObject({
      fits: true,
      placement: 'gpu',
    })
  })

  it('cannot serve when the embedded engine cannot load and there is no NVIDIA GPU, saying why', async () => {
    const { options, binDir } = await fakeMachine('no-nvidia-smi', dataDir)
    dirs.push(binDir)
    const d = await runDoctor({
      ...options,
      llamaBackends: async () => ({
        gpu: [],
        available: false,
        message: 'no prebuilt binary for linux-riscv64',
      }),
    })
    expect(d.canServe).toBe(false)
    expect(d.reason).toBe(
      'no engine can run here: no prebuilt binary for linux-riscv64; vLLM needs an NVIDIA GPU',
    )
    expect(d.advice[0]).toMatchObject({ id: 'embedded-engine', level: 'blocker' })
    expect(formatDoctor(d)).toContain('This machine cannot serve: no engine can run here')
  })
})
