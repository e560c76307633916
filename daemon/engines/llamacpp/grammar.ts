import { createHash } from 'node:crypto'
import { dirname, join } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import type { GbnfJsonSchema, Llama, LlamaGrammar } from 'node-llama-cpp'
import { formatPatterns, patternGrammar } from './regex-grammar.ts'

/**
 * Grammars for structured output and tool calls, and the patches of node-llama-cpp's grammar
 * compiler the engine needs. They reach into modules the package does not export: `grammarPatched`
 * says whether all took hold (json-schema.ts refuses what depends on them otherwise), and a test
 * fails when an upgrade moves them.
 *
 * - Numbers: node-llama-cpp writes `digits ([eE] [-+]? digits{0,16})?`, so a random or weak model
 *   writes `9950E+993589`, which JSON.parse reads as Infinity (an "integer" that is not one). The
 *   patch writes integers without an exponent and with at most 15 digits (inside JavaScript's safe
 *   integers), and fractions with an exponent of at most two digits.
 * - Strings with a format: node-llama-cpp knows date, time and date-time, and its date allows
 *   February 30. The patch writes each format of regex-grammar.ts strictly, and a `pattern` as the
 *   format `pattern /REGEX/` (json-schema.ts writes it so; the chat wrapper shows it to the model as
 *   "format: pattern /REGEX/", which reads well).
 * - Tool-call parameters: node-llama-cpp checks parsed parameters against the schema and knows no
 *   format but its three; the grammar already guaranteed them, so formats are left out of that check.
 */

export let grammarPatched = false

const integerRule = '"-"? ("0" | [1-9] [0-9]{0,14})'
const fractionalRule = `${integerRule} ("." [0-9]{1,15})? ([eE] [-+]? [0-9]{1,2})?`
const patternFormat = /^pattern \/(.*)\/$/s

/** The format json-schema.ts writes for a `pattern`. */
export function formatForPattern(pattern: string): string {
  return `pattern /${pattern}/`
}

/** The pattern a string format stands for, when the patched grammar writes it (null: not ours). */
function patternOf(format: unknown): string | null {
  if (typeof format !== 'string') return null
  const m = patternFormat.exec(format)
  return m != null ? m[1]! : (formatPatterns[format] ?? null)
}

/** The schema with every string format left out (what the tool-call parameter check reads). */
function withoutFormats(schema: unknown): unknown {
  if (Array.isArray(schema)) return schema.map(withoutFormats)
  if (schema == null || typeof schema !== 'object') return schema
  const out: Record<string, unknown> = {}
  for (const [k, v] of Object.entries(schema)) {
    if (k === 'format' && typeof v === 'string' && patternOf(v) != null) continue
    out[k] = k === 'const' || k === 'enum' ? v : withoutFormats(v)
  }
  return out
}

async function load<T>(dist: string, ...path: string[]): Promise<T> {
  return (await import(pathToFileURL(join(dist, ...path)).href)) as T
}

let patching: Promise<void> | null = null

/** Patches node-llama-cpp's grammar compiler once (every grammar made afterwards has it). */
export function patchGrammars(): Promise<void> {
  patching ??= (async () => {
    try {
      // The package's entry is dist/index.js; the modules sit beside it.
      const dist = dirname(fileURLToPath(import.meta.resolve('node-llama-cpp')))
      const numbers = (
        await load<{ GbnfNumber?: { prototype: { getGrammar(): string; allowFractional?: boolean } } }>(
          dist,
          'utils/gbnfJson/terminals/GbnfNumber.js',
        )
      ).GbnfNumber?.prototype
      type FormatTerminal = {
        format: string
        getGrammar(g: unknown): string
        getRuleName(g: unknown): string
      }
      const strings = (
        await load<{ GbnfFormatString?: { prototype: FormatTerminal } }>(
          dist,
          'utils/gbnfJson/terminals/GbnfFormatString.js',
        )
      ).GbnfFormatString?.prototype
      type ParamsGrammar = { _paramsSchema: unknown; parseParams(text: string): unknown }
      const params = (
        await load<{ FunctionCallParamsGrammar?: { prototype: ParamsGrammar } }>(
          dist,
          'evaluator/LlamaChat/utils/FunctionCallParamsGrammar.js',
        )
      ).FunctionCallParamsGrammar?.prototype
      if (
        typeof numbers?.getGrammar !== 'function' ||
        typeof strings?.getGrammar !== 'function' ||
        typeof strings.getRuleName !== 'function' ||
        typeof params?.parseParams !== 'function'
      )
        return
      numbers.getGrammar = function (this: { allowFractional?: boolean }): string {
        return this.allowFractional === false ? integerRule : fractionalRule
      }
      const stringGrammar = strings.getGrammar
      const stringRuleName = strings.getRuleName
      strings.getGrammar = function (this: FormatTerminal, g: unknown): string {
        const pattern = patternOf(this.format)
        return pattern == null ? stringGrammar.call(this, g) : `"\\"" (${patternGrammar(pattern)}) "\\""`
      }
      strings.getRuleName = function (this: FormatTerminal, g: unknown): string {
        if (patternOf(this.format) == null) return stringRuleName.call(this, g)
        return `string-format-${createHash('sha256').update(this.format).digest('hex').slice(0, 16)}-rule`
      }
      const parseParams = params.parseParams
      const checked = new WeakMap<object, unknown>()
      params.parseParams = function (this: ParamsGrammar, text: string): unknown {
        const schema = this._paramsSchema
        if (schema == null || typeof schema !== 'object') return parseParams.call(this, text)
        if (!checked.has(schema)) checked.set(schema, withoutFormats(schema))
        this._paramsSchema = checked.get(schema)
        try {
          return parseParams.call(this, text)
        } finally {
          this._paramsSchema = schema
        }
      }
      grammarPatched = true
    } catch {
      // A module moved: grammars keep node-llama-cpp's own rules (grammarPatched stays false).
    }
  })()
  return patching
}

/** Grammars by schema, made once: compiling one costs more than a short generation. */
export class GrammarCache {
  readonly #llama: Llama
  readonly #grammars = new Map<string, Promise<LlamaGrammar>>()
  readonly #max: number

  constructor(llama: Llama, max = 64) {
    this.#llama = llama
    this.#max = max
  }

  /** Any JSON object (response_format json_object). */
  jsonObject(): Promise<LlamaGrammar> {
    return this.#get('json', () => this.#llama.getGrammarFor('json'))
  }

  /** JSON valid against a schema already in the grammar's subset (json-schema.ts). */
  jsonSchema(schema: GbnfJsonSchema): Promise<LlamaGrammar> {
    return this.#get(JSON.stringify(schema), () =>
      this.#llama.createGrammarForJsonSchema(schema as Parameters<Llama['createGrammarForJsonSchema']>[0]),
    )
  }

  #get(key: string, make: () => Promise<LlamaGrammar>): Promise<LlamaGrammar> {
    let grammar = this.#grammars.get(key)
    if (grammar == null) {
      if (this.#grammars.size >= this.#max) this.#grammars.delete(this.#grammars.keys().next().value!)
      grammar = patchGrammars().then(make)
      grammar.catch(() => this.#grammars.delete(key))
      this.#grammars.set(key, grammar)
    }
    return grammar
  }
}
