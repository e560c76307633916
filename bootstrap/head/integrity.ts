import { randomUUID } from 'node:crypto'
import { peerIdFromString } from '@libp2p/peer-id'
import { TypedEventEmitter } from 'main-event'
import type { Logger } from '../../core/logger.ts'
import { sendInferRequest } from '../../mesh/infer-protocol.ts'
import type { MeshNode } from '../../mesh/node.ts'
import { type IntegrityStanding, integrityReasonMaxLength } from '../../mesh/telemetry-protocol.ts'
import { chatCompletionsPath } from '../../openai/endpoints.ts'
import {
  AnswerCapture,
  type AnswerJudgement,
  buildSample,
  defaultSampleRate,
  type IntegritySample,
  type JudgeOptions,
  judgeAnswer,
  probationSampleRate,
  readScores,
  samplingOf,
  scoringRequest,
} from '../../openai/integrity.ts'
import { readText } from '../../openai/proxy.ts'
import type { VerifiedThroughput } from '../../openai/usage.ts'
import type { RegionalRouter } from '../../routing/node-router.ts'
import type { NodeRegistry } from './registry.ts'

/**
 * The head's side of result integrity (docs/integrity.md): it takes samples of answers (from its
 * own relay, or shipped by whoever relayed them), has a verifier re-score each one, keeps each
 * node's reputation as a sequential test over the verdicts, and quarantines a node whose failures
 * are beyond chance: the router skips it, its unverified tokens are held back, and it is listed in
 * /health, /metrics and its own telemetry answers. A quarantined node that joins again appeals:
 * the head sends it a burst of requests of its own, each checked; passing them all puts it back on
 * probation.
 */

/** Honest answers fail at most this often (the statistic's alpha is far below; the rest is slack). */
export const honestFailRate = 0.002
/** What a cheating node's answers fail at, at least (one that cheats on a fifth of them, and is caught). */
export const cheatFailRate = 0.15
/** Quarantine when the evidence reaches this log-likelihood ratio (odds of 10^4 to 1). */
export const quarantineLlr = Math.log(1e4)
const failStep = Math.log(cheatFailRate / honestFailRate)
const passStep = Math.log((1 - cheatFailRate) / (1 - honestFailRate))

/** The sequential test's step (a CUSUM of the SPRT's log-likelihood ratio, floored at 0). */
export function nextLlr(llr: number, verdict: 'pass' | 'fail'): number {
  return verdict === 'pass' ? Math.max(0, llr + passStep) : llr + failStep
}

/** Passed checks that end a node's probation: a cheat on a fifth of its answers passes 20 with odds of 1 in 87. */
export const defaultProbationChecks = 20

export type IntegrityState = 'probation' | 'established' | 'quarantined' | 'appeal'

export interface NodeIntegrity {
  node: string
  state: IntegrityState
  /** The sequential test's evidence against the node (0: none). */
  llr: number
  checks: number
  passes: number
  fails: number
  inconclusive: number
  /** When the state began (ms since the epoch). */
  since: number
  /** Why the node is quarantined (null otherwise). */
  reason: string | null
  /** Tokens credited since the node's last passed check: held back while it is quarantined. */
  unverifiedTokens: number
  /** Held back at the quarantine. */
  heldTokens: number
  lastFailure: { requestId: string; tokens: number; outside: number; pValue: number } | null
}

export interface IntegrityEvents {
  'integrity:check': CustomEvent<{
    node: string
    requestId: string
    verifier: string
    judgement: AnswerJudgement
    counted: 'pass' | 'fail' | 'inconclusive'
  }>
  'integrity:state': CustomEvent<NodeIntegrity>
}

export interface TrustedEngine {
  /** An OpenAI-compatible engine the coordinator runs (vLLM, or `garage engine`'s embedded one). */
  url: string
  apiKey: string
  /** The models it serves (the names requests use). */
  models: string[]
}

export interface IntegrityCheckerInit {
  region: string
  /** Share of an established node's answers that are checked (default 2%). */
  sampleRate?: number
  /** Share while a node is on probation or under suspicion (default 50%). */
  probationRate?: number
  /** Passed checks that end a node's probation (default 20). */
  probationChecks?: number
  /** Requests of the head's own an appealing node must pass, every one (default 8). */
  appealChecks?: number
  trusted?: TrustedEngine | null
  /** The vocabulary size of a model, where the policy says. */
  vocabularySize?: (model: string) => number | undefined
  judge?: JudgeOptions
  /** One verifier call's deadline. */
  timeoutMs?: number
  /** Checks running at once; samples past `maxQueued` waiting are dropped (counted). */
  concurrency?: number
  maxQueued?: number
  logger: Logger
  random?: () => number
  now?: () => number
}

export interface IntegrityCheckerComponents {
  node: MeshNode | null
  registry: NodeRegistry
  router: RegionalRouter
  verified: VerifiedThroughput
  /** garage_head_integrity_checks_total{result}. */
  checks: { inc(labels: { result: string }): void }
}

/** Where a verifier is reached. */
type Verifier = { kind: 'peer'; peer: string } | { kind: 'trusted'; engine: TrustedEngine }

export class IntegrityChecker extends TypedEventEmitter<IntegrityEvents> {
  readonly #init: IntegrityCheckerInit
  readonly #c: IntegrityCheckerComponents
  readonly #nodes = new Map<string, NodeIntegrity>()
  readonly #queue: IntegritySample[] = []
  #running = 0
  readonly #abort = new AbortController()
  /** Resolves when no check runs or waits (tests and the bench wait on it). */
  #idle: Array<() => void> = []
  readonly #random: () => number
  readonly #now: () => number

  constructor(init: IntegrityCheckerInit, components: IntegrityCheckerComponents) {
    super()
    this.#init = init
    this.#c = components
    this.#random = init.random ?? Math.random
    this.#now = init.now ?? Date.now
  }

  /** Follows the registry: a quarantined node that joins again appeals. */
  start(): void {
    this.#c.registry.addEventListener('node:joined', this.#onJoined)
  }

  stop(): void {
    this.#c.registry.removeEventListener('node:joined', this.#onJoined)
    this.#abort.abort()
    this.#queue.length = 0
  }

  #onJoined = (evt: CustomEvent<{ peerId: string }>): void => {
    const entry = this.#nodes.get(evt.detail.peerId)
    if (entry?.state !== 'quarantined') return
    this.#set(entry, { state: 'appeal' })
    this.#c.router.hold(entry.node, true)
    void this.#appeal(entry.node)
  }

  /** The share of `node`'s answers to check now. */
  rateFor(node: string): number {
    const e = this.#nodes.get(node)
    if (e == null) return this.#init.probationRate ?? probationSampleRate
    if (e.state === 'quarantined' || e.state === 'appeal') return 0
    if (e.state === 'probation' || e.llr > 0) return this.#init.probationRate ?? probationSampleRate
    return this.#init.sampleRate ?? defaultSampleRate
  }

  /** The node's standing; a node the head has not checked yet is on probation. */
  status(node: string): NodeIntegrity {
    return this.#nodes.get(node) ?? this.#fresh(node)
  }

  /** What the node is told in its telemetry answers: null in good standing. */
  standing(node: string): IntegrityStanding | null {
    const e = this.#nodes.get(node)
    if (e == null || (e.state !== 'quarantined' && e.state !== 'appeal')) return null
    return {
      state: e.state,
      reason: (e.state === 'appeal'
        ? 'appealing: passing a burst of checks'
        : (e.reason ?? 'quarantined')
      ).slice(0, integrityReasonMaxLength),
    }
  }

  quarantined(): NodeIntegrity[] {
    return [...this.#nodes.values()].filter((e) => e.state === 'quarantined' || e.state === 'appeal')
  }

  snapshot(): NodeIntegrity[] {
    return [...this.#nodes.values()]
  }

  /** Tokens the head credited `node` for an answer (held back if it is quarantined later). */
  credited(node: string, tokens: number): void {
    if (tokens > 0) this.#entry(node).unverifiedTokens += tokens
  }

  /**
   * Takes one sampled answer (see openai/integrity.ts): it is re-scored in the background. Returns
   * false when it was dropped (the queue is full, or the node is not being checked).
   */
  consider(sample: IntegritySample): boolean {
    const e = this.#nodes.get(sample.node)
    if (e != null && (e.state === 'quarantined' || e.state === 'appeal')) return false
    if (this.#queue.length >= (this.#init.maxQueued ?? 64)) {
      this.#c.checks.inc({ result: 'dropped' })
      return false
    }
    this.#queue.push(sample)
    this.#pump()
    return true
  }

  /** Resolves once no check runs or waits. */
  idle(): Promise<void> {
    if (this.#running === 0 && this.#queue.length === 0) return Promise.resolve()
    return new Promise((resolve) => this.#idle.push(resolve))
  }

  #pump(): void {
    while (this.#running < (this.#init.concurrency ?? 4) && this.#queue.length > 0) {
      const sample = this.#queue.shift()!
      this.#running++
      void this.#check(sample)
        .catch((err: unknown) => this.#init.logger.warn({ err, node: sample.node }, 'integrity check failed'))
        .finally(() => {
          this.#running--
          this.#pump()
          if (this.#running === 0 && this.#queue.length === 0) for (const f of this.#idle.splice(0)) f()
        })
    }
  }

  /** Re-scores a sample; a failure from a peer is confirmed by a second verifier before it counts. */
  async #check(sample: IntegritySample): Promise<'pass' | 'fail' | 'inconclusive'> {
    const first = this.#pickVerifier(sample.model, [sample.node])
    if (first == null) {
      this.#c.checks.inc({ result: 'no_verifier' })
      return 'inconclusive'
    }
    let judgement = await this.#score(first, sample)
    let counted: 'pass' | 'fail' | 'inconclusive' = judgement?.verdict ?? 'inconclusive'
    if (counted === 'fail' && first.kind === 'peer') {
      // A verifier may be the cheat (it would fail honest answers): another one must agree.
      const second = this.#pickVerifier(sample.model, [sample.node, first.peer], true)
      if (second == null && this.#anyEstablished(sample.model)) counted = 'inconclusive'
      else if (second != null) {
        const again = await this.#score(second, sample)
        if (again?.verdict !== 'fail') counted = 'inconclusive'
        else judgement = again
      }
    }
    if (this.#abort.signal.aborted) return counted
    this.#c.checks.inc({ result: counted })
    if (judgement != null)
      this.safeDispatchEvent('integrity:check', {
        detail: {
          node: sample.node,
          requestId: sample.requestId,
          verifier: first.kind === 'peer' ? first.peer : 'trusted',
          judgement,
          counted,
        },
      })
    this.#record(sample, counted, judgement)
    return counted
  }

  #record(
    sample: IntegritySample,
    verdict: 'pass' | 'fail' | 'inconclusive',
    j: AnswerJudgement | null,
  ): void {
    const e = this.#entry(sample.node)
    if (e.state === 'quarantined') return
    e.checks++
    if (verdict === 'inconclusive') {
      e.inconclusive++
      return
    }
    if (e.state === 'appeal') {
      // The appeal's own bookkeeping decides (#appeal).
      if (verdict === 'pass') e.passes++
      else e.fails++
      return
    }
    if (verdict === 'pass') {
      e.passes++
      e.llr = nextLlr(e.llr, 'pass')
      e.unverifiedTokens = 0
      if (
        e.state === 'probation' &&
        e.passes >= (this.#init.probationChecks ?? defaultProbationChecks) &&
        e.llr === 0
      )
        this.#set(e, { state: 'established' })
      return
    }
    e.fails++
    e.llr = nextLlr(e.llr, 'fail')
    e.lastFailure = {
      requestId: sample.requestId,
      tokens: j?.tokens ?? 0,
      outside: j?.outside ?? 0,
      pValue: j?.pValue ?? 0,
    }
    if (e.llr >= quarantineLlr) {
      this.#quarantine(
        e,
        `${e.fails} of ${e.passes + e.fails} checked answers were unlikely under ${sample.model} ` +
          `(last: ${e.lastFailure.outside} of ${e.lastFailure.tokens} tokens outside the verifier's top ${5}, p = ${e.lastFailure.pValue.toExponential(1)})`,
      )
    }
  }

  #quarantine(e: NodeIntegrity, reason: string): void {
    this.#set(e, { state: 'quarantined', reason, heldTokens: e.heldTokens + e.unverifiedTokens })
    e.unverifiedTokens = 0
    this.#c.router.hold(e.node, true)
    this.#init.logger.warn(
      { node: e.node, reason, heldTokens: e.heldTokens },
      'node quarantined: its answers fail integrity checks',
    )
  }

  /** Appeal: `appealChecks` requests of the head's own, each re-scored; all must pass. */
  async #appeal(node: string): Promise<void> {
    const e = this.#entry(node)
    const model = this.#c.registry.get(node)?.assignment.model
    const n = this.#init.appealChecks ?? 8
    let passed = 0
    let attempts = 0
    let failed = false
    // Inconclusive checks (no verifier free, a timeout) are tried again, within a bound.
    while (passed < n && !failed && attempts < n * 3 && !this.#abort.signal.aborted) {
      attempts++
      if (model == null || this.#c.registry.get(node) == null) return
      const sample = await this.#challenge(node, model, attempts).catch(() => null)
      if (sample == null) {
        failed = true
        break
      }
      const verdict = await this.#check(sample)
      if (verdict === 'pass') passed++
      else if (verdict === 'fail') failed = true
    }
    if (passed < n) failed = true
    if (this.#abort.signal.aborted || e.state !== 'appeal') return
    if (failed) {
      this.#set(e, {
        state: 'quarantined',
        reason: `${e.reason ?? ''}; the appeal failed`.replace(/^; /, ''),
      })
      this.#init.logger.warn({ node }, 'appeal failed: the node stays quarantined')
      return
    }
    this.#set(e, { state: 'probation', reason: null, llr: 0, passes: 0, fails: 0 })
    this.#c.router.hold(node, false)
    this.#init.logger.info({ node, checks: n }, 'appeal passed: the node is back, on probation')
  }

  /** A request of the head's own to `node`, answered and captured as a sample. */
  async #challenge(node: string, model: string, i: number): Promise<IntegritySample | null> {
    const words = ['garden', 'river', 'engine', 'window', 'market', 'signal', 'forest', 'letter', 'bridge']
    const pick = (): string => words[Math.floor(this.#random() * words.length)]!
    const request = {
      model,
      messages: [{ role: 'user', content: `Tell me about the ${pick()} and the ${pick()} (${i}).` }],
      max_tokens: 32,
      temperature: Math.round(this.#random() * 10) / 10,
    }
    const requestId = `appeal-${randomUUID()}`
    const answer = await this.#post({ kind: 'peer', peer: node }, chatCompletionsPath, request, requestId)
    if (answer == null) return null
    const capture = new AnswerCapture()
    capture.feedBody(answer)
    const output = capture.output()
    if (output == null) return null
    return buildSample({ model, node, endpoint: 'chat', request, output, requestId, at: this.#now() })
  }

  async #score(verifier: Verifier, sample: IntegritySample): Promise<AnswerJudgement | null> {
    const { path, body } = scoringRequest(sample)
    const answer = await this.#post(verifier, path, body, `integrity-${sample.requestId}`)
    if (answer == null) return null
    // vLLM generates the one token it must: nobody sees it, it is allowed for and never credited.
    if (verifier.kind === 'peer') this.#c.verified.abandoned(verifier.peer, 1)
    try {
      const scores = readScores(answer, sample.output.text)
      const vocabularySize = this.#init.vocabularySize?.(sample.model)
      return judgeAnswer(scores, samplingOf(sample.request), {
        ...this.#init.judge,
        ...(vocabularySize != null ? { vocabularySize } : {}),
      })
    } catch (err) {
      this.#init.logger.debug({ err: (err as Error).message }, 'the verifier answered no usable scores')
      return null
    }
  }

  /** A verifier call: over the mesh to a peer (no billing, no credits), or HTTP to the trusted engine. */
  async #post(verifier: Verifier, path: string, body: unknown, requestId: string): Promise<unknown> {
    const signal = AbortSignal.any([this.#abort.signal, AbortSignal.timeout(this.#init.timeoutMs ?? 30_000)])
    const bytes = Buffer.from(JSON.stringify(body))
    try {
      if (verifier.kind === 'trusted') {
        const res = await fetch(`${verifier.engine.url.replace(/\/$/, '')}${path}`, {
          method: 'POST',
          headers: {
            'content-type': 'application/json',
            authorization: `Bearer ${verifier.engine.apiKey}`,
            'x-request-id': requestId,
          },
          body: bytes,
          signal,
        })
        const text = await res.text()
        return res.status === 200 ? JSON.parse(text) : null
      }
      const { node } = this.#c
      if (node == null) return null
      const response = await sendInferRequest(
        node,
        peerIdFromString(verifier.peer),
        {
          method: 'POST',
          path,
          headers: [
            ['content-type', 'application/json'],
            ['x-request-id', requestId],
          ],
          body: bytes,
        },
        { signal },
      )
      const text = await readText(response, 8 * 1024 * 1024)
      return response.status === 200 ? JSON.parse(text) : null
    } catch (err) {
      this.#init.logger.debug({ err: (err as Error).message, requestId }, 'verifier call failed')
      return null
    }
  }

  /**
   * The trusted engine when it serves the model; else a random serving peer, never one of `not`,
   * from the most trusted tier there is: established nodes, then nodes without evidence against
   * them, then any. `confirming`: only the first two tiers when they have anyone (a failure counts
   * only when a node the head trusts agrees).
   */
  #pickVerifier(model: string, not: string[], confirming = false): Verifier | null {
    const trusted = this.#init.trusted
    if (trusted?.models.includes(model)) return { kind: 'trusted', engine: trusted }
    const candidates = this.#c.registry
      .nodes()
      .filter((n) => n.assignment.model === model && n.state === 'serving' && !not.includes(n.peerId))
      .map((n) => this.#nodes.get(n.peerId) ?? this.#fresh(n.peerId))
      .filter((e) => e.state !== 'quarantined' && e.state !== 'appeal')
    const tiers = [
      candidates.filter((e) => e.state === 'established' && e.llr === 0),
      candidates.filter((e) => e.llr === 0),
      candidates,
    ]
    const tier = tiers.find((t) => t.length > 0)
    if (tier == null) return null
    if (confirming && tiers[0]!.length === 0 && this.#anyEstablished(model)) return null
    const pick = tier[Math.floor(this.#random() * tier.length)]!
    return { kind: 'peer', peer: pick.node }
  }

  #anyEstablished(model: string): boolean {
    return this.#c.registry
      .nodes()
      .some((n) => n.assignment.model === model && this.#nodes.get(n.peerId)?.state === 'established')
  }

  #fresh(node: string): NodeIntegrity {
    return {
      node,
      state: 'probation',
      llr: 0,
      checks: 0,
      passes: 0,
      fails: 0,
      inconclusive: 0,
      since: this.#now(),
      reason: null,
      unverifiedTokens: 0,
      heldTokens: 0,
      lastFailure: null,
    }
  }

  #entry(node: string): NodeIntegrity {
    let e = this.#nodes.get(node)
    if (e == null) {
      e = this.#fresh(node)
      this.#nodes.set(node, e)
    }
    return e
  }

  #set(e: NodeIntegrity, change: Partial<NodeIntegrity>): void {
    const state = change.state ?? e.state
    Object.assign(e, change, state !== e.state ? { since: this.#now() } : {})
    this.safeDispatchEvent('integrity:state', { detail: { ...e } })
  }
}
