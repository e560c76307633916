import type { FailureKind, RequestRecord } from './fault-load.ts'
import type { ClusterTimeline, FaultEvent, FaultKind } from './fault-timeline.ts'

/**
 * The fault suite's invariants, as pure functions of what the clients recorded, what the suite did
 * (faults, timeline) and what the federation's ledger says.
 */

export type Outcome =
  | 'ok'
  /** Failed before streaming while the gateway was killed or not yet healthy again. */
  | 'federation-down'
  /** A stream that had started and was cut (or stalled) by a kill or a partition on its path. */
  | 'cut-by-fault'
  /** Failed before streaming while no region could serve (by the timeline's definition). */
  | 'no-region'
  | 'violation'

export interface ClassifiedRequest {
  record: RequestRecord
  outcome: Outcome
  reason: string
  /** The fault that explains a cut stream. */
  faultId: number | null
}

export interface ClassifyOptions {
  requestTimeoutMs: number
  /** How late after its deadline a request may end and still not count as hung. */
  hangMarginMs: number
  /** A fault counts for a cut stream until this long after it was undone (reconnections settle). */
  faultTailMs: number
}

const streamFailures = new Set<FailureKind>(['stream-error', 'stream-broken', 'stream-incomplete'])

/** The fault on this request's path that overlapped its life, if any (slow links cut nothing). */
export function faultOnPath(r: RequestRecord, faults: FaultEvent[], tailMs: number): FaultEvent | null {
  for (const f of faults) {
    if (f.kind === 'slow-link') continue
    const until = (f.restoredAt ?? Number.POSITIVE_INFINITY) + tailMs
    if (!(f.injectedAt <= r.end && r.start <= until)) continue
    if (f.kind === 'federation-kill') return f
    if (f.kind === 'head-kill' && f.region === r.region) return f
    if ((f.kind === 'node-kill' || f.kind === 'partition') && f.nodePeerId === r.node) return f
  }
  return null
}

export function classifyRequests(
  records: RequestRecord[],
  timeline: ClusterTimeline,
  faults: FaultEvent[],
  options: ClassifyOptions,
): ClassifiedRequest[] {
  return records.map((r) => {
    const out = (outcome: Outcome, reason: string, faultId: number | null = null): ClassifiedRequest => ({
      record: r,
      outcome,
      reason,
      faultId,
    })
    if (r.end - r.start > options.requestTimeoutMs + options.hangMarginMs) {
      return out('violation', `hung: ended ${Math.round(r.end - r.start)} ms after it started`)
    }
    if (r.ok) return out('ok', 'succeeded')
    const f = r.failure!
    const started = r.headersAt != null && r.status === 200
    if (started && (streamFailures.has(f.kind) || f.kind === 'timeout')) {
      const fault = faultOnPath(r, faults, options.faultTailMs)
      if (fault != null) return out('cut-by-fault', `${f.kind} by ${fault.kind} of ${fault.target}`, fault.id)
      return out('violation', `stream ${f.kind} (${f.code ?? f.message}) with no fault on its path`)
    }
    if (timeline.federationDownDuring(r.start, r.end)) {
      return out(
        'federation-down',
        `${f.kind}${f.status != null ? ` ${f.status}` : ''} while the gateway was down or not yet healthy`,
      )
    }
    const region = timeline.couldServe(r.start, r.end)
    if (region != null) {
      return out(
        'violation',
        `${f.kind}${f.status != null ? ` ${f.status}` : ''} ${f.code ?? ''} before streaming while region ${region} could serve: ${f.message}`,
      )
    }
    return out('no-region', `${f.kind}${f.status != null ? ` ${f.status}` : ''} ${f.code ?? ''}`.trim())
  })
}

export interface LedgerView {
  usage: Array<{
    keyId: string
    model: string
    requests: number
    promptTokens: number
    completionTokens: number
  }>
  credits: Array<{ node: string; region: string; model: string; requests: number; completionTokens: number }>
}

export interface Bounds {
  /** What the clients received on answers whose billing is certain. */
  exact: number
  /** Answers whose billing is uncertain may add between these. */
  min: number
  max: number
  billed: number
}

export interface LedgerCheck {
  perKey: Array<{ key: string; completion: Bounds; prompt: Bounds; requests: Bounds }>
  perNode: Array<{ node: string; completion: Bounds }>
  billedCompletion: number
  creditedCompletion: number
  /** Answers the gateway was relaying when it was SIGKILLed (billed as they streamed, up to the kill). */
  inFlightAtFederationKill: number
  /** Tokens the clients of the cut ones had received. */
  receivedTokensAtFederationKill: number
  violations: string[]
}

/** A stream's tokens in the gateway's last event-loop turn before a SIGKILL: a chunk, rarely two. */
export const lastTurnTokens = 2

function within(b: Bounds): boolean {
  return b.billed >= b.exact + b.min && b.billed <= b.exact + b.max
}

/**
 * "The ledger bills exactly the tokens clients received": per key (completion and prompt tokens,
 * requests) and per node (credits), with two kinds of answers whose billing cannot be exact:
 *  - answers in flight when the gateway was SIGKILLed (or that ended within `unsettledMs` before):
 *    a stream is billed as it is relayed, so a cut one bills what its client got but the writes of
 *    the gateway's last event-loop turn (at most `lastTurnTokens`), its request, but not its prompt
 *    (known at the end); one that just ended may have died with its last record still pending;
 *  - answers whose client gave up after the head arrived: the gateway bills what it relayed, at
 *    least what the client read, at most max_tokens.
 * Every other answer with status 200 (cut streams included: what reached the client) is exact.
 */
export function checkLedger(
  records: RequestRecord[],
  ledger: LedgerView,
  keys: Array<{ id: string; name: string }>,
  federationKills: number[],
  unsettledMs: number,
): LedgerCheck {
  const violations: string[] = []
  const answered = records.filter((r) => r.status === 200 && r.headersAt != null)
  const atKill = (r: RequestRecord): boolean =>
    federationKills.some((k) => r.start < k && r.end >= k - unsettledMs)
  const gaveUp = (r: RequestRecord): boolean => r.failure?.kind === 'timeout'
  const empty = (): Bounds => ({ exact: 0, min: 0, max: 0, billed: 0 })
  const keyBounds = new Map(
    keys.map((k) => [k.name, { completion: empty(), prompt: empty(), requests: empty() }]),
  )
  const nodeBounds = new Map<string, Bounds>()
  let inFlightAtFederationKill = 0
  let receivedTokensAtFederationKill = 0
  for (const r of answered) {
    const k = keyBounds.get(r.keyName)
    if (k == null) continue
    let node = nodeBounds.get(r.node ?? '')
    if (node == null) {
      node = empty()
      nodeBounds.set(r.node ?? '', node)
    }
    const prompt = r.promptTokens ?? 0
    if (atKill(r)) {
      inFlightAtFederationKill++
      if (!r.ok) receivedTokensAtFederationKill += r.tokens
      // A streamed answer's records are written each turn: at most the last turn's are lost.
      const least = r.stream ? Math.max(0, r.tokens - lastTurnTokens) : 0
      k.completion.min += least
      k.completion.max += r.tokens
      k.prompt.max += r.ok ? prompt : 0
      k.requests.max += 1
      node.min += least
      node.max += r.tokens
    } else if (gaveUp(r)) {
      k.completion.min += r.tokens
      k.completion.max += r.maxTokens
      k.prompt.max += prompt
      k.requests.min += 1
      k.requests.max += 1
      node.min += r.tokens
      node.max += r.maxTokens
    } else {
      k.completion.exact += r.tokens
      k.prompt.exact += prompt
      k.requests.exact += 1
      node.exact += r.tokens
    }
  }
  // Requests that never got a head (connection errors, error answers) are never billed; their client
  // giving up while the gateway still waited may still leave a record of the partial relay.
  for (const r of records) {
    if (r.headersAt == null && r.failure?.kind === 'timeout') {
      const k = keyBounds.get(r.keyName)
      if (k != null) {
        k.completion.max += r.maxTokens
        k.requests.max += 1
      }
    }
  }
  const byKeyId = new Map(keys.map((k) => [k.id, k.name]))
  for (const u of ledger.usage) {
    const name = byKeyId.get(u.keyId)
    const k = name != null ? keyBounds.get(name) : undefined
    if (k == null) {
      violations.push(`the ledger bills key ${u.keyId}, which no client of this run used`)
      continue
    }
    k.completion.billed += u.completionTokens
    k.prompt.billed += u.promptTokens
    k.requests.billed += u.requests
  }
  for (const c of ledger.credits) {
    let node = nodeBounds.get(c.node)
    if (node == null) {
      node = empty()
      nodeBounds.set(c.node, node)
    }
    node.billed += c.completionTokens
  }
  const perKey = [...keyBounds].map(([key, b]) => ({ key, ...b }))
  for (const k of perKey) {
    for (const what of ['completion', 'prompt', 'requests'] as const) {
      const b = k[what]
      if (!within(b)) {
        violations.push(
          `key ${k.key}: the ledger bills ${b.billed} ${what === 'requests' ? 'requests' : `${what} tokens`}, clients received ${b.exact}` +
            (b.max > 0 || b.min > 0 ? ` (+${b.min}..${b.max} uncertain)` : ''),
        )
      }
    }
  }
  const perNode = [...nodeBounds].map(([node, completion]) => ({ node, completion }))
  for (const n of perNode) {
    if (!within(n.completion)) {
      const b = n.completion
      violations.push(
        `node ${n.node || '(none)'}: credited ${b.billed} tokens, clients received ${b.exact} from it` +
          (b.max > 0 || b.min > 0 ? ` (+${b.min}..${b.max} uncertain)` : ''),
      )
    }
  }
  const billedCompletion = ledger.usage.reduce((n, u) => n + u.completionTokens, 0)
  const creditedCompletion = ledger.credits.reduce((n, c) => n + c.completionTokens, 0)
  if (billedCompletion !== creditedCompletion) {
    violations.push(`keys are billed ${billedCompletion} tokens but nodes credited ${creditedCompletion}`)
  }
  return {
    perKey,
    perNode,
    billedCompletion,
    creditedCompletion,
    inFlightAtFederationKill,
    receivedTokensAtFederationKill,
    violations,
  }
}

export interface Recovery {
  faultId: number
  kind: FaultKind
  target: string
  /** From the fault to the end of the first request through the affected part that succeeded after it. */
  faultToRecoveryMs: number | null
  /** From the restart, heal or delay change to that success. */
  restoreToRecoveryMs: number | null
}

/** Whether a request went through the part a fault hit: any (gateway), its region (head), its node. */
export function wentThrough(f: FaultEvent, r: RequestRecord): boolean {
  if (f.kind === 'federation-kill') return true
  if (f.kind === 'head-kill') return r.region === f.region
  return r.node === f.nodePeerId
}

/** The first success through the part a fault affected, for each fault. */
export function recoveries(records: RequestRecord[], faults: FaultEvent[]): Recovery[] {
  const byEnd = [...records].filter((r) => r.ok).sort((a, b) => a.end - b.end)
  return faults.map((f) => {
    const after = f.kind === 'slow-link' ? f.injectedAt : (f.restoredAt ?? Number.POSITIVE_INFINITY)
    const first = byEnd.find((r) => r.start >= f.injectedAt && r.end >= after && wentThrough(f, r))
    return {
      faultId: f.id,
      kind: f.kind,
      target: f.target,
      faultToRecoveryMs: first != null ? Math.round(first.end - f.injectedAt) : null,
      restoreToRecoveryMs:
        first != null && f.restoredAt != null ? Math.round(first.end - f.restoredAt) : null,
    }
  })
}
