import { Ajv2020 } from 'ajv/dist/2020.js'
import addFormatsModule from 'ajv-formats'
import { describe, expect, it } from 'vitest'
import { z } from 'zod'
import {
  formatPatterns,
  PatternError,
  patternGrammar,
} from '../../../daemon/engines/llamacpp/regex-grammar.ts'
import { gbnfSampler } from '../../helpers/gbnf-sampler.ts'

const addFormats = ((addFormatsModule as unknown as { default?: unknown }).default ?? addFormatsModule) as (
  ajv: Ajv2020,
) => void

/** Strings the grammar for `pattern` may write, decoded from their JSON encoding. */
function samples(pattern: string, count = 400): string[] {
  const next = gbnfSampler(patternGrammar(pattern), { seed: 7 })
  return Array.from({ length: count }, () => JSON.parse(`"${next()}"`) as string)
}

const zodPattern = (schema: z.ZodType): string => (z.toJSONSchema(schema) as { pattern: string }).pattern

describe('patterns as grammar', () => {
  it.each([
    ['^[a-z]{2,5}-\\d+$'],
    ['^(?:foo|ba[rz])+?$'],
    ['abc'],
    ['^\\w+@\\w+\\.(com|org)$'],
    ['^[^a-z"\\\\]{3}$'],
    ['^"quoted" \\\\ back\\/slash\\.$'],
    ['^\\s?\\S\\D\\W.$'],
    ['^[\\u00e9\\u{1F600}-\\u{1F64F}]{1,3}$'],
    ['^(?<year>\\d{4})-(0[1-9]|1[0-2])$'],
    ['^tab\\there\\nnew$'],
    ['^a{3}b{2,}c?$|^z$'],
    ['^[-a]x[b-]$'],
    [zodPattern(z.iso.date())],
    [zodPattern(z.iso.datetime())],
    [zodPattern(z.iso.time())],
    [zodPattern(z.uuid())],
    [zodPattern(z.ipv4())],
    [zodPattern(z.cuid())],
    [zodPattern(z.email())],
  ])('%s: every string the grammar writes matches', (pattern) => {
    const re = new RegExp(pattern, 'u')
    const bad = samples(pattern).filter((s) => !re.test(s))
    expect(bad).toEqual([])
  })

  it.each([
    ['^(?=a)a$', /lookaround/],
    ['^(?!x).*$', /lookaround/],
    ['(a)\\1', /backreference/],
    ['\\bword\\b', /word boundary/],
    ['a^b', /anchor "\^" inside/],
    ['a$b', /anchor "\$" inside/],
    ['\\p{L}+', /Unicode property/],
    ['a{1,1000}', /repetition above 256/],
    ['(', /not a valid regular expression/],
  ])('%s is refused, naming why', (pattern, why) => {
    expect(() => patternGrammar(pattern)).toThrow(PatternError)
    expect(() => patternGrammar(pattern)).toThrow(why)
  })
})

describe('formats the grammar writes', () => {
  const ajv = new Ajv2020({ strict: false })
  addFormats(ajv)

  it.each(Object.keys(formatPatterns))('every %s it writes is valid for ajv-formats', (format) => {
    const valid = ajv.compile({ type: 'string', format })
    const bad = samples(formatPatterns[format]!, 600).filter((s) => !valid(s))
    expect(bad).toEqual([])
  })

  it('writes leap days only in leap years', () => {
    const re = new RegExp(`^${formatPatterns.date}$`)
    expect(['2024-02-29', '2000-02-29', '1600-02-29'].every((d) => re.test(d))).toBe(true)
    expect(
      ['2023-02-29', '1900-02-29', '2024-02-30', '2024-04-31', '2024-13-01'].some((d) => re.test(d)),
    ).toBe(false)
  })
})
