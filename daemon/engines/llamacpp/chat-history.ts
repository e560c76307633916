import {
  type ChatHistoryItem,
  type ChatModelFunctions,
  type ChatModelResponse,
  type ChatWrapper,
  LlamaText,
} from 'node-llama-cpp'
import type { ChatMessage, FunctionTool } from './request.ts'

/**
 * OpenAI chat messages as node-llama-cpp's chat history, tools as its functions, and the chat
 * wrapper that makes a tool call certain (tool_choice `required` or a named function).
 *
 * A tool call and its result are one history item in node-llama-cpp (the result sits on the call):
 * an assistant message with `tool_calls` becomes a model turn with a functionCall item per call,
 * and the `tool` messages after it fill in their results by `tool_call_id`.
 */

export function chatHistory(messages: ChatMessage[]): ChatHistoryItem[] {
  const history: ChatHistoryItem[] = []
  const calls = new Map<string, { type: 'functionCall'; name: string; params: unknown; result: unknown }>()
  for (const m of messages) {
    if (m.role === 'system') history.push({ type: 'system', text: m.content })
    else if (m.role === 'user') history.push({ type: 'user', text: m.content })
    else if (m.role === 'assistant') {
      const response: ChatModelResponse['response'] = []
      if (m.content !== '') response.push(m.content)
      for (const call of m.toolCalls) {
        const item = {
          type: 'functionCall' as const,
          name: call.name,
          params: JSON.parse(call.arguments),
          result: undefined as unknown,
        }
        calls.set(call.id, item)
        response.push(item)
      }
      history.push({ type: 'model', response })
    } else if (m.role === 'tool') {
      const call = calls.get(m.toolCallId)
      if (call != null) call.result = resultOf(m.content)
    }
  }
  // The answer to generate: a model turn, or the continuation of one that ended with tool results.
  if (history.at(-1)?.type !== 'model' || !endsWithCalls(history.at(-1) as ChatModelResponse))
    history.push({ type: 'model', response: [] })
  return history
}

function endsWithCalls(item: ChatModelResponse): boolean {
  const last = item.response.at(-1)
  return last != null && typeof last === 'object' && (last as { type?: string }).type === 'functionCall'
}

/** A tool's result as the model reads it: JSON when it is JSON, the text otherwise. */
function resultOf(content: string): unknown {
  try {
    return JSON.parse(content)
  } catch {
    return content
  }
}

export function chatFunctions(tools: FunctionTool[], only?: string): ChatModelFunctions {
  const functions: Record<string, { description?: string; params?: unknown }> = {}
  for (const t of tools) {
    if (only != null && t.name !== only) continue
    functions[t.name] = {
      ...(t.description != null ? { description: t.description } : {}),
      ...(t.parameters != null ? { params: t.parameters } : {}),
    }
  }
  return functions as ChatModelFunctions
}

/**
 * The wrapper as it is, except that the answer starts with the wrapper's own call prefix: the model
 * must call a function (node-llama-cpp's grammars then pick a listed name and valid parameters).
 */
export function forcingCall(wrapper: ChatWrapper): ChatWrapper {
  const prefix = wrapper.settings.functions.call.prefix
  const forced = Object.create(wrapper) as ChatWrapper
  forced.generateContextState = (options) =>
    ({
      ...wrapper.generateContextState(options),
      prefixTriggers: undefined,
      noPrefixTrigger: { type: 'functionCall', inject: LlamaText(prefix) },
    }) as ReturnType<ChatWrapper['generateContextState']>
  return forced
}
