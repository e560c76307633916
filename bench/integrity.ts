import { randomInt } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { nextLlr, quarantineLlr } from '../bootstrap/head/integrity.ts'
import { LlamaCppEngine } from '../daemon/engines/llamacpp/engine.ts'
import { writeTinyModel } from '../daemon/engines/llamacpp/tiny-model.ts'
import {
  type AnswerVerdict,
  defaultSampleRate,
  judgeAnswer,
  probationSampleRate,
  readScores,
  samplingOf,
  scoringRequest,
  uncheckableReason,
} from '../openai/integrity.ts'
import { mixedRequest } from '../test/helpers/integrity-cheats.ts'
import { progress, writeResult } from './report.ts'

/**
 * npm run bench -- integrity: the integrity check's statistic on live answers of the embedded
 * engine (docs/integrity.md), and the head's sequential test run over those verdicts.
 *
 * 1. Honest answers: mixed traffic (bench helper mixedRequest: chat and completions, temperature
 *    0-1.5, top_p, penalties, some structured output) served by the assigned model on 2 threads,
 *    each re-scored by a verifier engine of the same model on 1 thread, with the wall-clock time of
 *    the generation and of the scoring pass (verification_cost_ratio).
 * 2. Cheats: the same traffic answered by another seed, a smaller model (1 layer) and random text,
 *    each re-scored the same way.
 * 3. The sequential test over those verdicts, request by request at the default sampling rates
 *    (probation and suspicion 50 %, then 2 %): requests until quarantine per cheat kind (the 20 %
 *    cheat draws a cheat's verdict for a fifth of its requests), and quarantines of honest nodes
 *    over 10,000 requests each (false_positives_per_10k). The verdicts are drawn from the live
 *    ones (resampled), so the 10,000 honest requests per node reuse the recorded answers.
 */

const model = 'garage-tiny-sharp'
const honestAnswers = Number(process.env.GARAGE_BENCH_INTEGRITY_HONEST ?? 1500)
const cheatAnswers = Number(process.env.GARAGE_BENCH_INTEGRITY_CHEAT ?? 150)
const simulatedNodes = 200
const honestRequestsPerNode = 10_000

interface Endpoint {
  baseUrl: string
  apiKey: string
}

async function post(e: Endpoint, path: string, body: unknown): Promise<{ json: unknown; ms: number }> {
  const t0 = performance.now()
  const res = await fetch(`${e.baseUrl}${path}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${e.apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(60_000),
  })
  const json = (await res.json()) as unknown
  const ms = performance.now() - t0
  if (res.status !== 200)
    throw new Error(`${path} answered ${res.status}: ${JSON.stringify(json).slice(0, 300)}`)
  return { json, ms }
}

function textOf(json: unknown): string {
  const c = (json as { choices?: Array<{ text?: string; message?: { content?: string } }> }).choices?.[0]
  return c?.text ?? c?.message?.content ?? ''
}

const printable = (n: number): string =>
  Array.from({ length: n }, () => String.fromCharCode(32 + randomInt(0, 95))).join('')

interface Judged {
  verdict: AnswerVerdict
  genMs: number
  scoreMs: number
  tokens: number
}

async function judgeTraffic(
  count: number,
  serve: (path: string, body: Record<string, unknown>) => Promise<{ text: string; ms: number }>,
  verifier: Endpoint,
  label: string,
): Promise<Judged[]> {
  const out: Judged[] = []
  for (let i = 0; out.length < count; i++) {
    const { path, body } = mixedRequest(i, model)
    body.stream = false // wall-clock of whole answers: the generation side of the cost ratio
    const kind = path.endsWith('/chat/completions') ? 'chat' : 'completion'
    if (uncheckableReason(kind, body) != null) continue
    const { text, ms } = await serve(path, body)
    if (text === '') continue
    const sample = {
      v: 1 as const,
      model,
      node: 'bench',
      endpoint: kind as 'chat' | 'completion',
      request: body,
      output: { text, finishReason: null },
      requestId: String(i),
      at: Date.now(),
    }
    const scoring = scoringRequest(sample)
    const scored = await post(verifier, scoring.path, scoring.body)
    const j = judgeAnswer(readScores(scored.json, text), samplingOf(body), { vocabularySize: 270 })
    out.push({ verdict: j.verdict, genMs: ms, scoreMs: scored.ms, tokens: j.tokens })
    if (out.length % 100 === 0) progress(`integrity: ${label} ${out.length}/${count}`)
  }
  return out
}

/** Requests a node serves until the head quarantines it; null when it is not within `limit`. */
function requestsToQuarantine(draw: () => AnswerVerdict, limit: number): number | null {
  let llr = 0
  let passes = 0
  let established = false
  for (let r = 1; r <= limit; r++) {
    const rate = !established || llr > 0 ? probationSampleRate : defaultSampleRate
    if (Math.random() >= rate) continue
    const v = draw()
    if (v === 'inconclusive') continue
    llr = nextLlr(llr, v)
    if (v === 'pass') passes++
    if (!established && passes >= 10 && llr === 0) established = true
    if (llr >= quarantineLlr) return r
  }
  return null
}

const percentileOf = (xs: number[], p: number): number => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? Number.NaN
}

export async function run(): Promise<Record<string, unknown>> {
  const dir = await mkdtemp(join(tmpdir(), 'garage-bench-integrity-'))
  const engines: LlamaCppEngine[] = []
  try {
    const file = (n: string): string => join(dir, `${n}.gguf`)
    await writeTinyModel(file('assigned'), { logitScale: 16 })
    await writeTinyModel(file('seed2'), { logitScale: 16, seed: 2 })
    await writeTinyModel(file('small'), { logitScale: 16, layers: 1 })
    const start = async (f: string, threads: number): Promise<Endpoint> => {
      const e = new LlamaCppEngine()
      engines.push(e)
      const h = await e.start({
        model: file(f),
        servedModelName: model,
        threads,
        parallel: 1,
        contextLength: 512,
      })
      return { baseUrl: h.baseUrl, apiKey: h.apiKey }
    }
    const serving = await start('assigned', 2)
    const verifier = await start('assigned', 1)
    const byEngine =
      (e: Endpoint) =>
      async (path: string, body: Record<string, unknown>): Promise<{ text: string; ms: number }> => {
        const { json, ms } = await post(e, path, body)
        return { text: textOf(json), ms }
      }
    progress('integrity: honest answers')
    const honest = await judgeTraffic(honestAnswers, byEngine(serving), verifier, 'honest')
    const otherModel = await judgeTraffic(
      cheatAnswers,
      byEngine(await start('seed2', 1)),
      verifier,
      'other model',
    )
    const smallerModel = await judgeTraffic(
      cheatAnswers,
      byEngine(await start('small', 1)),
      verifier,
      'smaller',
    )
    const randomTokens = await judgeTraffic(
      cheatAnswers,
      async (_p, body) => ({ text: printable(Number(body.max_tokens ?? 16)), ms: 0 }),
      verifier,
      'random',
    )
    const cheats: Record<string, Judged[]> = {
      other_model: otherModel,
      smaller_model: smallerModel,
      random_tokens: randomTokens,
    }
    const draw = (xs: Judged[]) => (): AnswerVerdict => xs[randomInt(0, xs.length)]!.verdict
    const kinds: Record<string, () => AnswerVerdict> = {
      other_model: draw(otherModel),
      smaller_model: draw(smallerModel),
      random_tokens: draw(randomTokens),
      cheats_20_percent: () => (Math.random() < 0.2 ? draw(otherModel)() : draw(honest)()),
    }
    const requests_to_quarantine: Record<string, number> = {}
    const requests_to_quarantine_p95: Record<string, number> = {}
    const failRate: Record<string, number> = {}
    for (const [kind, d] of Object.entries(kinds)) {
      const runs = Array.from({ length: simulatedNodes }, () => requestsToQuarantine(d, 100_000) ?? 100_000)
      requests_to_quarantine[kind] = percentileOf(runs, 50)
      requests_to_quarantine_p95[kind] = percentileOf(runs, 95)
    }
    for (const [kind, xs] of Object.entries(cheats))
      failRate[kind] = xs.filter((x) => x.verdict === 'fail').length / xs.length
    let quarantines = 0
    for (let n = 0; n < simulatedNodes; n++)
      if (requestsToQuarantine(draw(honest), honestRequestsPerNode) != null) quarantines++
    const honestFails = honest.filter((x) => x.verdict === 'fail').length
    const genMs = honest.reduce((a, x) => a + x.genMs, 0)
    const scoreMs = honest.reduce((a, x) => a + x.scoreMs, 0)
    const result = {
      model: { name: model, logit_scale: 16, vocabulary: 270, serving_threads: 2, verifier_threads: 1 },
      honest_answers_scored: honest.length,
      honest_answer_fails: honestFails,
      honest_tokens_scored: honest.reduce((a, x) => a + x.tokens, 0),
      cheat_answers_scored_per_kind: cheatAnswers,
      cheat_answer_fail_rate: failRate,
      requests_to_quarantine,
      requests_to_quarantine_p95,
      requests_to_quarantine_max: Math.max(...Object.values(requests_to_quarantine)),
      simulated_honest_nodes: simulatedNodes,
      honest_requests_per_node: honestRequestsPerNode,
      false_positives_per_10k: quarantines / simulatedNodes,
      generation_ms_total: Math.round(genMs),
      scoring_ms_total: Math.round(scoreMs),
      verification_cost_ratio: Math.round((scoreMs / genMs) * 1000) / 1000,
      verification_cost_ratio_of_traffic: Math.round((scoreMs / genMs) * defaultSampleRate * 10000) / 10000,
    }
    await writeResult('integrity', result)
    return result
  } finally {
    for (const e of engines) await e.stop().catch(() => {})
    await rm(dir, { recursive: true, force: true })
  }
}
