/**
 * Random strings from a GBNF expression without rules (what regex-grammar.ts writes: literals,
 * character classes, groups, alternatives and repetitions), to check that everything a grammar lets
 * a model write is what it should be. Unbounded repetitions are cut at `openEnd` extra rounds.
 */

type Node =
  | { kind: 'lit'; text: string }
  | { kind: 'class'; ranges: Array<[number, number]> }
  | { kind: 'seq'; items: Node[] }
  | { kind: 'alt'; options: Node[] }
  | { kind: 'rep'; node: Node; min: number; max: number | null }

class GbnfParser {
  #i = 0
  readonly src: string

  constructor(src: string) {
    this.src = src
  }

  parse(): Node {
    const n = this.#alt()
    this.#ws()
    if (this.#i !== this.src.length) throw new Error(`unexpected ${this.src.slice(this.#i, this.#i + 20)}`)
    return n
  }

  #ws(): void {
    while (this.src[this.#i] === ' ') this.#i++
  }

  #alt(): Node {
    const options = [this.#seq()]
    for (;;) {
      this.#ws()
      if (this.src[this.#i] !== '|') break
      this.#i++
      options.push(this.#seq())
    }
    return options.length === 1 ? options[0]! : { kind: 'alt', options }
  }

  #seq(): Node {
    const items: Node[] = []
    for (;;) {
      this.#ws()
      const c = this.src[this.#i]
      if (c === undefined || c === '|' || c === ')') break
      items.push(this.#rep())
    }
    return { kind: 'seq', items }
  }

  #rep(): Node {
    const node = this.#atom()
    const c = this.src[this.#i]
    if (c === '*' || c === '+' || c === '?') {
      this.#i++
      return { kind: 'rep', node, min: c === '+' ? 1 : 0, max: c === '?' ? 1 : null }
    }
    if (c === '{') {
      const m = /^\{(\d+)(,(\d*))?\}/.exec(this.src.slice(this.#i))!
      this.#i += m[0].length
      const min = Number(m[1])
      return { kind: 'rep', node, min, max: m[2] == null ? min : m[3] === '' ? null : Number(m[3]) }
    }
    return node
  }

  #char(): number {
    const c = this.src[this.#i++]!
    if (c !== '\\') return c.codePointAt(0)!
    const e = this.src[this.#i++]!
    const widths: Record<string, number> = { x: 2, u: 4, U: 8 }
    if (widths[e] != null) {
      const h = this.src.slice(this.#i, this.#i + widths[e]!)
      this.#i += widths[e]!
      return Number.parseInt(h, 16)
    }
    const named: Record<string, string> = { n: '\n', r: '\r', t: '\t' }
    return (named[e] ?? e).codePointAt(0)!
  }

  #atom(): Node {
    const c = this.src[this.#i]
    if (c === '(') {
      this.#i++
      const n = this.#alt()
      this.#ws()
      if (this.src[this.#i++] !== ')') throw new Error('unclosed (')
      return n
    }
    if (c === '"') {
      this.#i++
      let text = ''
      while (this.src[this.#i] !== '"') text += String.fromCodePoint(this.#char())
      this.#i++
      return { kind: 'lit', text }
    }
    if (c === '[') {
      this.#i++
      if (this.src[this.#i] === '^') throw new Error('negated classes are not written')
      const ranges: Array<[number, number]> = []
      while (this.src[this.#i] !== ']') {
        const lo = this.#char()
        if (this.src[this.#i] === '-' && this.src[this.#i + 1] !== ']') {
          this.#i++
          ranges.push([lo, this.#char()])
        } else ranges.push([lo, lo])
      }
      this.#i++
      return { kind: 'class', ranges }
    }
    throw new Error(`unexpected ${JSON.stringify(c)} at ${this.#i}`)
  }
}

export function gbnfSampler(gbnf: string, init: { seed?: number; openEnd?: number } = {}): () => string {
  const root = new GbnfParser(gbnf).parse()
  let state = init.seed ?? 1
  const random = (n: number): number => {
    state = (state * 1103515245 + 12345) % 2147483648
    return Math.floor((state / 2147483648) * n)
  }
  const openEnd = init.openEnd ?? 4
  const sample = (n: Node): string => {
    switch (n.kind) {
      case 'lit':
        return n.text
      case 'class': {
        // Mostly the ends of ranges (where off-by-one mistakes hide), sometimes inside them.
        const [lo, hi] = n.ranges[random(n.ranges.length)]!
        const pick = random(4)
        const cp = pick === 0 ? lo : pick === 1 ? hi : lo + random(Math.min(hi - lo + 1, 0x3000))
        return String.fromCodePoint(cp >= 0xd800 && cp <= 0xdfff ? lo : cp)
      }
      case 'seq':
        return n.items.map(sample).join('')
      case 'alt':
        return sample(n.options[random(n.options.length)]!)
      case 'rep': {
        const count = n.min + random((n.max ?? n.min + openEnd) - n.min + 1)
        let out = ''
        for (let i = 0; i < count; i++) out += sample(n.node)
        return out
      }
    }
  }
  return () => sample(root)
}
