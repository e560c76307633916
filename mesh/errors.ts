/**
 * Expected failures a user can act on. The CLI prints `message` on one line and exits non-zero;
 * anything that is not a GarageError is treated as a bug.
 */
export class GarageError extends Error {
  readonly code: string

  constructor(message: string, code = 'GARAGE_ERROR', options?: ErrorOptions) {
    super(message, options)
    // Every subclass is named after itself (tests and logs match on err.name).
    this.name = new.target.name
    this.code = code
  }
}

export class IdentityKeyPermissionsError extends GarageError {}
export class IdentityKeyInvalidError extends GarageError {}
