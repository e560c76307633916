/** A min-heap of values by time (`at`, ms): the scale simulations' event queues. */
export class TimeHeap<T> {
  readonly #items: Array<{ at: number; value: T }> = []

  get size(): number {
    return this.#items.length
  }

  /** The earliest time in the heap; Infinity when empty. */
  peek(): number {
    return this.#items[0]?.at ?? Number.POSITIVE_INFINITY
  }

  push(at: number, value: T): void {
    const a = this.#items
    const item = { at, value }
    a.push(item)
    let i = a.length - 1
    while (i > 0) {
      const up = (i - 1) >> 1
      if (a[up]!.at <= at) break
      a[i] = a[up]!
      i = up
    }
    a[i] = item
  }

  pop(): T | undefined {
    const a = this.#items
    const top = a[0]
    const last = a.pop()
    if (top == null || last == null || a.length === 0) return top?.value
    let i = 0
    for (;;) {
      const l = 2 * i + 1
      if (l >= a.length) break
      const r = l + 1
      const c = r < a.length && a[r]!.at < a[l]!.at ? r : l
      if (a[c]!.at >= last.at) break
      a[i] = a[c]!
      i = c
    }
    a[i] = last
    return top.value
  }
}
