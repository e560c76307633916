import { apiError } from '../core/errors.ts'
import { isPlainObject } from '../core/guards.ts'

/**
 * The text of a message's content as OpenAI's APIs send it: a string, or a list of parts of which
 * Garage reads the text ones (`text` in chat, `input_text`/`output_text` in the Responses API, and
 * an earlier answer's `refusal`). Any other part (an image, audio, a file) is a 400
 * `unsupported_content` naming where it is.
 */
export function contentText(content: unknown, param: string): string {
  if (typeof content === 'string') return content
  if (!Array.isArray(content))
    throw apiError('invalid_type', `${param} must be a string or a list of text parts`, { param })
  return content
    .map((part, j) => {
      if (isPlainObject(part)) {
        if (
          (part.type === 'text' || part.type === 'input_text' || part.type === 'output_text') &&
          typeof part.text === 'string'
        )
          return part.text
        if (part.type === 'refusal' && typeof part.refusal === 'string') return part.refusal
      }
      const type = isPlainObject(part) ? JSON.stringify(part.type) : 'a non-object'
      throw apiError('unsupported_content', `${param}[${j}]: only text parts are supported, not ${type}`, {
        param,
      })
    })
    .join('')
}
