/**
 * A JSON Schema `pattern` (ECMAScript regular expression) as a GBNF rule that writes the JSON
 * encoding of a string the pattern matches, so the grammar can guarantee it. What the grammar cannot
 * express (lookaround, backreferences, word boundaries, anchors inside the pattern) is refused by
 * name. Also the strict grammars for the string formats the engine guarantees (`date` checks days per
 * month and leap years, unlike node-llama-cpp's own).
 *
 * A pattern is a search: "abc" matches any string that contains "abc". Writing exactly a match
 * satisfies it, so anchors at the ends are simply dropped. The grammar only has to write valid
 * strings, not every valid string: the wildcard `.` and negated classes leave out control characters.
 */

export class PatternError extends Error {}

/** Sets of code points as sorted, disjoint [lo, hi] ranges. */
type Ranges = Array<[number, number]>

const maxCodePoint = 0x10ffff
const maxRepeat = 256
const maxNodes = 4096

function normalise(ranges: Ranges): Ranges {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0])
  const out: Ranges = []
  for (const [lo, hi] of sorted) {
    const last = out.at(-1)
    if (last != null && lo <= last[1] + 1) last[1] = Math.max(last[1], hi)
    else out.push([lo, hi])
  }
  return out
}

function negate(ranges: Ranges): Ranges {
  const out: Ranges = []
  let next = 0
  for (const [lo, hi] of normalise(ranges)) {
    if (lo > next) out.push([next, lo - 1])
    next = hi + 1
  }
  if (next <= maxCodePoint) out.push([next, maxCodePoint])
  return out
}

const digit: Ranges = [[0x30, 0x39]]
const word: Ranges = [
  [0x30, 0x39],
  [0x41, 0x5a],
  [0x5f, 0x5f],
  [0x61, 0x7a],
]
const space: Ranges = normalise([
  [0x09, 0x0d],
  [0x20, 0x20],
  [0xa0, 0xa0],
  [0x1680, 0x1680],
  [0x2000, 0x200a],
  [0x2028, 0x2029],
  [0x202f, 0x202f],
  [0x205f, 0x205f],
  [0x3000, 0x3000],
  [0xfeff, 0xfeff],
])
/** What `.` matches: everything but line terminators. */
const dot: Ranges = negate([
  [0x0a, 0x0a],
  [0x0d, 0x0d],
  [0x2028, 0x2029],
])
/** Control characters and surrogates: left out of wildcards (see above). */
const wildcardExcluded: Ranges = [
  [0x00, 0x1f],
  [0xd800, 0xdfff],
]

function subtract(a: Ranges, b: Ranges): Ranges {
  const keep = negate(b)
  const out: Ranges = []
  for (const [lo, hi] of normalise(a))
    for (const [klo, khi] of keep) {
      const l = Math.max(lo, klo)
      const h = Math.min(hi, khi)
      if (l <= h) out.push([l, h])
    }
  return out
}

const hex = (n: number): string =>
  n <= 0xffff ? `\\u${n.toString(16).padStart(4, '0')}` : `\\U${n.toString(16).padStart(8, '0')}`

/** A GBNF literal writing the JSON escape of a code point that cannot appear raw in a JSON string. */
function escapedLiteral(cp: number): string {
  const short: Record<number, string> = { 34: '"', 92: '\\', 8: 'b', 12: 'f', 10: 'n', 13: 'r', 9: 't' }
  const esc = short[cp] ?? `u${cp.toString(16).padStart(4, '0')}`
  return `"${[...`\\${esc}`].map((c) => (c === '\\' || c === '"' ? `\\${c}` : c)).join('')}"`
}

/** GBNF writing one code point of `set`, JSON-encoded. */
function charSetGrammar(set: Ranges): string {
  const ranges = normalise(set)
  const plain = subtract(ranges, [
    [0x00, 0x1f],
    [0x22, 0x22],
    [0x5c, 0x5c],
    [0xd800, 0xdfff],
  ])
  const parts: string[] = []
  if (plain.length > 0)
    parts.push(`[${plain.map(([lo, hi]) => (lo === hi ? hex(lo) : `${hex(lo)}-${hex(hi)}`)).join('')}]`)
  for (const [lo, hi] of ranges) {
    for (let cp = lo; cp <= Math.min(hi, 0x5c); cp++) {
      if (cp < 0x20 || cp === 0x22 || cp === 0x5c) parts.push(escapedLiteral(cp))
    }
  }
  if (parts.length === 0) throw new PatternError('a character class that matches nothing')
  return parts.length === 1 ? parts[0]! : `(${parts.join(' | ')})`
}

class Parser {
  readonly #src: number[]
  readonly #text: string
  #i = 0
  #nodes = 0

  constructor(pattern: string) {
    this.#text = pattern
    this.#src = [...pattern].map((c) => c.codePointAt(0)!)
  }

  fail(what: string): never {
    throw new PatternError(`${what} (at ${this.#i} in ${JSON.stringify(this.#text)})`)
  }

  #peek(): number | undefined {
    return this.#src[this.#i]
  }

  #eat(ch: string): boolean {
    if (this.#src[this.#i] === ch.codePointAt(0)) {
      this.#i++
      return true
    }
    return false
  }

  #count(): void {
    if (++this.#nodes > maxNodes) this.fail(`a pattern longer than ${maxNodes} parts`)
  }

  /** The whole pattern: branches, each with its anchors at the ends dropped. */
  top(): string {
    const branches: string[] = []
    do {
      this.#eat('^')
      branches.push(this.#sequence(true))
    } while (this.#eat('|'))
    if (this.#i < this.#src.length) this.fail('an unmatched ")"')
    return branches.length === 1 ? branches[0]! : `(${branches.join(' | ')})`
  }

  #alternation(): string {
    const branches = [this.#sequence(false)]
    while (this.#eat('|')) branches.push(this.#sequence(false))
    return branches.length === 1 ? branches[0]! : `(${branches.join(' | ')})`
  }

  #sequence(top: boolean): string {
    const items: string[] = []
    for (;;) {
      const c = this.#peek()
      if (c === undefined || c === 0x7c /* | */ || c === 0x29 /* ) */) break
      if (c === 0x24 /* $ */) {
        this.#i++
        const next = this.#peek()
        if (top && (next === undefined || next === 0x7c)) break
        this.fail('an anchor "$" inside the pattern')
      }
      if (c === 0x5e /* ^ */) this.fail('an anchor "^" inside the pattern')
      items.push(this.#quantified())
    }
    return items.length === 0 ? '""' : items.join(' ')
  }

  #quantified(): string {
    this.#count()
    const atom = this.#atom()
    const c = this.#peek()
    let suffix: string | null = null
    if (c === 0x2a) suffix = '*'
    else if (c === 0x2b) suffix = '+'
    else if (c === 0x3f) suffix = '?'
    if (suffix != null) this.#i++
    else if (c === 0x7b /* { */) {
      const m = /^\{(\d+)(,(\d*))?\}/.exec(String.fromCodePoint(...this.#src.slice(this.#i, this.#i + 24)))
      if (m == null) return atom // A literal "{", as JavaScript reads it outside unicode mode.
      this.#i += m[0].length
      const min = Number(m[1])
      const max = m[2] == null ? min : m[3] === '' ? null : Number(m[3])
      if (min > maxRepeat || (max != null && max > maxRepeat)) this.fail(`a repetition above ${maxRepeat}`)
      if (max != null && max < min) this.fail('a repetition {n,m} with m below n')
      suffix = max == null ? `{${min},}` : max === min ? `{${min}}` : `{${min},${max}}`
    }
    if (suffix == null) return atom
    this.#eat('?') // Lazy: the same strings.
    if (this.#peek() === 0x2a || this.#peek() === 0x2b || this.#peek() === 0x3f || this.#peek() === 0x7b)
      this.fail('a quantifier after a quantifier')
    return `(${atom})${suffix}`
  }

  #atom(): string {
    const c = this.#src[this.#i++]!
    switch (c) {
      case 0x28 /* ( */:
        {
          if (this.#eat('?')) {
            if (this.#eat(':')) {
              // non-capturing
            } else if (this.#eat('<') && this.#peek() !== 0x3d && this.#peek() !== 0x21) {
              while (this.#peek() !== undefined && !this.#eat('>')) this.#i++
            } else this.fail('a lookaround assertion')
          }
          const inner = this.#alternation()
          if (!this.#eat(')')) this.fail('an unclosed "("')
          return `(${inner})`
        }
      case 0x5b /* [ */:
        return charSetGrammar(this.#class())
      case 0x2e /* . */:
        return charSetGrammar(subtract(dot, wildcardExcluded))
      case 0x5c /* \ */:
        return charSetGrammar(this.#escape(false))
      case 0x2a:
      case 0x2b:
      case 0x3f:
        return this.fail('a quantifier with nothing to repeat')
      default:
        return charSetGrammar([[c, c]])
    }
  }

  /** After "[": the class's code points. */
  #class(): Ranges {
    const negated = this.#eat('^')
    const ranges: Ranges = []
    let first = true
    for (;;) {
      const c = this.#peek()
      if (c === undefined) this.fail('an unclosed "["')
      if (c === 0x5d /* ] */ && !first) {
        this.#i++
        break
      }
      first = false
      const lo = this.#classAtom()
      if (
        this.#peek() === 0x2d /* - */ &&
        this.#src[this.#i + 1] !== 0x5d &&
        this.#src[this.#i + 1] !== undefined
      ) {
        this.#i++
        const hi = this.#classAtom()
        if (lo.length !== 1 || hi.length !== 1 || lo[0]![0] !== lo[0]![1] || hi[0]![0] !== hi[0]![1])
          this.fail('a range between character classes')
        if (hi[0]![0] < lo[0]![0]) this.fail('a range out of order')
        ranges.push([lo[0]![0], hi[0]![0]])
      } else ranges.push(...lo)
    }
    const set = normalise(ranges)
    return negated ? subtract(negate(set), wildcardExcluded) : set
  }

  #classAtom(): Ranges {
    const c = this.#src[this.#i++]!
    if (c === 0x5c) return this.#escape(true)
    return [[c, c]]
  }

  /** After "\": the code points an escape stands for. */
  #escape(inClass: boolean): Ranges {
    const c = this.#src[this.#i++]
    if (c === undefined) this.fail('a pattern ending in "\\"')
    const ch = String.fromCodePoint(c)
    const one = (cp: number): Ranges => [[cp, cp]]
    switch (ch) {
      case 'd':
        return digit
      case 'D':
        return subtract(negate(digit), wildcardExcluded)
      case 'w':
        return word
      case 'W':
        return subtract(negate(word), wildcardExcluded)
      case 's':
        return space
      case 'S':
        return subtract(negate(space), wildcardExcluded)
      case 'n':
        return one(0x0a)
      case 'r':
        return one(0x0d)
      case 't':
        return one(0x09)
      case 'v':
        return one(0x0b)
      case 'f':
        return one(0x0c)
      case '0':
        return one(0)
      case 'b':
        if (inClass) return one(0x08)
        return this.fail('a word boundary "\\b"')
      case 'B':
        return this.fail('a word boundary "\\B"')
      case 'c': {
        const l = this.#src[this.#i++]
        if (l === undefined || !/[a-z]/i.test(String.fromCodePoint(l))) this.fail('a bad control escape')
        return one(l % 32)
      }
      case 'x': {
        const h = String.fromCodePoint(...this.#src.slice(this.#i, this.#i + 2))
        if (!/^[0-9a-f]{2}$/i.test(h)) this.fail('a bad "\\x" escape')
        this.#i += 2
        return one(Number.parseInt(h, 16))
      }
      case 'u': {
        const rest = String.fromCodePoint(...this.#src.slice(this.#i, this.#i + 10))
        const m = /^(?:([0-9a-f]{4})|\{([0-9a-f]{1,6})\})/i.exec(rest)
        if (m == null) this.fail('a bad "\\u" escape')
        this.#i += m[0].length
        const cp = Number.parseInt(m[1] ?? m[2]!, 16)
        if (cp > maxCodePoint) this.fail('a code point above U+10FFFF')
        return one(cp)
      }
      case 'p':
      case 'P':
        return this.fail('a Unicode property escape')
      case 'k':
        return this.fail('a named backreference')
      default:
        if (/[1-9]/.test(ch)) this.fail('a backreference')
        return one(c)
    }
  }
}

/** The GBNF (without the quotes) writing the JSON encoding of a string `pattern` matches. */
export function patternGrammar(pattern: string): string {
  try {
    new RegExp(pattern, 'u')
  } catch (e) {
    throw new PatternError(`not a valid regular expression: ${(e as Error).message}`)
  }
  return new Parser(pattern).top()
}

const yearLeap = '(?:\\d\\d(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)'
const date = `(?:${yearLeap}-02-29|\\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\\d|30)|02-(?:0[1-9]|1\\d|2[0-8])))`
const time = '(?:[01]\\d|2[0-3]):[0-5]\\d:[0-5]\\d(?:\\.\\d{1,6})?(?:Z|[+-](?:[01]\\d|2[0-3]):[0-5]\\d)'
const octet = '(?:25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)'
const label = '[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?'

/**
 * Patterns whose matches are valid instances of each format the engine guarantees (what ajv-formats
 * and OpenAI accept): strict dates, RFC 3339 times with an offset, and safe subsets for the rest.
 */
export const formatPatterns: Readonly<Record<string, string>> = {
  date,
  time,
  'date-time': `${date}T${time}`,
  uuid: '[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}',
  ipv4: `(?:${octet}\\.){3}${octet}`,
  hostname: `(?:${label}\\.){0,3}${label}`,
  email: `[a-z0-9_-]{1,16}(?:\\.[a-z0-9_-]{1,16}){0,2}@(?:${label}\\.){1,3}[a-z]{2,8}`,
  uri: `https://(?:${label}\\.){1,3}[a-z]{2,8}(?:/[a-z0-9._-]{1,20}){0,4}`,
}
