import { readFile } from 'node:fs/promises'
import { describe, expect, it } from 'vitest'
import { federationErrorCodes } from '../../federation/errors.ts'

describe('docs/errors.md', () => {
  it('lists exactly the codes federation/errors.ts registers, with the same statuses', async () => {
    const doc = await readFile(new URL('../../docs/errors.md', import.meta.url), 'utf8')
    const documented = new Map<string, number>()
    for (const m of doc.matchAll(/^\| `([a-z_]+)` \| (\d{3}) \|/gm)) documented.set(m[1]!, Number(m[2]))
    const registered = new Map(
      Object.entries(federationErrorCodes).map(([code, v]) => [code, v.status as number]),
    )
    expect([...documented.entries()].sort()).toEqual([...registered.entries()].sort())
  })

  it('covers every code the gateway, the head, the relay and the engines send', async () => {
    const sources = [
      'federation/gateway.ts',
      'bootstrap/head/head.ts',
      'mesh/openai-relay.ts',
      'mesh/openai-http.ts',
      'mesh/token-accounting.ts',
      'daemon/infer-handler.ts',
      'daemon/engines/llamacpp/server.ts',
      'daemon/engines/llamacpp/request.ts',
    ]
    const used = new Set<string>()
    for (const path of sources) {
      const text = await readFile(new URL(`../../${path}`, import.meta.url), 'utf8')
      for (const m of text.matchAll(
        /code: '([a-z_]+)'|federationError\(\s*'([a-z_]+)'|BadRequestError\(\s*'([a-z_]+)'|bad\([^)]*, '[a-z_]+', '([a-z_]+)'\)/g,
      )) {
        used.add((m[1] ?? m[2] ?? m[3] ?? m[4])!)
      }
    }
    const missing = [...used].filter((c) => !(c in federationErrorCodes))
    expect(missing).toEqual([])
  })
})
