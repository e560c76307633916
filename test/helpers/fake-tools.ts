import { access, chmod, copyFile, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { ProbeOptions } from '../../daemon/hardware/probe.ts'

export const hardwareFixtures = fileURLToPath(new URL('../fixtures/hardware/', import.meta.url))

const exists = (p: string): Promise<boolean> =>
  access(p).then(
    () => true,
    () => false,
  )

const q = (p: string): string => `'${p.replaceAll("'", "'\\''")}'`

async function script(dir: string, name: string, body: string): Promise<void> {
  const path = join(dir, name)
  await writeFile(path, `#!/bin/sh\n${body}\n`)
  await chmod(path, 0o755)
}

/**
 * Builds a bin dir of fake tools that replay a fixture machine's recorded outputs, and the probe
 * options that make the probe see that machine (PATH holds only the fakes and `cat` and `sleep`).
 */
export async function fakeMachine(
  name: string,
  dataDir: string,
): Promise<{ options: ProbeOptions; binDir: string }> {
  const src = join(hardwareFixtures, name)
  const bin = await mkdtemp(join(tmpdir(), `garage-fake-${name}-`))
  // PATH is this folder alone: the fakes' own helpers, and none of the tools this machine has.
  for (const tool of ['cat', 'sleep']) await symlink(`/bin/${tool}`, join(bin, tool))
  const f = (file: string): string => join(src, file)
  if (await exists(f('nvidia-smi.query-gpu.csv'))) {
    await script(
      bin,
      'nvidia-smi',
      `case "$*" in\n  *--query-gpu=*) cat ${q(f('nvidia-smi.query-gpu.csv'))} ;;\n  *--query-compute-apps=*) cat ${q(f('nvidia-smi.query-compute-apps.csv'))} ;;\n  *) exit 2 ;;\nesac`,
    )
  } else if (await exists(f('nvidia-smi.fail.txt'))) {
    const code = (await readFile(f('nvidia-smi.exit'), 'utf8')).trim()
    await script(bin, 'nvidia-smi', `cat ${q(f('nvidia-smi.fail.txt'))}\nexit ${code}`)
  } else if (await exists(f('nvidia-smi.hang'))) {
    await script(bin, 'nvidia-smi', 'exec sleep 600')
  }
  if (await exists(f('rocm-smi.json'))) await script(bin, 'rocm-smi', `cat ${q(f('rocm-smi.json'))}`)
  if (await exists(f('podman.version.txt'))) {
    await script(
      bin,
      'podman',
      `case "$1" in\n  --version) cat ${q(f('podman.version.txt'))} ;;\n  info) cat ${q(f('podman.info.json'))} ;;\n  *) exit 125 ;;\nesac`,
    )
  }
  if (await exists(f('docker.version.json'))) {
    await script(
      bin,
      'docker',
      `case "$1" in\n  version) cat ${q(f('docker.version.json'))} ;;\n  info) cat ${q(f('docker.info.json'))} ;;\n  *) exit 1 ;;\nesac`,
    )
  }
  if (await exists(f('nvidia-ctk.version.txt')))
    await script(bin, 'nvidia-ctk', `cat ${q(f('nvidia-ctk.version.txt'))}`)
  const machine = JSON.parse(await readFile(f('machine.json'), 'utf8')) as {
    kernelRelease: string
    env: Record<string, string>
    llamaGpu: string[]
  }
  return {
    binDir: bin,
    options: {
      dataDir,
      env: { PATH: bin, ...machine.env },
      platform: 'linux',
      kernelRelease: machine.kernelRelease,
      osRelease: await readFile(f('os-release'), 'utf8'),
      cdiDirs: [f('cdi')],
      llamaBackends: async () => ({ gpu: machine.llamaGpu, available: true, message: null }),
      otherGpus: false,
    },
  }
}

/**
 * This machine as a gamer's PC with an RTX 4090 for `garage node` processes: the fake machine's
 * nvidia-smi and nvidia-ctk in `bin` (put it before the real PATH: Podman stays the real one), and a
 * CDI spec for the GPU that real Podman resolves. Podman 4.3 reads CDI specs only from /etc/cdi and
 * /var/run/cdi (later versions also from containers.conf's cdi_spec_dirs, which the probe follows):
 * the spec goes to /var/run/cdi under a name of this run, so it needs root; remove() takes it away.
 */
export async function fakeGpuMachine(
  root: string,
  runId: string,
): Promise<{ bin: string; remove(): Promise<void> }> {
  if (process.getuid?.() !== 0)
    throw new Error(
      'a fake GPU for real Podman needs a CDI spec in /var/run/cdi, which needs root (CI runs as root)',
    )
  const fake = await fakeMachine('rtx4090', root)
  const bin = join(root, 'bin')
  await mkdir(bin, { recursive: true })
  for (const tool of ['nvidia-smi', 'nvidia-ctk']) await copyFile(join(fake.binDir, tool), join(bin, tool))
  const cdiFile = `/var/run/cdi/garage-test-${runId}.yaml`
  await mkdir('/var/run/cdi', { recursive: true })
  // The devices' edits show in the container's environment: proof Podman resolved them.
  await writeFile(
    cdiFile,
    [
      'cdiVersion: 0.5.0',
      'kind: nvidia.com/gpu',
      'devices:',
      '  - name: "0"',
      '    containerEdits:',
      '      env:',
      '        - GARAGE_TEST_GPU=0',
      '  - name: all',
      '    containerEdits:',
      '      env:',
      '        - GARAGE_TEST_GPU=all',
      'containerEdits:',
      '  env:',
      '    - NVIDIA_VISIBLE_DEVICES=all',
      '',
    ].join('\n'),
  )
  return { bin, remove: () => rm(cdiFile, { force: true }) }
}
