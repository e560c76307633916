import type { GbnfJsonSchema } from 'node-llama-cpp'
import { apiError } from '../../../core/errors.ts'
import { isPlainObject } from '../../../core/guards.ts'
import { formatForPattern, grammarPatched } from './grammar.ts'
import { formatPatterns, PatternError, patternGrammar } from './regex-grammar.ts'

/**
 * A JSON Schema (as clients send it: draft-07 or 2020-12, with `$schema`, `title`, `required`...)
 * turned into the subset node-llama-cpp's grammar compiler reads, so that whatever the grammar lets
 * the model write is valid against the original schema. What the grammar cannot guarantee is refused
 * with a 400 naming the keyword and where it is, never silently dropped: node-llama-cpp itself turns
 * unknown schema features into `null`.
 *
 * How each keyword maps (docs/api.md has the table):
 * - annotations (`$schema`, `title`, `description`, `examples`, `default`...) are dropped;
 * - `required` is dropped: the grammar writes every declared property, which any `required` allows;
 * - `additionalProperties: false | true` is dropped (the grammar writes no extra property, which both
 *   allow); a schema for it is kept when there are no declared properties (a map);
 * - `anyOf` becomes `oneOf` (an instance of one branch satisfies anyOf); `allOf` of one schema is that
 *   schema; `definitions` becomes `$defs`; `nullable: true` and `type: [T, "null"]` become a choice;
 * - integers and numbers are written with at most 15 digits (grammar.ts), so `minimum`/`maximum`
 *   outside ±(10^15 - 1) (zod's safe-integer bounds) are already met and accepted;
 * - `pattern` is compiled to grammar (regex-grammar.ts: no lookaround, backreferences or word
 *   boundaries); beside a `format` the pattern is followed; `format` alone is written strictly for
 *   date, time, date-time, uuid, ipv4, hostname, email and uri (a safe subset of the last three).
 */

/** Numbers the patched grammar writes stay strictly inside this bound. */
const grammarNumberBound = 10 ** 15 - 1
const maxDepth = 64

const annotations = new Set([
  '$schema',
  '$id',
  '$comment',
  '$anchor',
  'title',
  'description',
  'examples',
  'default',
  'deprecated',
  'readOnly',
  'writeOnly',
  'nullable',
  'strict',
])
const primitives = new Set(['string', 'number', 'integer', 'boolean', 'null'])
const jsonTypes = new Set([...primitives, 'object', 'array'])

type Json = Record<string, unknown>

class Converter {
  readonly #param: string
  readonly #defs = new Map<string, GbnfJsonSchema>()
  readonly #source: Json

  constructor(param: string, source: Json) {
    this.#param = param
    this.#source = source
  }

  /** The schema was not valid JSON Schema. */
  invalid(path: string, why: string): never {
    throw apiError('invalid_value', `${this.#param} is not a valid JSON Schema: ${why} at ${path || '/'}`, {
      param: this.#param,
    })
  }

  /** Valid, but the grammar cannot guarantee it. */
  unsupported(path: string, what: string): never {
    throw apiError(
      'unsupported_value',
      `${this.#param}: ${what} at ${path || '/'} cannot be enforced by the embedded engine's grammar; remove it or use a model served by vLLM`,
      { param: this.#param },
    )
  }

  root(): GbnfJsonSchema {
    const out = this.convert(this.#source, '', 0) as Record<string, unknown>
    if (this.#defs.size > 0) out.$defs = Object.fromEntries(this.#defs)
    return out as GbnfJsonSchema
  }

  convert(node: unknown, path: string, depth: number): GbnfJsonSchema {
    if (depth > maxDepth) this.unsupported(path, `nesting deeper than ${maxDepth}`)
    if (node === true || (isPlainObject(node) && Object.keys(node).every((k) => annotations.has(k))))
      this.unsupported(path, 'a schema that allows any value')
    if (node === false) this.unsupported(path, 'a schema that allows no value (false)')
    if (!isPlainObject(node)) this.invalid(path, 'a schema must be an object')
    const s = node
    for (const key of Object.keys(s)) {
      if (annotations.has(key) || key.startsWith('x-')) continue
      if (!known.has(key)) this.unsupported(path, `the keyword ${JSON.stringify(key)}`)
    }
    if (s.nullable === true) {
      const { nullable: _, ...rest } = s
      return { oneOf: [this.convert(rest, path, depth + 1), { type: 'null' }] } as GbnfJsonSchema
    }
    if (typeof s.$ref === 'string') return this.ref(s, path, depth)
    if (s.const !== undefined) return { const: this.literal(s.const, `${path}/const`) } as GbnfJsonSchema
    if (s.enum !== undefined) {
      if (!Array.isArray(s.enum) || s.enum.length === 0)
        this.invalid(`${path}/enum`, 'enum must be a non-empty list')
      return { enum: s.enum.map((v, i) => this.literal(v, `${path}/enum/${i}`)) } as GbnfJsonSchema
    }
    for (const key of ['anyOf', 'oneOf'] as const) {
      const list = s[key]
      if (list === undefined) continue
      if (!Array.isArray(list) || list.length === 0)
        this.invalid(`${path}/${key}`, `${key} must be a non-empty list`)
      if (s.type !== undefined || s.properties !== undefined)
        this.unsupported(path, `${key} beside type or properties`)
      return {
        oneOf: list.map((b, i) => this.convert(b, `${path}/${key}/${i}`, depth + 1)),
      } as GbnfJsonSchema
    }
    if (s.allOf !== undefined) {
      if (!Array.isArray(s.allOf) || s.allOf.length === 0)
        this.invalid(`${path}/allOf`, 'allOf must be a non-empty list')
      if (s.allOf.length > 1) this.unsupported(`${path}/allOf`, 'allOf with more than one schema')
      return this.convert(s.allOf[0], `${path}/allOf/0`, depth + 1)
    }
    if (s.$defs !== undefined || s.definitions !== undefined) {
      if (depth > 0) this.unsupported(path, '$defs below the top level')
    }
    let type = s.type
    if (type === undefined) {
      if (s.properties !== undefined || s.additionalProperties !== undefined) type = 'object'
      else if (s.items !== undefined || s.prefixItems !== undefined) type = 'array'
      else this.unsupported(path, 'a schema without a type')
    }
    if (Array.isArray(type)) {
      if (type.length === 0 || type.some((t) => typeof t !== 'string' || !jsonTypes.has(t)))
        this.invalid(`${path}/type`, `type ${JSON.stringify(type)} is not a list of JSON Schema types`)
      if (type.every((t) => primitives.has(t as string))) {
        if (type.length === 1) return this.typed(s, type[0] as string, path, depth)
        for (const t of type) if (t !== 'null') this.typed(s, t as string, path, depth)
        return { type } as GbnfJsonSchema
      }
      return { oneOf: type.map((t) => this.typed(s, t as string, path, depth)) } as GbnfJsonSchema
    }
    if (typeof type !== 'string' || !jsonTypes.has(type))
      this.invalid(`${path}/type`, `${JSON.stringify(type)} is not a JSON Schema type`)
    return this.typed(s, type, path, depth)
  }

  literal(v: unknown, path: string): string | number | boolean | null {
    if (v === null || typeof v === 'string' || typeof v === 'boolean') return v
    if (typeof v === 'number' && Number.isFinite(v)) return v
    return this.unsupported(path, 'an object or list as a const or enum value')
  }

  ref(s: Json, path: string, depth: number): GbnfJsonSchema {
    const ref = s.$ref as string
    const m = /^#\/(\$defs|definitions)\/([^/]+)$/.exec(ref)
    if (m == null)
      this.unsupported(`${path}/$ref`, `the reference ${JSON.stringify(ref)} (only #/$defs/NAME)`)
    const [, bucket, name] = m
    const defs = this.#source[bucket!]
    if (!isPlainObject(defs) || defs[name!] === undefined)
      this.invalid(`${path}/$ref`, `${ref} names no definition`)
    if (!this.#defs.has(name!)) {
      // Registered before converting, so a recursive reference finds it.
      this.#defs.set(name!, {} as GbnfJsonSchema)
      this.#defs.set(name!, this.convert(defs[name!], `/${bucket}/${name}`, depth + 1))
    }
    return { $ref: `#/$defs/${name}` } as GbnfJsonSchema
  }

  typed(s: Json, type: string, path: string, depth: number): GbnfJsonSchema {
    const allowed = keywordsByType[type]!
    for (const key of Object.keys(s)) {
      if (annotations.has(key) || key.startsWith('x-') || common.has(key) || allowed.has(key)) continue
      if (key in keywordsOfAny) this.unsupported(`${path}/${key}`, `${key} on a ${type}`)
    }
    switch (type) {
      case 'object':
        return this.object(s, path, depth)
      case 'array':
        return this.array(s, path, depth)
      case 'string':
        return this.string(s, path)
      case 'number':
      case 'integer':
        return this.number(s, type, path)
      default:
        return { type } as GbnfJsonSchema
    }
  }

  object(s: Json, path: string, depth: number): GbnfJsonSchema {
    const out: Record<string, unknown> = { type: 'object' }
    if (s.properties !== undefined) {
      if (!isPlainObject(s.properties)) this.invalid(`${path}/properties`, 'properties must be an object')
      out.properties = Object.fromEntries(
        Object.entries(s.properties).map(([k, v]) => [
          k,
          this.convert(v, `${path}/properties/${k}`, depth + 1),
        ]),
      )
    }
    if (
      s.required !== undefined &&
      (!Array.isArray(s.required) || s.required.some((r) => typeof r !== 'string'))
    )
      this.invalid(`${path}/required`, 'required must be a list of property names')
    const declared = Object.keys((out.properties as object | undefined) ?? {}).length
    const extra = s.additionalProperties
    if (isPlainObject(extra) && declared === 0) {
      out.additionalProperties = this.convert(extra, `${path}/additionalProperties`, depth + 1)
      if (typeof s.minProperties === 'number') out.minProperties = s.minProperties
      if (typeof s.maxProperties === 'number') out.maxProperties = s.maxProperties
    } else {
      if (extra !== undefined && typeof extra !== 'boolean' && !isPlainObject(extra))
        this.invalid(`${path}/additionalProperties`, 'additionalProperties must be a boolean or a schema')
      // The grammar writes exactly the declared properties.
      if (typeof s.minProperties === 'number' && s.minProperties > declared)
        this.unsupported(
          `${path}/minProperties`,
          `minProperties ${s.minProperties} above the ${declared} declared`,
        )
      if (typeof s.maxProperties === 'number' && s.maxProperties < declared)
        this.unsupported(
          `${path}/maxProperties`,
          `maxProperties ${s.maxProperties} below the ${declared} declared`,
        )
    }
    return out as GbnfJsonSchema
  }

  array(s: Json, path: string, depth: number): GbnfJsonSchema {
    const out: Record<string, unknown> = { type: 'array' }
    if (s.uniqueItems === true) this.unsupported(`${path}/uniqueItems`, 'uniqueItems')
    if (s.prefixItems !== undefined) {
      if (!Array.isArray(s.prefixItems)) this.invalid(`${path}/prefixItems`, 'prefixItems must be a list')
      out.prefixItems = s.prefixItems.map((p, i) => this.convert(p, `${path}/prefixItems/${i}`, depth + 1))
    }
    if (s.items !== undefined && s.items !== false && s.items !== true) {
      if (Array.isArray(s.items)) {
        // draft-07's tuple form.
        out.prefixItems = s.items.map((p, i) => this.convert(p, `${path}/items/${i}`, depth + 1))
      } else out.items = this.convert(s.items, `${path}/items`, depth + 1)
    } else if (s.items === true || (s.items === undefined && s.prefixItems === undefined)) {
      this.unsupported(path, 'an array whose items may be any value')
    }
    for (const key of ['minItems', 'maxItems'] as const) {
      if (s[key] === undefined) continue
      if (typeof s[key] !== 'number' || !Number.isInteger(s[key]) || (s[key] as number) < 0)
        this.invalid(`${path}/${key}`, `${key} must be a whole number`)
      out[key] = s[key]
    }
    return out as GbnfJsonSchema
  }

  string(s: Json, path: string): GbnfJsonSchema {
    const lengths = ['minLength', 'maxLength'] as const
    for (const key of lengths) {
      if (s[key] === undefined) continue
      if (typeof s[key] !== 'number' || !Number.isInteger(s[key]) || (s[key] as number) < 0)
        this.invalid(`${path}/${key}`, `${key} must be a whole number`)
    }
    if (s.format !== undefined && typeof s.format !== 'string')
      this.invalid(`${path}/format`, 'format must be a string')
    if (s.pattern !== undefined) {
      if (typeof s.pattern !== 'string') this.invalid(`${path}/pattern`, 'pattern must be a string')
      for (const key of lengths)
        if (s[key] !== undefined) this.unsupported(`${path}/${key}`, `${key} beside a pattern`)
      if (!grammarPatched) this.unsupported(`${path}/pattern`, 'pattern (the grammar patch did not load)')
      try {
        patternGrammar(s.pattern)
      } catch (e) {
        if (e instanceof PatternError)
          this.unsupported(`${path}/pattern`, `pattern ${JSON.stringify(s.pattern)}: ${e.message}`)
        throw e
      }
      // Beside a format, the pattern is what the grammar follows (zod writes its format's own, stricter
      // pattern beside it; JSON Schema reads format as an annotation unless told otherwise).
      return { type: 'string', format: formatForPattern(s.pattern) } as unknown as GbnfJsonSchema
    }
    if (typeof s.format === 'string') {
      if (formatPatterns[s.format] == null || !grammarPatched)
        this.unsupported(`${path}/format`, `format ${JSON.stringify(s.format)}`)
      for (const key of lengths)
        if (s[key] !== undefined) this.unsupported(`${path}/${key}`, `${key} beside a format`)
      return { type: 'string', format: s.format } as unknown as GbnfJsonSchema
    }
    const out: Record<string, unknown> = { type: 'string' }
    for (const key of lengths) if (s[key] !== undefined) out[key] = s[key]
    return out as GbnfJsonSchema
  }

  number(s: Json, type: string, path: string): GbnfJsonSchema {
    if (s.multipleOf !== undefined) this.unsupported(`${path}/multipleOf`, 'multipleOf')
    for (const key of ['minimum', 'exclusiveMinimum'] as const) {
      const v = s[key]
      if (v === undefined || typeof v === 'boolean') continue
      if (typeof v !== 'number') this.invalid(`${path}/${key}`, `${key} must be a number`)
      if (v > -grammarNumberBound || !grammarPatched) this.unsupported(`${path}/${key}`, `${key} ${v}`)
    }
    for (const key of ['maximum', 'exclusiveMaximum'] as const) {
      const v = s[key]
      if (v === undefined || typeof v === 'boolean') continue
      if (typeof v !== 'number') this.invalid(`${path}/${key}`, `${key} must be a number`)
      if (v < grammarNumberBound || !grammarPatched) this.unsupported(`${path}/${key}`, `${key} ${v}`)
    }
    return { type } as GbnfJsonSchema
  }
}

const common = new Set(['type', '$defs', 'definitions', 'enum', 'const'])
const keywordsByType: Record<string, Set<string>> = {
  object: new Set(['properties', 'required', 'additionalProperties', 'minProperties', 'maxProperties']),
  array: new Set(['items', 'prefixItems', 'minItems', 'maxItems', 'uniqueItems']),
  string: new Set(['minLength', 'maxLength', 'format', 'pattern']),
  number: new Set(['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'multipleOf']),
  integer: new Set(['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'multipleOf']),
  boolean: new Set(),
  null: new Set(),
}
const keywordsOfAny: Record<string, true> = Object.fromEntries(
  Object.values(keywordsByType).flatMap((set) => [...set].map((k) => [k, true as const])),
)
/** Every keyword this converter understands; anything else is refused by name. */
const known = new Set([...common, ...Object.keys(keywordsOfAny), '$ref', 'anyOf', 'oneOf', 'allOf'])

/**
 * The schema in the grammar's subset, or a 400 naming what is wrong (`invalid_value`) or what the
 * grammar cannot guarantee (`unsupported_value`). `param` names the field in the request.
 */
export function toGrammarSchema(schema: unknown, param: string): GbnfJsonSchema {
  if (!isPlainObject(schema)) {
    throw apiError('invalid_value', `${param} must be a JSON Schema object`, { param })
  }
  return new Converter(param, schema).root()
}
