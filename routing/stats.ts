/** Statistics the routers share. */

/** The median of `values` (sorted in place); null when there are none. */
export function median(values: number[]): number | null {
  if (values.length === 0) return null
  values.sort((a, b) => a - b)
  const mid = values.length >> 1
  return values.length % 2 === 1 ? values[mid]! : (values[mid - 1]! + values[mid]!) / 2
}

/** An exponentially weighted moving average: `alpha` is the weight of the new sample. */
export function ewma(previous: number | null, sample: number, alpha: number): number {
  return previous == null ? sample : previous + alpha * (sample - previous)
}
