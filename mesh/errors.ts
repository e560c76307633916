/**
 * Expected failures a user can act on. The CLI prints `message` on one line and exits non-zero;
 * anything that is not a GarageError is treated as a bug.
 */
export class GarageError extends Error {
  static override name = 'GarageError'
  override name = 'GarageError'
  readonly code: string

  constructor(message: string, code = 'GARAGE_ERROR', options?: ErrorOptions) {
    super(message, options)
    this.code = code
  }
}

export class IdentityKeyPermissionsError extends GarageError {
  static override name = 'IdentityKeyPermissionsError'
  override name = 'IdentityKeyPermissionsError'
}

export class IdentityKeyInvalidError extends GarageError {
  static override name = 'IdentityKeyInvalidError'
  override name = 'IdentityKeyInvalidError'
}
