import { describe, expect, it } from 'vitest'
import { probeLlamaBackends } from '../../../daemon/hardware/llama.ts'

describe('probeLlamaBackends', () => {
  it('tries once more, three times as long, before saying the embedded engine cannot load', async () => {
    // 5 ms cannot load node-llama-cpp: both tries run out, the second after 15 ms.
    const r = await probeLlamaBackends(5)
    expect(r.available).toBe(false)
    expect(r.message).toMatch(/did not answer within 15 ms/)
  })

  it('finds the CPU back-end with time to load (this machine has no GPU)', async () => {
    const r = await probeLlamaBackends(20_000)
    expect(r).toMatchObject({ available: true, message: null })
    expect(Array.isArray(r.gpu)).toBe(true)
  })
})
