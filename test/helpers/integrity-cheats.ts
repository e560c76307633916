import { randomInt } from 'node:crypto'
import { createServer, type IncomingMessage, type Server } from 'node:http'
import { closeServer, listen } from '../../core/http.ts'

/**
 * Cheating engines for the integrity tests: test fixtures, never product code. A cheat node runs
 * the real daemon and forwards its mesh requests to one of these instead of its assigned engine.
 */

export interface Endpoint {
  baseUrl: string
  apiKey: string
}

async function readBody(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const c of req) chunks.push(c as Buffer)
  return Buffer.concat(chunks)
}

const printable = (n: number): string =>
  Array.from({ length: n }, () => String.fromCharCode(32 + randomInt(0, 95))).join('')

/** Answers every generation with random printable text of max_tokens bytes (streamed or not). */
export async function startRandomTextEngine(): Promise<Endpoint & { close(): Promise<void> }> {
  const server: Server = createServer((req, res) => {
    void readBody(req).then((raw) => {
      const body = JSON.parse(raw.toString('utf8') || '{}') as Record<string, unknown>
      const chat = req.url?.includes('/chat/') ?? false
      const n = Math.max(1, Math.min(256, Number(body.max_completion_tokens ?? body.max_tokens ?? 16)))
      const text = printable(n)
      const usage = { prompt_tokens: 10, completion_tokens: n, total_tokens: 10 + n }
      const choice = chat
        ? { index: 0, message: { role: 'assistant', content: text }, finish_reason: 'length', logprobs: null }
        : { index: 0, text, finish_reason: 'length', logprobs: null }
      if (body.stream !== true) {
        res.writeHead(200, { 'content-type': 'application/json' })
        res.end(
          JSON.stringify({
            id: 'x',
            object: 'chat.completion',
            created: 0,
            model: body.model,
            choices: [choice],
            usage,
          }),
        )
        return
      }
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      const delta = chat
        ? { index: 0, delta: { content: text }, finish_reason: null }
        : { index: 0, text, finish_reason: null }
      const end = chat
        ? { index: 0, delta: {}, finish_reason: 'length' }
        : { index: 0, text: '', finish_reason: 'length' }
      for (const choices of [[delta], [end]])
        res.write(
          `data: ${JSON.stringify({ id: 'x', object: 'chat.completion.chunk', created: 0, model: body.model, choices })}\n\n`,
        )
      res.write(
        `data: ${JSON.stringify({ id: 'x', object: 'chat.completion.chunk', created: 0, model: body.model, choices: [], usage })}\n\n`,
      )
      res.end('data: [DONE]\n\n')
    })
  })
  const url = await listen(server, 0, '127.0.0.1', { what: 'the random-text engine' })
  return { baseUrl: url, apiKey: 'none', close: () => closeServer(server) }
}

/** Forwards each request to `cheat` with probability `share`, else to `honest()` (the node's own engine). */
export async function startPartialCheat(
  honest: () => Endpoint | null,
  cheat: Endpoint,
  share: number,
): Promise<Endpoint & { close(): Promise<void>; cheated: number; served: number }> {
  const state = { cheated: 0, served: 0 }
  const server: Server = createServer((req, res) => {
    void readBody(req).then(async (raw) => {
      const scoring = raw.includes('"prompt_logprobs"')
      const useCheat = !scoring && Math.random() < share
      const to = useCheat ? cheat : honest()
      if (to == null) {
        res.writeHead(503).end()
        return
      }
      state.served++
      if (useCheat) state.cheated++
      const upstream = await fetch(`${to.baseUrl.replace(/\/$/, '')}${req.url}`, {
        method: req.method ?? 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${to.apiKey}` },
        body: new Uint8Array(raw),
      })
      res.writeHead(upstream.status, {
        'content-type': upstream.headers.get('content-type') ?? 'application/json',
      })
      if (upstream.body != null)
        for await (const chunk of upstream.body as unknown as AsyncIterable<Uint8Array>) res.write(chunk)
      res.end()
    })
  })
  const url = await listen(server, 0, '127.0.0.1', { what: 'the partial cheat' })
  return {
    baseUrl: url,
    apiKey: 'none',
    close: () => closeServer(server),
    get cheated() {
      return state.cheated
    },
    get served() {
      return state.served
    },
  }
}

/**
 * One request of mixed traffic, as API consumers send it: chat or completions, streamed or not,
 * temperature 0 to 1.5, top_p, presence and frequency penalties, and now and then structured output.
 */
export function mixedRequest(
  i: number,
  model: string,
  random: () => number = Math.random,
): { path: string; body: Record<string, unknown> } {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)]!
  const temperature = pick([0, 0.2, 0.5, 0.7, 1, 1, 1.2, 1.5])
  const body: Record<string, unknown> = {
    model,
    max_tokens: 16 + Math.floor(random() * 17),
    temperature,
    stream: random() < 0.5,
  }
  if (random() < 0.4) body.top_p = pick([0.5, 0.8, 0.9, 0.95])
  if (random() < 0.3) body.presence_penalty = pick([-0.5, 0.3, 1])
  if (random() < 0.3) body.frequency_penalty = pick([-0.3, 0.2, 0.8])
  const topic = pick(['gardens', 'rivers', 'engines', 'markets', 'letters', 'bridges', 'storms'])
  if (random() < 0.3) return { path: '/v1/completions', body: { ...body, prompt: `Notes ${i} on ${topic}:` } }
  body.messages = [
    { role: 'system', content: 'You are terse.' },
    { role: 'user', content: `Request ${i}: say something about ${topic}.` },
  ]
  if (random() < 0.1)
    body.response_format = {
      type: 'json_schema',
      json_schema: {
        name: 'a',
        schema: { type: 'object', properties: { word: { type: 'string', maxLength: 8 } } },
      },
    }
  return { path: '/v1/chat/completions', body }
}

/** Sends the `i`-th mixed request to an OpenAI base (`baseUrl` without /v1) and reads its whole answer. */
export async function sendMixed(baseUrl: string, token: string, i: number, model: string): Promise<Response> {
  const { path, body } = mixedRequest(i, model)
  const res = await fetch(`${baseUrl}${path}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(30_000),
  })
  await res.arrayBuffer()
  return res
}
