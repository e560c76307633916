import { readFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { describe, expect, it } from 'vitest'
import { parsePrometheusText, vllmEngineMetrics } from '../../../daemon/engines/vllm/metrics.ts'

const fixtures = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'fixtures', 'vllm')

describe('vLLM /metrics to EngineMetrics', () => {
  it('current names: counts summed over data-parallel engines, KV usage averaged', async () => {
    const m = vllmEngineMetrics(await readFile(join(fixtures, 'metrics-current.txt'), 'utf8'))
    expect(m).toEqual({
      'vllm:num_requests_running': 5,
      'vllm:num_requests_waiting': 1,
      'vllm:generation_tokens_total': 30_000,
      'vllm:prompt_tokens_total': 10_000,
      'vllm:kv_cache_usage_perc': 0.375,
    })
  })

  it('an engine before 0.10: vllm:gpu_cache_usage_perc stands in for the KV usage', async () => {
    const m = vllmEngineMetrics(await readFile(join(fixtures, 'metrics-legacy.txt'), 'utf8'))
    expect(m).toEqual({
      'vllm:num_requests_running': 1,
      'vllm:num_requests_waiting': 4,
      'vllm:generation_tokens_total': 2048,
      'vllm:prompt_tokens_total': 512,
      'vllm:kv_cache_usage_perc': 0.8125,
    })
  })

  it('the new name wins when both are present', () => {
    const text = [
      'vllm:num_requests_running{engine="0"} 0',
      'vllm:gpu_cache_usage_perc{engine="0"} 0.9',
      'vllm:kv_cache_usage_perc{engine="0"} 0.1',
    ].join('\n')
    expect(vllmEngineMetrics(text)['vllm:kv_cache_usage_perc']).toBe(0.1)
  })

  it('refuses a page without vLLM request metrics (not a vLLM engine)', () => {
    expect(() => vllmEngineMetrics('# HELP up\nup 1\n')).toThrow(
      expect.objectContaining({ name: 'VllmMetricsError' }),
    )
  })

  it('reads labels with escapes, timestamps, +Inf, and skips junk', () => {
    const samples = parsePrometheusText(
      [
        'a{path="C:\\\\x",msg="say \\"hi\\""} 1 1700000000000',
        'b_bucket{le="+Inf"} +Inf',
        'garbage line here',
        'c NaN',
      ].join('\n'),
    )
    expect(samples.get('a')).toEqual([{ labels: { path: 'C:\\x', msg: 'say "hi"' }, value: 1 }])
    expect(samples.get('b_bucket')?.[0]?.value).toBe(Number.POSITIVE_INFINITY)
    expect(samples.has('garbage')).toBe(false)
    expect(samples.has('c')).toBe(false)
  })
})
