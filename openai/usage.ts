/**
 * Token accounting at the head: the pool, not the miner, measures speed. The head counts the
 * completion tokens of every response it proxies and credits a node only with what it can bound.
 *
 * Verified completion tokens of one response:
 *  - with `usage` (the head forces `stream_options.include_usage` on streamed requests):
 *      min(usage.completion_tokens, max_tokens × n, textBytes + n), and at least the lower bound below.
 *    textBytes counts the UTF-8 bytes of the generated text the client receives (content, text,
 *    reasoning, refusal, tool-call names and arguments). Every token yields at least one byte except
 *    a final special token (end of sequence) per choice, hence `+ n`.
 *  - without `usage` (the stream was cut, or an engine omitted it): the number of content-bearing
 *    chunks (choices in a non-streamed body), each of which carries at least one token; capped by
 *    max_tokens × n.
 *
 * Node-reported totals (telemetry `tokensTotal`, counted since the node joined) are compared with
 * the verified totals: a node is flagged when reported > verified × 1.10 and reported − verified > 20
 * (slack for the few tokens a stop sequence swallows and for tiny totals). Pass the tokens of
 * requests still streaming to compare() so a busy node is not flagged for work in flight.
 *
 * What this cannot catch: a node that inflates `usage.completion_tokens` while staying under both
 * bounds (most text is 3–4 bytes per token, so a node may claim up to about 3× the real count on
 * long answers and be credited for it), a node that sends more text than the model generated
 * (padding), or a node that serves a smaller/faster model than assigned. Prompt tokens are taken from
 * `usage` as they are; the head does not tokenize. Catching those needs the head to tokenize or to
 * re-run samples, which is a different check.
 */
import { Buffer } from 'node:buffer'
import { isPlainObject } from '../core/guards.ts'

interface Usage {
  promptTokens: number | null
  completionTokens: number
}

function readUsage(v: unknown): Usage | null {
  if (!isPlainObject(v)) return null
  const completion = v.completion_tokens
  if (typeof completion !== 'number' || !Number.isSafeInteger(completion) || completion < 0) return null
  const prompt = v.prompt_tokens
  return {
    completionTokens: completion,
    promptTokens: typeof prompt === 'number' && Number.isSafeInteger(prompt) && prompt >= 0 ? prompt : null,
  }
}

/** UTF-8 bytes of the generated text in a message or delta (content, reasoning, refusal, tool calls). */
function generatedBytes(m: unknown): number {
  if (!isPlainObject(m)) return 0
  let bytes = 0
  for (const key of ['content', 'reasoning_content', 'reasoning', 'refusal']) {
    const v = m[key]
    if (typeof v === 'string') bytes += Buffer.byteLength(v, 'utf8')
  }
  const calls = m.tool_calls
  if (Array.isArray(calls)) {
    for (const call of calls) {
      const fn = isPlainObject(call) ? call.function : null
      if (!isPlainObject(fn)) continue
      if (typeof fn.name === 'string') bytes += Buffer.byteLength(fn.name, 'utf8')
      if (typeof fn.arguments === 'string') bytes += Buffer.byteLength(fn.arguments, 'utf8')
    }
  }
  return bytes
}

function choiceBytes(choice: unknown, field: 'delta' | 'message'): number {
  if (!isPlainObject(choice)) return 0
  const text = choice.text
  return (typeof text === 'string' ? Buffer.byteLength(text, 'utf8') : 0) + generatedBytes(choice[field])
}

/** The rule in the file comment. */
function verify(
  usage: Usage | null,
  maxTokens: number | null,
  textBytes: number,
  lower: number,
  hidden: number,
): number {
  const cap = maxTokens == null ? Number.POSITIVE_INFINITY : maxTokens
  const floor = Math.min(lower, cap)
  if (usage == null) return floor
  return Math.max(floor, Math.min(usage.completionTokens, cap, textBytes + hidden))
}

/**
 * Tokens a tool call costs that the client never sees as text: the model's call syntax around the
 * name and the arguments (`||call: name(...)`, `<tool_call>{"name": ...}`), and the grammar's end.
 */
export const toolCallHiddenTokens = 32

export interface StreamTokenCounterInit {
  clientWantsUsage: boolean
  maxTokens: number | null
  n?: number
  /** Per choice: tokens that never reach the client (default 1: the end of sequence). */
  hiddenTokensPerChoice?: number
}

/** Follows one streamed OpenAI response, event by event, and decides what reaches the client. */
export class StreamTokenCounter {
  readonly #clientWantsUsage: boolean
  readonly #maxTokens: number | null
  readonly #n: number
  readonly #hiddenPerChoice: number
  /** UTF-8 bytes of generated text seen. */
  textBytes = 0
  /** Tool calls begun (a delta with a call id). */
  toolCalls = 0
  /** Chunks that carried generated text (each holds at least one token). */
  contentChunks = 0
  finishReason: string | null = null
  usage: Usage | null = null
  done = false
  /** The `error` of an error event, when the node sent one. */
  error: unknown = null
  /** Events whose data was not JSON (passed on, counted as nothing). */
  malformed = 0

  constructor(init: StreamTokenCounterInit) {
    this.#clientWantsUsage = init.clientWantsUsage
    this.#maxTokens = init.maxTokens
    this.#n = init.n ?? 1
    this.#hiddenPerChoice = init.hiddenTokensPerChoice ?? 1
  }

  /** Takes an event's `data:` payload (null for events without one); returns whether to forward it. */
  feed(data: string | null): boolean {
    if (data == null) return true
    if (data === '[DONE]') {
      this.done = true
      return true
    }
    let chunk: unknown
    try {
      chunk = JSON.parse(data)
    } catch {
      this.malformed++
      return true
    }
    if (!isPlainObject(chunk)) return true
    if (chunk.error != null) {
      this.error = chunk.error
      return true
    }
    const usage = readUsage(chunk.usage)
    if (usage != null) this.usage = usage
    const choices = Array.isArray(chunk.choices) ? chunk.choices : []
    let bytes = 0
    for (const choice of choices) {
      bytes += choiceBytes(choice, 'delta')
      this.toolCalls += newToolCalls(choice)
      const finish = isPlainObject(choice) ? choice.finish_reason : null
      if (typeof finish === 'string') this.finishReason = finish
    }
    if (bytes > 0) {
      this.textBytes += bytes
      this.contentChunks++
    }
    // The usage-only chunk exists because the head asked for it: the client did not.
    return !(choices.length === 0 && chunk.usage != null && !this.#clientWantsUsage)
  }

  verifiedTokens(): number {
    return verify(
      this.usage,
      this.#maxTokens == null ? null : this.#maxTokens * this.#n,
      this.textBytes,
      this.contentChunks,
      this.#n * this.#hiddenPerChoice + this.toolCalls * toolCallHiddenTokens,
    )
  }

  /** As the node reported them; the head cannot check these. */
  promptTokens(): number | null {
    return this.usage?.promptTokens ?? null
  }
}

/** Verified completion tokens of a non-streamed chat or completion body (the same rule). */
export function countNonStreamed(
  json: unknown,
  maxTokens: number | null,
  n = 1,
  hiddenTokensPerChoice = 1,
): number {
  if (!isPlainObject(json)) return 0
  let textBytes = 0
  let bearing = 0
  let calls = 0
  if (Array.isArray(json.choices)) {
    for (const choice of json.choices) {
      const bytes = choiceBytes(choice, 'message')
      textBytes += bytes
      if (bytes > 0) bearing++
      const message = isPlainObject(choice) ? choice.message : null
      if (isPlainObject(message) && Array.isArray(message.tool_calls)) calls += message.tool_calls.length
    }
  }
  return verify(
    readUsage(json.usage),
    maxTokens == null ? null : maxTokens * n,
    textBytes,
    bearing,
    n * hiddenTokensPerChoice + calls * toolCallHiddenTokens,
  )
}

/** Tool calls a streamed choice begins in this chunk (the delta that carries a call's id). */
function newToolCalls(choice: unknown): number {
  const delta = isPlainObject(choice) ? choice.delta : null
  if (!isPlainObject(delta) || !Array.isArray(delta.tool_calls)) return 0
  return delta.tool_calls.filter((c) => isPlainObject(c) && typeof c.id === 'string').length
}

export const flagRatio = 1.1
export const flagSlackTokens = 20

export interface ThroughputFlagChange {
  peer: string
  /** True: the node now claims too much; false: its claim is back within bounds. */
  flagged: boolean
  verified: number
  reported: number
  at: number
}

export interface ThroughputSnapshot {
  peer: string
  verified: number
  /** The node's latest self-reported total; null before its first telemetry. */
  reported: number | null
  /** reported / verified; null when either is missing or verified is 0. */
  ratio: number | null
  flagged: boolean
  /** When the current flag was raised. */
  flaggedSince: number | null
  reportedAt: number | null
}

/**
 * Tokens a node may have generated, per stream cut mid-way (its client left, the hop to it broke), after the head stopped reading:
 * the node stops when the reset reaches it, tens of milliseconds later. Not credited; only kept out of
 * the over-reporting check, so an honest node is not flagged for its clients' aborts.
 */
export const abandonedStreamAllowanceTokens = 64

/** What a request lets its node generate at most (`max_tokens` × `n`; 4,096 per choice when unset). */
export function tokenBudget(prepared: { maxTokens: number | null; n: number }): number {
  return (prepared.maxTokens ?? 4096) * prepared.n
}

interface PeerThroughput {
  verified: number
  /** Allowances for abandoned streams (see abandonedStreamAllowanceTokens): never credited. */
  unseen: number
  reported: number | null
  reportedAt: number | null
  flaggedSince: number | null
}

/** Per-node verified completion tokens, and the check of what nodes claim against them. */
export class VerifiedThroughput {
  readonly #now: () => number
  readonly #peers = new Map<string, PeerThroughput>()

  constructor(init: { now?: () => number } = {}) {
    this.#now = init.now ?? Date.now
  }

  add(peer: string, tokens: number): void {
    if (!(tokens > 0)) return
    this.#entry(peer).verified += tokens
  }

  verified(peer: string): number {
    return this.#peers.get(peer)?.verified ?? 0
  }

  /**
   * A stream of this node's was abandoned by its client with `remaining` tokens of its budget left:
   * what it generated after the head stopped reading (at most abandonedStreamAllowanceTokens) is not
   * held against it. Nothing is credited.
   */
  abandoned(peer: string, remaining: number): void {
    if (!(remaining > 0)) return
    this.#entry(peer).unseen += Math.min(remaining, abandonedStreamAllowanceTokens)
  }

  /**
   * The node (re)joined with `slots` parallel sequences: streams its last head had sent it (a head
   * that died, a head it lost) may still be finishing, their tails unseen by this head. Allowed for
   * as cut streams, one per slot; nothing is credited.
   */
  joined(peer: string, slots: number): void {
    this.#entry(peer).unseen += Math.max(1, slots) * abandonedStreamAllowanceTokens
  }

  /**
   * Records the node's self-reported total and re-checks it; returns the change when the flag
   * flips (log it once), null otherwise. `pendingTokens`: tokens of its requests still streaming.
   */
  compare(peer: string, reportedTotal: number, pendingTokens = 0): ThroughputFlagChange | null {
    if (!Number.isFinite(reportedTotal) || reportedTotal < 0) return null
    const entry = this.#entry(peer)
    const now = this.#now()
    entry.reported = reportedTotal
    entry.reportedAt = now
    const credited = entry.verified + entry.unseen + Math.max(0, pendingTokens)
    const over = reportedTotal > credited * flagRatio && reportedTotal - credited > flagSlackTokens
    if (over === (entry.flaggedSince != null)) return null
    entry.flaggedSince = over ? now : null
    return { peer, flagged: over, verified: entry.verified, reported: reportedTotal, at: now }
  }

  flagged(peer: string): boolean {
    return this.#peers.get(peer)?.flaggedSince != null
  }

  /** Forgets a node (it left; a rejoin restarts both counts from zero). */
  remove(peer: string): boolean {
    return this.#peers.delete(peer)
  }

  snapshot(): ThroughputSnapshot[] {
    const out: ThroughputSnapshot[] = []
    for (const [peer, e] of this.#peers) {
      out.push({
        peer,
        verified: e.verified,
        reported: e.reported,
        ratio: e.reported != null && e.verified > 0 ? e.reported / e.verified : null,
        flagged: e.flaggedSince != null,
        flaggedSince: e.flaggedSince,
        reportedAt: e.reportedAt,
      })
    }
    return out.sort((a, b) => (a.peer < b.peer ? -1 : a.peer > b.peer ? 1 : 0))
  }

  #entry(peer: string): PeerThroughput {
    let e = this.#peers.get(peer)
    if (e == null) {
      e = { verified: 0, unseen: 0, reported: null, reportedAt: null, flaggedSince: null }
      this.#peers.set(peer, e)
    }
    return e
  }
}
