/**
 * The OpenAI endpoints Garage serves, in one table: the engine, the node's mesh handler, the head
 * and the federation all route by it. A new endpoint is added here first.
 */

export type GenerationKind = 'chat' | 'completion'

export const modelsPath = '/v1/models'
export const chatCompletionsPath = '/v1/chat/completions'
export const completionsPath = '/v1/completions'
export const embeddingsPath = '/v1/embeddings'
export const responsesPath = '/v1/responses'

/** `/v1/models/{id}` → the id (ids may hold slashes: `org/model`); null for any other path. */
export function modelIdOf(path: string): string | null {
  if (!path.startsWith(`${modelsPath}/`) || path.length === modelsPath.length + 1) return null
  try {
    return decodeURIComponent(path.slice(modelsPath.length + 1))
  } catch {
    return null
  }
}

/** POST endpoints that generate, and which kind of request each takes. */
export const generationEndpoints: Readonly<Record<string, GenerationKind>> = Object.freeze({
  [chatCompletionsPath]: 'chat',
  [completionsPath]: 'completion',
})

/** The generation kind a path serves, or null. */
export function generationKind(path: string): GenerationKind | null {
  return Object.hasOwn(generationEndpoints, path) ? generationEndpoints[path]! : null
}

/** What a hop routes to a node as it is: generation, and embeddings. */
export type ProxiedKind = GenerationKind | 'embedding'

/** The kind of POST a path is that a head or the federation routes to a node, or null. */
export function proxiedKind(path: string): ProxiedKind | null {
  return path === embeddingsPath ? 'embedding' : generationKind(path)
}
