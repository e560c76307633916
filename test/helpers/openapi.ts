import { readFileSync } from 'node:fs'
import { gunzipSync } from 'node:zlib'
import { Ajv2020, type ErrorObject, type ValidateFunction } from 'ajv/dist/2020.js'
import addFormatsModule from 'ajv-formats'

/**
 * Validates answers against OpenAI's published OpenAPI spec (a copy of `../shared/openai-openapi.json`
 * in test/fixtures/openai, gzipped; test/openai/spec.test.ts keeps it equal to the shared one).
 *
 * The spec mixes OpenAPI 3.1 with 3.0 leftovers (`nullable: true`, boolean `exclusiveMinimum`,
 * `$recursiveRef`): normalise() turns it into plain JSON Schema 2020-12 for ajv, keeps discriminators
 * where ajv can use them (one readable error instead of a branch per union member), and makes
 * object-shaped components reject non-objects. Two wire shapes the spec has no schema for are added
 * under their own names: streamed legacy completions (`finish_reason: null`) and base64 embeddings.
 */

const specFile = new URL('../fixtures/openai/openai-openapi.json.gz', import.meta.url)
const docId = 'https://openai-openapi.local/spec.json'
const refPrefix = '#/components/schemas/'

type Schema = Record<string, unknown>
type Schemas = Record<string, Schema>

const addFormats = ((addFormatsModule as unknown as { default?: unknown }).default ?? addFormatsModule) as (
  ajv: Ajv2020,
) => void

const localSchemas: Record<string, (s: Schemas) => Schema> = {
  CreateCompletionStreamResponse: (s) => {
    const out = structuredClone(s.CreateCompletionResponse!) as {
      properties: { choices: { items: { properties: Schema } } }
    }
    const choice = out.properties.choices.items.properties
    choice.finish_reason = { anyOf: [choice.finish_reason, { type: 'null' }] }
    return out as unknown as Schema
  },
  EmbeddingBase64: (s) => {
    const out = structuredClone(s.Embedding!) as { properties: Schema }
    out.properties.embedding = { type: 'string', contentEncoding: 'base64' }
    return out as unknown as Schema
  },
  CreateEmbeddingResponseBase64: (s) => {
    const out = structuredClone(s.CreateEmbeddingResponse!) as { properties: Schema }
    out.properties.data = { type: 'array', items: { $ref: `${refPrefix}EmbeddingBase64` } }
    return out as unknown as Schema
  },
}

const childKeys = [
  'items',
  'additionalProperties',
  'not',
  'contains',
  'propertyNames',
  'if',
  'then',
  'else',
  'unevaluatedProperties',
  'unevaluatedItems',
  'additionalItems',
]
const childListKeys = ['allOf', 'anyOf', 'oneOf', 'prefixItems', 'items']
const childMapKeys = ['properties', 'patternProperties', '$defs', 'definitions', 'dependentSchemas']
const isAnnotation = (k: string): boolean =>
  k.startsWith('x-') ||
  [
    'description',
    'title',
    'default',
    'example',
    'examples',
    'deprecated',
    'readOnly',
    'writeOnly',
    'nullable',
    'externalDocs',
    'xml',
    '$comment',
  ].includes(k)

function isSchema(v: unknown): v is Schema {
  return v != null && typeof v === 'object' && !Array.isArray(v)
}

/** Every subschema bottom-up, replaced by what `fn` returns. */
function mapSchema(node: unknown, fn: (n: Schema) => Schema): unknown {
  if (!isSchema(node)) return node
  for (const k of childKeys) if (isSchema(node[k])) node[k] = mapSchema(node[k], fn)
  for (const k of childListKeys)
    if (Array.isArray(node[k])) node[k] = (node[k] as unknown[]).map((s) => mapSchema(s, fn))
  for (const k of childMapKeys) {
    const map = node[k]
    if (isSchema(map)) for (const p of Object.keys(map)) map[p] = mapSchema(map[p], fn)
  }
  return fn(node)
}

/** OpenAPI 3.0 `nullable: true` (and `allOf: [{$ref}, {nullable: true}]`) as JSON Schema. */
function fixNullable(node: Schema): Schema {
  if (Array.isArray(node.allOf)) {
    const marker = (s: unknown): boolean =>
      isSchema(s) && s.nullable === true && Object.keys(s).every(isAnnotation)
    if (node.allOf.some(marker)) {
      node.allOf = node.allOf.filter((s) => !marker(s))
      node.nullable = true
    }
  }
  if (!('nullable' in node)) return node
  const nullable = node.nullable === true
  delete node.nullable
  if (!nullable) return node
  const constraints = Object.keys(node).filter((k) => !isAnnotation(k))
  if (constraints.length === 0) return node
  if (
    (typeof node.type === 'string' || Array.isArray(node.type)) &&
    constraints.every((k) => !['allOf', 'anyOf', 'oneOf', '$ref', 'not', 'const', 'if'].includes(k))
  ) {
    const types = Array.isArray(node.type) ? node.type : [node.type]
    if (!types.includes('null')) node.type = [...types, 'null']
    if (Array.isArray(node.enum) && !node.enum.includes(null)) node.enum = [...node.enum, null]
    return node
  }
  const inner: Schema = {}
  const outer: Schema = {}
  for (const [k, v] of Object.entries(node)) (isAnnotation(k) ? outer : inner)[k] = v
  return { ...outer, anyOf: [inner, { type: 'null' }] }
}

/** OpenAPI 3.0 boolean exclusive bounds as 2020-12 numbers. */
function fixExclusiveBounds(node: Schema): Schema {
  for (const [ex, bound] of [
    ['exclusiveMinimum', 'minimum'],
    ['exclusiveMaximum', 'maximum'],
  ] as const) {
    if (typeof node[ex] !== 'boolean') continue
    if (node[ex] === true && typeof node[bound] === 'number') {
      node[ex] = node[bound]
      delete node[bound]
    } else delete node[ex]
  }
  return node
}

function fixRecursiveRef(component: string): (node: Schema) => Schema {
  return (node) => {
    delete node.$recursiveAnchor
    if (node.$recursiveRef === '#') {
      delete node.$recursiveRef
      node.$ref = refPrefix + component
    }
    return node
  }
}

function deref(s: Schemas, schema: unknown): Schema | undefined {
  if (isSchema(schema) && typeof schema.$ref === 'string' && schema.$ref.startsWith(refPrefix))
    return s[schema.$ref.slice(refPrefix.length)]
  return isSchema(schema) ? schema : undefined
}

/** The string values a member's `tag` property may take, and whether it is required (through $ref and allOf). */
function tagInfo(
  s: Schemas,
  schema: unknown,
  tag: string,
  depth = 0,
): { values: string[] | null; required: boolean } {
  const info = { values: null as string[] | null, required: false }
  if (!isSchema(schema) || depth > 8) return info
  if (schema.$ref != null) Object.assign(info, tagInfo(s, deref(s, schema), tag, depth + 1))
  const props = schema.properties as Record<string, Schema> | undefined
  const prop = props?.[tag]
  if (isSchema(prop)) {
    if (typeof prop.const === 'string') info.values = [prop.const]
    else if (Array.isArray(prop.enum) && prop.enum.every((v) => typeof v === 'string'))
      info.values = prop.enum as string[]
  }
  if (Array.isArray(schema.required) && schema.required.includes(tag)) info.required = true
  for (const part of (schema.allOf as unknown[] | undefined) ?? []) {
    const r = tagInfo(s, part, tag, depth + 1)
    info.values ??= r.values
    info.required ||= r.required
  }
  return info
}

function readsTagDirectly(s: Schemas, member: Schema, tag: string, topRequired: boolean): boolean {
  const pureRef = member.$ref != null && Object.keys(member).every((k) => k === '$ref' || isAnnotation(k))
  const schema = pureRef ? deref(s, member) : member
  const prop = (schema?.properties as Record<string, Schema> | undefined)?.[tag]
  const direct =
    isSchema(prop) &&
    (typeof prop.const === 'string' ||
      (Array.isArray(prop.enum) && prop.enum.every((v) => typeof v === 'string')))
  return (
    direct &&
    (topRequired || (Array.isArray(schema?.required) && (schema.required as string[]).includes(tag)))
  )
}

function discriminatedMembers(s: Schemas, members: Schema[], tag: string, parent: Schema): Schema[] | null {
  const topRequired = Array.isArray(parent.required) && parent.required.includes(tag)
  const seen = new Set<string>()
  const out: Schema[] = []
  for (const m of members) {
    const { values, required } = tagInfo(s, m, tag)
    if (values == null || values.length === 0 || !(required || topRequired)) return null
    for (const v of values) {
      if (seen.has(v)) return null
      seen.add(v)
    }
    out.push(
      readsTagDirectly(s, m, tag, topRequired)
        ? m
        : { type: 'object', properties: { [tag]: { enum: values } }, required: [tag], allOf: [m] },
    )
  }
  return out
}

function fixDiscriminators(s: Schemas): (node: Schema) => Schema {
  return (node) => {
    const d = node.discriminator as { propertyName?: unknown; mapping?: unknown } | undefined
    if (d !== undefined) {
      delete node.discriminator
      const tag = d?.propertyName
      if (typeof tag === 'string' && d.mapping == null && Array.isArray(node.oneOf)) {
        const members = discriminatedMembers(s, node.oneOf as Schema[], tag, node)
        if (members != null) {
          node.oneOf = members
          node.discriminator = { propertyName: tag }
          node.type ??= 'object'
        }
      }
    }
    if (
      node.discriminator == null &&
      Array.isArray(node.anyOf) &&
      node.oneOf == null &&
      node.anyOf.length > 1 &&
      node.anyOf.every((m) => isSchema(m) && typeof m.$ref === 'string')
    ) {
      const members = discriminatedMembers(s, node.anyOf as Schema[], 'type', node)
      if (members != null) {
        node.oneOf = members
        delete node.anyOf
        node.discriminator = { propertyName: 'type' }
        node.type ??= 'object'
      }
    }
    return node
  }
}

function normalise(components: Schemas): Schemas {
  const s = structuredClone(components)
  for (const [name, make] of Object.entries(localSchemas)) s[name] ??= make(s)
  for (const name of Object.keys(s))
    s[name] = mapSchema(s[name], (n) => fixRecursiveRef(name)(fixNullable(fixExclusiveBounds(n)))) as Schema
  for (const schema of Object.values(s)) {
    if (
      schema.properties != null &&
      schema.type === undefined &&
      schema.anyOf == null &&
      schema.oneOf == null &&
      schema.not == null
    )
      schema.type = 'object'
  }
  const fix = fixDiscriminators(s)
  for (const name of Object.keys(s)) s[name] = mapSchema(s[name], fix) as Schema
  return s
}

function describe(e: ErrorObject): string {
  const where = e.instancePath || '(root)'
  let message = e.message ?? e.keyword
  const params = e.params as Record<string, unknown>
  if (e.keyword === 'enum') message += `: ${JSON.stringify(params.allowedValues)}`
  else if (e.keyword === 'discriminator') message += ` (got ${JSON.stringify(params.tagValue)})`
  else if (e.keyword === 'const') message += `: ${JSON.stringify(params.allowedValue)}`
  return `${where} ${message}`
}

/** Drops the noise nullable unions make when a more specific error explains the failure. */
function compact(errors: ErrorObject[]): string[] {
  const noisy = (e: ErrorObject): boolean =>
    (e.keyword === 'type' && (e.params as { type?: unknown }).type === 'null') ||
    e.keyword === 'anyOf' ||
    e.keyword === 'oneOf'
  const specific = errors.filter((e) => !noisy(e))
  const kept = errors.filter(
    (e) =>
      !noisy(e) ||
      !specific.some(
        (s) => s.instancePath === e.instancePath || s.instancePath.startsWith(`${e.instancePath}/`),
      ),
  )
  return [...new Set(kept.map(describe))]
}

export interface OpenApiValidator {
  /** `[]` when `value` is valid against the named component schema; the problems otherwise. */
  check(schema: string, value: unknown): string[]
}

let shared: OpenApiValidator | null = null

/** The validator over the spec (made once per process: compiling the spec takes a second). */
export function openApiValidator(): OpenApiValidator {
  if (shared != null) return shared
  const doc = JSON.parse(gunzipSync(readFileSync(specFile)).toString('utf8')) as {
    components: { schemas: Schemas }
  }
  const schemas = normalise(doc.components.schemas)
  const ajv = new Ajv2020({
    strict: false,
    allErrors: true,
    discriminator: true,
    useDefaults: false,
    coerceTypes: false,
  })
  addFormats(ajv)
  ajv.addFormat('unixtime', { type: 'number', validate: (n: number) => Number.isFinite(n) && n >= 0 })
  const formats = new Set<string>()
  for (const schema of Object.values(schemas))
    mapSchema(schema, (n) => {
      if (typeof n.format === 'string') formats.add(n.format)
      return n
    })
  for (const f of formats) if (ajv.formats[f] == null) ajv.addFormat(f, true)
  ajv.addSchema({ $id: docId, components: { schemas } })
  const compiled = new Map<string, ValidateFunction>()
  shared = {
    check(name, value) {
      let fn = compiled.get(name)
      if (fn == null) {
        if (!Object.hasOwn(schemas, name)) throw new Error(`no schema ${name} in the spec`)
        fn = ajv.getSchema(`${docId}#/components/schemas/${encodeURIComponent(name)}`)
        if (fn == null) throw new Error(`cannot compile ${name}`)
        compiled.set(name, fn)
      }
      return fn(value) ? [] : compact([...(fn.errors ?? [])])
    },
  }
  return shared
}

/** One HTTP exchange a client made, as recorded. */
export interface Exchange {
  method: string
  path: string
  status: number
  contentType: string
  /** The request body as sent (JSON parsed), or null. */
  request: unknown
  body: string
}

export interface Recorder {
  fetch: typeof fetch
  exchanges: Exchange[]
  /** Resolves when every recorded body has been read. */
  settled(): Promise<void>
  /** Every problem of the exchanges recorded so far against the spec; forgets them. */
  problems(): Promise<string[]>
}

/** A fetch for client libraries that records every exchange (the body read through a clone). */
export function recordingFetch(): Recorder {
  const exchanges: Exchange[] = []
  const reads: Array<Promise<void>> = []
  const recording: typeof fetch = async (input, init) => {
    const res = await fetch(input, init)
    const url = new URL(typeof input === 'string' || input instanceof URL ? input : input.url)
    let request: unknown = null
    if (typeof init?.body === 'string') {
      try {
        request = JSON.parse(init.body)
      } catch {
        request = init.body
      }
    }
    const exchange: Exchange = {
      method: init?.method ?? (input instanceof Request ? input.method : 'GET'),
      path: url.pathname,
      status: res.status,
      contentType: res.headers.get('content-type') ?? '',
      request,
      body: '',
    }
    exchanges.push(exchange)
    reads.push(
      res
        .clone()
        .text()
        .then((text) => {
          exchange.body = text
        })
        .catch(() => {}),
    )
    return res
  }
  const settled = (): Promise<void> => Promise.all(reads).then(() => {})
  return {
    fetch: recording,
    exchanges,
    settled,
    async problems() {
      await settled()
      const found = exchanges.flatMap(exchangeProblems)
      exchanges.length = 0
      reads.length = 0
      return found
    },
  }
}

function sseData(text: string): string[] {
  const out: string[] = []
  for (const block of text.split(/\r?\n\r?\n/)) {
    const data = block
      .split(/\r?\n/)
      .filter((l) => l.startsWith('data:'))
      .map((l) => l.slice(5).replace(/^ /, ''))
    if (data.length > 0) out.push(data.join('\n'))
  }
  return out
}

/**
 * Every problem of an exchange against the spec: the schema for its endpoint, each SSE event of a
 * stream, the error shape for a failure. `[]` when it is all valid.
 */
export function exchangeProblems(ex: Exchange): string[] {
  const v = openApiValidator()
  const path = ex.path.replace(/^.*?\/v1\//, '/v1/')
  const where = `${ex.method} ${path} ${ex.status}`
  const json = (text: string): unknown => {
    try {
      return JSON.parse(text)
    } catch {
      return Symbol('not JSON')
    }
  }
  const problems: string[] = []
  const check = (schema: string, value: unknown, what = ''): void => {
    for (const p of v.check(schema, value)) problems.push(`${where}${what}: ${schema}: ${p}`)
  }
  if (ex.status !== 200) {
    check('ErrorResponse', json(ex.body))
    return problems
  }
  const stream = ex.contentType.startsWith('text/event-stream')
  if (path === '/v1/models') check('ListModelsResponse', json(ex.body))
  else if (path.startsWith('/v1/models/')) check('Model', json(ex.body))
  else if (path === '/v1/embeddings') {
    const body = json(ex.body) as { data?: Array<{ embedding?: unknown }> }
    check(
      typeof body?.data?.[0]?.embedding === 'string'
        ? 'CreateEmbeddingResponseBase64'
        : 'CreateEmbeddingResponse',
      body,
    )
  } else if (!stream) {
    check(
      path === '/v1/chat/completions'
        ? 'CreateChatCompletionResponse'
        : path === '/v1/completions'
          ? 'CreateCompletionResponse'
          : 'Response',
      json(ex.body),
    )
  } else {
    for (const [i, data] of sseData(ex.body).entries()) {
      if (data === '[DONE]') continue
      const event = json(data) as { error?: unknown }
      const what = ` event ${i}`
      if (path === '/v1/responses') check('ResponseStreamEvent', event, what)
      else if (event?.error != null) check('ErrorResponse', event, what)
      else
        check(
          path === '/v1/chat/completions'
            ? 'CreateChatCompletionStreamResponse'
            : 'CreateCompletionStreamResponse',
          event,
          what,
        )
    }
  }
  return problems
}
