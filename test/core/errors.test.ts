import { readFile } from 'node:fs/promises'
import { describe, expect, it } from 'vitest'
import { ApiError, apiError, controlErrorBody, errorCodesOf, httpErrorCodes } from '../../core/errors.ts'

async function documentedCodes(doc: string): Promise<Map<string, number>> {
  const text = await readFile(new URL(`../../${doc}`, import.meta.url), 'utf8')
  const documented = new Map<string, number>()
  for (const m of text.matchAll(/^\| `([a-z_]+)` \| (\d{3}) \|/gm)) documented.set(m[1]!, Number(m[2]))
  return documented
}

function statuses(codes: Map<string, { status: number }>): Array<[string, number]> {
  return [...codes].map(([code, v]): [string, number] => [code, v.status]).sort()
}

describe('the error code registry (core/errors.ts)', () => {
  it('docs/errors.md lists exactly the codes of the OpenAI surface, with the same statuses', async () => {
    expect([...(await documentedCodes('docs/errors.md'))].sort()).toEqual(statuses(errorCodesOf('openai')))
  })

  it('docs/control-api.md lists exactly the codes of the control API, with the same statuses', async () => {
    expect([...(await documentedCodes('docs/control-api.md'))].sort()).toEqual(
      statuses(errorCodesOf('control')),
    )
  })

  it('covers every code the gateway, the head, the relay, the control API and the engines send', async () => {
    const sources = [
      'federation/gateway.ts',
      'federation/route.ts',
      'bootstrap/head/head.ts',
      'bootstrap/head/route.ts',
      'openai/relay.ts',
      'openai/request.ts',
      'openai/proxy.ts',
      'core/http.ts',
      'daemon/infer-handler.ts',
      'daemon/control/server.ts',
      'daemon/engines/llamacpp/server.ts',
      'daemon/engines/llamacpp/request.ts',
    ]
    const used = new Set<string>()
    for (const path of sources) {
      const text = await readFile(new URL(`../../${path}`, import.meta.url), 'utf8')
      for (const m of text.matchAll(
        /code: '([a-z_]+)'|apiError\(\s*'([a-z_]+)'|bad\([^)]*, '[a-z_]+', '([a-z_]+)'\)/g,
      )) {
        used.add((m[1] ?? m[2] ?? m[3])!)
      }
    }
    expect(used.size).toBeGreaterThan(20)
    const missing = [...used].filter((c) => !(c in httpErrorCodes))
    expect(missing).toEqual([])
  })

  it('renders one error in OpenAI’s shape and in the control API’s', () => {
    const err = apiError('invalid_field', 'minutes must be a number', { param: 'minutes' })
    expect(err).toBeInstanceOf(ApiError)
    expect(err.status).toBe(400)
    expect(err.body()).toEqual({
      error: {
        message: 'minutes must be a number',
        type: 'invalid_request_error',
        param: 'minutes',
        code: 'invalid_field',
      },
    })
    expect(controlErrorBody(err)).toEqual({
      error: { message: 'minutes must be a number', code: 'invalid_field', field: 'minutes' },
    })
    expect(new ApiError(503, 'upstream said no').body().error.code).toBeNull()
  })
})
