import { beforeAll, describe, expect, it } from 'vitest'
import { z } from 'zod'
import { ApiError } from '../../../core/errors.ts'
import { grammarPatched, patchGrammars } from '../../../daemon/engines/llamacpp/grammar.ts'
import { toGrammarSchema } from '../../../daemon/engines/llamacpp/json-schema.ts'

beforeAll(async () => {
  await patchGrammars()
})

function refusal(schema: unknown): ApiError {
  try {
    toGrammarSchema(schema, 'response_format.json_schema.schema')
  } catch (e) {
    if (e instanceof ApiError) return e
    throw e
  }
  throw new Error(`accepted ${JSON.stringify(schema)}`)
}

describe('JSON Schema to the grammar subset', () => {
  it('takes what zod writes for a structured-output schema (as LangChain and the AI SDK send it)', () => {
    const schema = z.toJSONSchema(
      z.object({
        name: z.string().describe('who'),
        age: z.number().int(),
        tags: z.array(z.string()).max(3),
        role: z.enum(['admin', 'user']),
        nick: z.string().nullable(),
        when: z.iso.date(),
        nested: z.object({ ok: z.boolean() }),
      }),
    )
    const out = toGrammarSchema(schema, 'p') as Record<string, unknown>
    expect(out).toEqual({
      type: 'object',
      properties: {
        name: { type: 'string' },
        age: { type: 'integer' },
        tags: { type: 'array', items: { type: 'string' }, maxItems: 3 },
        role: { enum: ['admin', 'user'] },
        nick: { type: ['string', 'null'] },
        when: {
          type: 'string',
          format: `pattern /${(z.toJSONSchema(z.iso.date()) as { pattern: string }).pattern}/`,
        },
        nested: { type: 'object', properties: { ok: { type: 'boolean' } } },
      },
    })
  })

  it('keeps recursive definitions and nullable, type lists and allOf of one', () => {
    const out = toGrammarSchema(
      {
        $schema: 'http://json-schema.org/draft-07/schema#',
        definitions: {
          node: {
            type: 'object',
            properties: { kids: { type: 'array', items: { $ref: '#/definitions/node' } } },
          },
        },
        type: 'object',
        properties: {
          root: { $ref: '#/definitions/node' },
          n: { type: ['integer', 'null'] },
          m: { type: 'string', nullable: true },
          a: { allOf: [{ type: 'boolean' }] },
          map: { type: 'object', additionalProperties: { type: 'number' } },
        },
        required: ['root'],
        additionalProperties: false,
      },
      'p',
    )
    expect(out).toEqual({
      type: 'object',
      properties: {
        root: { $ref: '#/$defs/node' },
        n: { type: ['integer', 'null'] },
        m: { oneOf: [{ type: 'string' }, { type: 'null' }] },
        a: { type: 'boolean' },
        map: { type: 'object', additionalProperties: { type: 'number' } },
      },
      $defs: {
        node: { type: 'object', properties: { kids: { type: 'array', items: { $ref: '#/$defs/node' } } } },
      },
    })
  })

  it("patches node-llama-cpp's grammar compiler (an upgrade that moves its modules fails here)", () => {
    expect(grammarPatched).toBe(true)
  })

  it('writes a pattern as the format the patched grammar reads, and formats it writes strictly', () => {
    expect(toGrammarSchema({ type: 'string', pattern: '^[a-z]+$' }, 'p')).toEqual({
      type: 'string',
      format: 'pattern /^[a-z]+$/',
    })
    expect(toGrammarSchema({ type: 'string', format: 'uuid' }, 'p')).toEqual({
      type: 'string',
      format: 'uuid',
    })
    expect(toGrammarSchema({ type: 'string', format: 'email', pattern: '^a@b\\.cc$' }, 'p')).toEqual({
      type: 'string',
      format: 'pattern /^a@b\\.cc$/',
    })
  })

  it('accepts the safe-integer bounds zod writes for int(): the grammar stays inside them', () => {
    expect(() => toGrammarSchema(z.toJSONSchema(z.object({ n: z.int() })), 'p')).not.toThrow()
  })

  it.each([
    [
      { type: 'string', pattern: '^(?!a)b$' },
      /pattern "\^\(\?!a\)b\$": a lookaround assertion .* at \/pattern cannot be enforced/,
    ],
    [{ type: 'string', pattern: 'a', maxLength: 3 }, /maxLength beside a pattern at \/maxLength/],
    [
      { type: 'object', properties: { n: { type: 'number', minimum: 0 } } },
      /minimum 0 at \/properties\/n\/minimum/,
    ],
    [{ type: 'string', format: 'ipv6' }, /format "ipv6"/],
    [{ type: 'array', items: { type: 'string' }, uniqueItems: true }, /uniqueItems/],
    [{ type: 'number', multipleOf: 2 }, /multipleOf/],
    [{ type: 'object', properties: {}, if: { type: 'object' } }, /the keyword "if"/],
    [{ allOf: [{ type: 'object' }, { type: 'object' }] }, /allOf with more than one schema/],
    [{ description: 'anything' }, /a schema that allows any value/],
    [{ type: 'array' }, /an array whose items may be any value/],
    [{ $ref: 'https://example.com/s.json' }, /only #\/\$defs\/NAME/],
  ])('refuses %j, naming what the grammar cannot guarantee', (schema, message) => {
    const err = refusal(schema)
    expect(err.status).toBe(400)
    expect(err.code).toBe('unsupported_value')
    expect(err.param).toBe('response_format.json_schema.schema')
    expect(err.message).toMatch(message)
    expect(err.message).toMatch(/use a model served by vLLM/)
  })

  it.each([
    ['not a schema', /must be a JSON Schema object/],
    [{ type: 'strnig' }, /"strnig" is not a JSON Schema type at \/type/],
    [{ type: 'object', properties: [] }, /properties must be an object at \/properties/],
    [{ type: 'object', required: 'a' }, /required must be a list/],
    [{ enum: [] }, /enum must be a non-empty list/],
    [{ $ref: '#/$defs/missing' }, /names no definition/],
    [{ type: 'string', maxLength: -1 }, /maxLength must be a whole number/],
  ])('says %j is not a valid JSON Schema', (schema, message) => {
    const err = refusal(schema)
    expect(err.code).toBe('invalid_value')
    expect(err.message).toMatch(message)
  })

  it('bounds how deep a schema may nest', () => {
    let deep: Record<string, unknown> = { type: 'string' }
    for (let i = 0; i < 100; i++) deep = { type: 'array', items: deep }
    expect(refusal(deep).message).toMatch(/nesting deeper than 64/)
  })
})
