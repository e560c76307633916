import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { execa } from 'execa'

/**
 * nginx as the yardstick for a proxy hop on this machine: one plain reverse proxy, or a chain of
 * them with as many hops as a Garage path has, measured in the same run as the path itself.
 */

export interface Nginx {
  url: string
  stop(): Promise<void>
}

async function freePort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as { port: number }).port
  await new Promise<void>((resolve) => server.close(() => resolve()))
  return port
}

/** nginx as a plain reverse proxy in front of `upstream`, or null when nginx is not installed. */
export async function startNginx(upstream: string): Promise<Nginx | null> {
  const found = await execa('nginx', ['-v'], { reject: false })
  if (found.exitCode !== 0) return null
  const dir = await mkdtemp(join(tmpdir(), 'garage-bench-nginx-'))
  const port = await freePort()
  const upstreamHost = new URL(upstream).host
  await writeFile(
    join(dir, 'nginx.conf'),
    `worker_processes 1;
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${dir};
  proxy_temp_path ${dir};
  fastcgi_temp_path ${dir};
  uwsgi_temp_path ${dir};
  scgi_temp_path ${dir};
  upstream engine { server ${upstreamHost}; keepalive 64; }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
`,
  )
  const child: ChildProcess = spawn('nginx', ['-c', join(dir, 'nginx.conf'), '-p', dir], { stdio: 'ignore' })
  const url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + 10_000
  for (;;) {
    const ok = await fetch(`${url}/health`).then(
      () => true,
      () => false,
    )
    if (ok) break
    if (Date.now() > deadline) throw new Error('nginx did not start')
    await new Promise((r) => setTimeout(r, 100))
  }
  return {
    url,
    async stop() {
      await new Promise<void>((resolve) => {
        if (child.exitCode != null) return resolve()
        child.once('exit', () => resolve())
        child.kill('SIGTERM')
      })
      await rm(dir, { recursive: true, force: true })
    },
  }
}

/** `hops` nginx processes in a row in front of `upstream`, or null when nginx is not installed. */
export async function startNginxChain(upstream: string, hops: number): Promise<Nginx | null> {
  const chain: Nginx[] = []
  const stop = async (): Promise<void> => {
    for (const n of chain.reverse()) await n.stop()
  }
  try {
    for (let i = 0; i < hops; i++) {
      const next = await startNginx(chain.at(-1)?.url ?? upstream)
      if (next == null) break
      chain.push(next)
    }
  } catch (err) {
    await stop()
    throw err
  }
  if (chain.length < hops) {
    await stop()
    return null
  }
  return { url: chain.at(-1)!.url, stop }
}
