import { describe, expect, it } from 'vitest'
import { type SseEvent, SseSplitter } from '../../core/sse.ts'

const utf8 = new TextEncoder()

/** A chat stream as an engine sends it, with 2-, 3- and 4-byte characters and the odd extras. */
const lfEvents = [
  'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
  'data: {"choices":[{"index":0,"delta":{"content":"Caf\u00e9 "}}]}\n\n',
  ': keep-alive\n\n',
  'data: {"choices":[{"index":0,"delta":{"content":"\u4f60\u597d \ud83d\ude80"}}]}\n\n',
  'event: note\ndata: line one\ndata:line two\n\n',
  'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
  'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}\n\n',
  'data: [DONE]\n\n',
]
const expectedData = [
  '{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
  '{"choices":[{"index":0,"delta":{"content":"Caf\u00e9 "}}]}',
  null,
  '{"choices":[{"index":0,"delta":{"content":"\u4f60\u597d \ud83d\ude80"}}]}',
  'line one\nline two',
  '{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
  '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}',
  '[DONE]',
]

function run(chunks: Uint8Array[]): { events: SseEvent[]; rest: Uint8Array } {
  const splitter = new SseSplitter()
  const events: SseEvent[] = []
  for (const c of chunks) events.push(...splitter.push(c))
  return { events, rest: splitter.end() }
}

function splitAt(bytes: Uint8Array, points: number[]): Uint8Array[] {
  const out: Uint8Array[] = []
  let from = 0
  for (const p of points) {
    out.push(bytes.slice(from, p))
    from = p
  }
  out.push(bytes.slice(from))
  return out
}

describe('SseSplitter', () => {
  const lfBytes = utf8.encode(lfEvents.join(''))

  it('yields the same events, byte-identical, at every split point of a stream', () => {
    for (let p = 0; p <= lfBytes.length; p++) {
      const { events, rest } = run(splitAt(lfBytes, [p]))
      expect(events.map((e) => e.raw)).toEqual(lfEvents)
      expect(events.map((e) => e.data)).toEqual(expectedData)
      expect(rest.length).toBe(0)
    }
  })

  it('yields the same events at every pair of split points and one byte at a time', () => {
    for (let p = 0; p <= lfBytes.length; p += 3) {
      for (let q = p; q <= lfBytes.length; q += 5) {
        const { events } = run(splitAt(lfBytes, [p, q]))
        expect(events.map((e) => e.raw)).toEqual(lfEvents)
      }
    }
    const bytewise = run([...lfBytes].map((b) => new Uint8Array([b])))
    expect(bytewise.events.map((e) => e.raw)).toEqual(lfEvents)
    expect(bytewise.events.map((e) => e.data)).toEqual(expectedData)
  })

  it('decodes characters split between chunks inside their UTF-8 bytes', () => {
    const rocket = utf8.encode('data: \ud83d\ude80\u00e9\n\n')
    for (let p = 6; p <= 12; p++) {
      const { events } = run(splitAt(rocket, [p, p + 1]))
      expect(events).toEqual([
        { raw: 'data: \ud83d\ude80\u00e9\n\n', data: '\ud83d\ude80\u00e9', event: null },
      ])
    }
  })

  it('handles CRLF streams at every split point, passing every byte on', () => {
    const crlfEvents = lfEvents.map((e) => e.replaceAll('\n', '\r\n'))
    const bytes = utf8.encode(crlfEvents.join(''))
    const ends: number[] = []
    for (const e of crlfEvents) ends.push((ends.at(-1) ?? 0) + utf8.encode(e).length)
    let cutBetweenCrLf = 0
    for (let p = 0; p <= bytes.length; p++) {
      const { events, rest } = run(splitAt(bytes, [p]))
      expect(events.map((e) => e.data)).toEqual(expectedData)
      // An event is passed on when its blank line's CR arrives; an LF in the next chunk goes with the next event.
      const expected = [...crlfEvents, '']
      const k = ends.indexOf(p + 1)
      if (k !== -1) {
        cutBetweenCrLf++
        expected[k] = expected[k]!.slice(0, -1)
        expected[k + 1] = `\n${expected[k + 1]}`
      }
      expect([...events.map((e) => e.raw), new TextDecoder().decode(rest)]).toEqual(expected)
    }
    expect(cutBetweenCrLf).toBe(crlfEvents.length)
  })

  it('keeps a CRLF blank line whole when both bytes are in the chunk', () => {
    const { events } = run([utf8.encode('data: a\r\n\r\ndata: b\r\n\r\n')])
    expect(events.map((e) => e.raw)).toEqual(['data: a\r\n\r\n', 'data: b\r\n\r\n'])
  })

  it('accepts CR-only and mixed line endings', () => {
    const { events } = run([utf8.encode('data: a\r\rdata: b\n\r\ndata: c\r\n\ndata: d\ndata: e\r\r\n')])
    expect(events.map((e) => e.data)).toEqual(['a', 'b', 'c', 'd\ne'])
    expect(events.map((e) => e.raw).join('')).toBe(
      'data: a\r\rdata: b\n\r\ndata: c\r\n\ndata: d\ndata: e\r\r\n',
    )
  })

  it('parses fields as the SSE spec does', () => {
    const { events } = run([
      utf8.encode(': only a comment\n\ndata\n\ndata:  two spaces\nid: 7\nretry: 10\nevent:\n\n\n'),
    ])
    expect(events.map(({ data, event }) => ({ data, event }))).toEqual([
      { data: null, event: null },
      { data: '', event: null },
      { data: ' two spaces', event: '' },
      { data: null, event: null }, // a stray blank line is passed on as an empty event
    ])
  })

  it('strips a byte-order mark at the start of the stream only for parsing', () => {
    const { events } = run([utf8.encode('\ufeffdata: x\n\n\ufeffdata: y\n\n')])
    expect(events.map((e) => e.raw)).toEqual(['\ufeffdata: x\n\n', '\ufeffdata: y\n\n'])
    expect(events.map((e) => e.data)).toEqual(['x', null])
  })

  it('holds back an unterminated event and hands its bytes back at the end', () => {
    const splitter = new SseSplitter()
    expect(splitter.push(utf8.encode('data: done\n\ndata: cut mid'))).toHaveLength(1)
    expect(splitter.push(utf8.encode('-event\n'))).toEqual([])
    expect(new TextDecoder().decode(splitter.end())).toBe('data: cut mid-event\n')
    expect(splitter.end().length).toBe(0)
  })

  it('does not keep a reference to the caller buffer it may reuse', () => {
    const splitter = new SseSplitter()
    const buffer = utf8.encode('data: abc')
    splitter.push(buffer)
    buffer.fill(0x21)
    expect(splitter.push(utf8.encode('\n\n'))[0]?.data).toBe('abc')
  })

  it('refuses an event over 1 MiB, whether it arrives whole or in pieces', () => {
    const big = 1024 * 1024
    const exact = new Uint8Array(big).fill(0x61)
    exact.set(utf8.encode('data: '), 0)
    exact.set([0x0a, 0x0a], big - 2)
    expect(run(splitAt(exact, [1000, 500_000]))).toMatchObject({ events: [{ data: 'a'.repeat(big - 8) }] })

    const over = new Uint8Array(big + 1).fill(0x61)
    over.set([0x0a, 0x0a], big - 1)
    expect(() => run([over])).toThrow(expect.objectContaining({ name: 'SseEventTooLargeError' }))

    const splitter = new SseSplitter()
    const piece = new Uint8Array(64 * 1024).fill(0x61)
    let error: unknown = null
    let pushed = 0
    try {
      for (; pushed < 17; pushed++) splitter.push(piece)
    } catch (err) {
      error = err
    }
    expect(pushed).toBe(16) // the 17th piece takes it past 1 MiB, before any terminator
    expect(error).toMatchObject({ name: 'SseEventTooLargeError' })
  })

  it('takes its limit as an option', () => {
    const splitter = new SseSplitter({ maxEventBytes: 10 })
    expect(splitter.push(utf8.encode('data: 12\n\n'))).toHaveLength(1)
    expect(() => splitter.push(utf8.encode('data: 123\n\n'))).toThrow(
      expect.objectContaining({ name: 'SseEventTooLargeError' }),
    )
  })

  it('replaces invalid UTF-8 rather than failing', () => {
    const { events } = run([new Uint8Array([0x64, 0x61, 0x74, 0x61, 0x3a, 0x20, 0xff, 0x0a, 0x0a])])
    expect(events[0]?.data).toBe('\ufffd')
  })
})
