import { createHash, randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { gzipSync } from 'node:zlib'

/**
 * The smallest OCI distribution registry a `podman pull --tls-verify=false` accepts: one image of
 * one gzip layer, served slowly enough that the CLI draws its progress bars. No image can be pulled
 * from the internet here; this gives `pull` a real registry on 127.0.0.1.
 */

const sha256 = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`

/** A tar archive holding one regular file (ustar header, data, two zero blocks). */
function tarOf(name: string, data: Buffer): Buffer {
  const header = Buffer.alloc(512)
  header.write(name, 0, 100, 'utf8')
  header.write('0000644\0', 100)
  header.write('0000000\0', 108)
  header.write('0000000\0', 116)
  header.write(`${data.length.toString(8).padStart(11, '0')}\0`, 124)
  header.write(
    `${Math.floor(Date.now() / 1000)
      .toString(8)
      .padStart(11, '0')}\0`,
    136,
  )
  header.write('        ', 148)
  header.write('0', 156)
  header.write('ustar\0', 257)
  header.write('00', 263)
  let sum = 0
  for (const byte of header) sum += byte
  header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148)
  const padding = Buffer.alloc((512 - (data.length % 512)) % 512)
  return Buffer.concat([header, data, padding, Buffer.alloc(1024)])
}

export interface LocalRegistry {
  /** e.g. 127.0.0.1:40123/garage-test/pull:0a1b2c3d; other repositories answer 404. */
  image: string
  layerBytes: number
  requests: string[]
  close(): Promise<void>
}

export async function startLocalRegistry(
  options: { layerBytes?: number; chunkBytes?: number; chunkDelayMs?: number } = {},
): Promise<LocalRegistry> {
  const tar = tarOf('data/blob', randomBytes(options.layerBytes ?? 3_000_000))
  const layer = gzipSync(tar, { level: 1 })
  const config = Buffer.from(
    JSON.stringify({
      architecture: 'amd64',
      os: 'linux',
      config: { Entrypoint: ['/bin/false'] },
      rootfs: { type: 'layers', diff_ids: [sha256(tar)] },
    }),
  )
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: {
        mediaType: 'application/vnd.oci.image.config.v1+json',
        digest: sha256(config),
        size: config.length,
      },
      layers: [
        {
          mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip',
          digest: sha256(layer),
          size: layer.length,
        },
      ],
    }),
  )
  const blobs = new Map([
    [sha256(config), config],
    [sha256(layer), layer],
  ])
  const repository = 'garage-test/pull'
  const tag = randomBytes(4).toString('hex')
  const requests: string[] = []
  const chunkBytes = options.chunkBytes ?? 256 * 1024
  const chunkDelayMs = options.chunkDelayMs ?? 25
  const server: Server = createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`)
    const url = req.url ?? '/'
    if (url === '/v2/' || url === '/v2') {
      res.writeHead(200, {
        'content-type': 'application/json',
        'docker-distribution-api-version': 'registry/2.0',
      })
      return res.end('{}')
    }
    // Its one image, under any tag that starts with its tag (so a test can pull it under several names).
    const m = /^\/v2\/(.+)\/manifests\/(.+)$/.exec(url)
    if (m != null && m[1] === repository && m[2]!.startsWith(tag)) {
      res.writeHead(200, {
        'content-type': 'application/vnd.oci.image.manifest.v1+json',
        'docker-content-digest': sha256(manifest),
        'content-length': manifest.length,
      })
      return res.end(req.method === 'HEAD' ? undefined : manifest)
    }
    const b = /^\/v2\/(.+)\/blobs\/(sha256:[0-9a-f]{64})$/.exec(url)
    const blob = b != null ? blobs.get(b[2]!) : undefined
    if (blob != null) {
      res.writeHead(200, { 'content-length': blob.length, 'docker-content-digest': b![2]! })
      if (req.method === 'HEAD') return res.end()
      let offset = 0
      const timer = setInterval(() => {
        if (offset >= blob.length || res.destroyed) {
          clearInterval(timer)
          return res.end()
        }
        res.write(blob.subarray(offset, offset + chunkBytes))
        offset += chunkBytes
      }, chunkDelayMs)
      return
    }
    res.writeHead(404, { 'content-type': 'application/json' })
    res.end('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
  })
  // Podman first tries TLS on the port; a plain HTTP server answers that with a parse error it ignores.
  server.on('clientError', (_err, socket) => socket.destroy())
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as AddressInfo).port
  return {
    image: `127.0.0.1:${port}/${repository}:${tag}`,
    layerBytes: layer.length,
    requests,
    close: async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    },
  }
}
