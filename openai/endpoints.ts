/**
 * The OpenAI endpoints Garage serves, in one table: the engine, the node's mesh handler, the head
 * and the federation all route by it. A new endpoint is added here first.
 */

export type GenerationKind = 'chat' | 'completion'

export const modelsPath = '/v1/models'

/** POST endpoints that generate, and which kind of request each takes. */
export const generationEndpoints: Readonly<Record<string, GenerationKind>> = Object.freeze({
  '/v1/chat/completions': 'chat',
  '/v1/completions': 'completion',
})

/** The generation kind a path serves, or null. */
export function generationKind(path: string): GenerationKind | null {
  return Object.hasOwn(generationEndpoints, path) ? generationEndpoints[path]! : null
}
