import { createHash, randomBytes } from 'node:crypto'
import type { DatabaseSync, SQLOutputValue, StatementSync } from 'node:sqlite'
import { GarageError } from '../core/errors.ts'

/** Every API key starts with this, so it is recognisable in configs and secret scanners. */
export const apiKeyPrefix = 'gk_'
/** How many characters after `gk_` are kept in clear to tell keys apart in listings. */
export const visiblePrefixLength = 8
/** How long authenticate() trusts its memory of a key; a revocation by another process takes effect within it. */
export const authCacheTtlMs = 5_000
/** Cached keys beyond this are dropped oldest first (the cache holds only keys that authenticated). */
export const authCacheMaxEntries = 10_000
export const maxKeyNameLength = 64

// gk_ + 32 bytes in base64url (43 characters, no padding).
const keyPattern = /^gk_[A-Za-z0-9_-]{43}$/

export class ApiKeyNameError extends GarageError {}
export class ApiKeyNameTakenError extends GarageError {}
export class ApiKeyLimitError extends GarageError {}
export class ApiKeyNotFoundError extends GarageError {}
export class ApiKeyAmbiguousError extends GarageError {}
export class ApiKeyAlreadyRevokedError extends GarageError {}

/** Per-key limits; null means unlimited. */
export interface KeyLimits {
  /** requests per minute */
  rpm: number | null
  /** prompt + completion tokens per minute */
  tpm: number | null
  /** requests in flight at once */
  concurrency: number | null
}

/** What Garage knows about a key: never the key itself, nor its hash. */
export interface KeyInfo {
  readonly id: string
  readonly name: string
  /** The first characters after `gk_`, to recognise a key in a listing. */
  readonly prefix: string
  readonly limits: Readonly<KeyLimits>
  readonly createdAt: Date
  readonly revokedAt: Date | null
}

/** A new key: the only time the key text exists outside its holder's hands. */
export interface CreatedApiKey extends KeyInfo {
  readonly key: string
}

export interface CreateKeyInit {
  name: string
  rpm?: number | null
  tpm?: number | null
  concurrency?: number | null
}

export interface ApiKeyStoreOptions {
  now?: () => number
}

interface CacheEntry {
  info: KeyInfo
  expiresAt: number
}

/** sha256 of the whole key text, hex: what the database stores and looks keys up by. */
export function hashApiKey(key: string): string {
  return createHash('sha256').update(key).digest('hex')
}

/** Throws ApiKeyNameError unless the name is 1-64 printable characters without surrounding spaces. */
export function validateKeyName(name: string): string {
  const length = [...name].length
  if (length < 1 || length > maxKeyNameLength)
    throw new ApiKeyNameError(
      `a key name has 1 to ${maxKeyNameLength} characters, not ${length}`,
      'API_KEY_NAME_INVALID',
    )
  if (/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Cs}\p{Co}\p{Cn}]/u.test(name))
    throw new ApiKeyNameError(
      `key name ${JSON.stringify(name)} has a character that is not printable`,
      'API_KEY_NAME_INVALID',
    )
  if (name.trim() !== name)
    throw new ApiKeyNameError(
      `key name ${JSON.stringify(name)} starts or ends with a space`,
      'API_KEY_NAME_INVALID',
    )
  return name
}

function validateLimit(value: number | null | undefined, what: string): number | null {
  if (value == null) return null
  if (!Number.isSafeInteger(value) || value < 1)
    throw new ApiKeyLimitError(
      `${what} must be a whole number of at least 1 (leave it out for unlimited), not ${value}`,
      'API_KEY_LIMIT_INVALID',
    )
  return value
}

function toInfo(row: Record<string, SQLOutputValue>): KeyInfo {
  const num = (v: SQLOutputValue | undefined): number | null => (v == null ? null : Number(v))
  return Object.freeze({
    id: String(row.id),
    name: String(row.name),
    prefix: String(row.prefix),
    limits: Object.freeze({ rpm: num(row.rpm), tpm: num(row.tpm), concurrency: num(row.concurrency) }),
    createdAt: new Date(Number(row.created_at)),
    revokedAt: row.revoked_at == null ? null : new Date(Number(row.revoked_at)),
  })
}

const infoColumns = 'id, name, prefix, rpm, tpm, concurrency, created_at, revoked_at'

/**
 * The gateway's API keys in the federation database. Only sha256(key) is stored; the key is returned
 * once by create(). authenticate() remembers good keys for authCacheTtlMs, so a key revoked by another
 * process (`garage keys revoke`) stops working within that time; revoke() here, or invalidate(), is immediate.
 */
export class ApiKeyStore {
  private readonly db: DatabaseSync
  private readonly now: () => number
  private readonly cache = new Map<string, CacheEntry>()
  private readonly statements = new Map<string, StatementSync>()

  constructor(db: DatabaseSync, options: ApiKeyStoreOptions = {}) {
    this.db = db
    this.now = options.now ?? Date.now
  }

  create(init: CreateKeyInit): CreatedApiKey {
    const name = validateKeyName(init.name)
    const limits: KeyLimits = {
      rpm: validateLimit(init.rpm, 'rpm'),
      tpm: validateLimit(init.tpm, 'tpm'),
      concurrency: validateLimit(init.concurrency, 'concurrency'),
    }
    if (this.activeByName(name) != null) throw nameTaken(name)
    const key = apiKeyPrefix + randomBytes(32).toString('base64url')
    const id = `key_${randomBytes(6).toString('hex')}`
    const createdAt = this.now()
    try {
      this.sql(
        'INSERT INTO api_keys (id, name, prefix, hash, rpm, tpm, concurrency, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
      ).run(
        id,
        name,
        key.slice(apiKeyPrefix.length, apiKeyPrefix.length + visiblePrefixLength),
        hashApiKey(key),
        limits.rpm,
        limits.tpm,
        limits.concurrency,
        createdAt,
      )
    } catch (err) {
      // Another process took the name between the check and the insert.
      if (/UNIQUE constraint failed: api_keys\.name/.test((err as Error).message)) throw nameTaken(name)
      throw err
    }
    const info = this.byId(id) as KeyInfo
    return Object.freeze({ ...info, key })
  }

  /** Every key, active and revoked, oldest first. */
  list(): KeyInfo[] {
    return this.sql(`SELECT ${infoColumns} FROM api_keys ORDER BY created_at, id`).all().map(toInfo)
  }

  /**
   * The key a user means by REF: its id; else the active key with that visible prefix (with or
   * without `gk_`) or name; else such a revoked key.
   */
  find(ref: string): KeyInfo {
    const byId = this.byId(ref)
    if (byId != null) return byId
    const prefix = ref.startsWith(apiKeyPrefix) ? ref.slice(apiKeyPrefix.length) : ref
    const matches = this.sql(
      `SELECT ${infoColumns} FROM api_keys WHERE prefix = ? OR name = ? ORDER BY created_at, id`,
    )
      .all(prefix, ref)
      .map(toInfo)
    const active = matches.filter((k) => k.revokedAt == null)
    const candidates = active.length > 0 ? active : matches
    if (candidates.length === 1) return candidates[0] as KeyInfo
    if (candidates.length === 0)
      throw new ApiKeyNotFoundError(
        `no API key has the id, prefix or name ${JSON.stringify(ref)}; see garage keys list`,
        'API_KEY_NOT_FOUND',
      )
    throw new ApiKeyAmbiguousError(
      `${candidates.length} ${active.length > 0 ? 'active' : 'revoked'} keys match ${JSON.stringify(ref)} (${candidates.map((k) => k.id).join(', ')}); use the id`,
      'API_KEY_AMBIGUOUS',
    )
  }

  /** Revokes the key REF names (see find()); it stops authenticating here at once, elsewhere within authCacheTtlMs. */
  revoke(ref: string): KeyInfo {
    const key = this.find(ref)
    if (key.revokedAt != null)
      throw new ApiKeyAlreadyRevokedError(
        `key ${key.id} (${key.name}) was already revoked at ${key.revokedAt.toISOString()}`,
        'API_KEY_ALREADY_REVOKED',
      )
    this.sql('UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL').run(this.now(), key.id)
    this.invalidate()
    return this.byId(key.id) as KeyInfo
  }

  /**
   * The active key whose text is BEARER (the Authorization header's value after "Bearer "), or null.
   * A lookup by hash; good keys are remembered for authCacheTtlMs, unknown ones are not (a new key works at once).
   */
  authenticate(bearer: string): KeyInfo | null {
    if (!keyPattern.test(bearer)) return null
    const hash = hashApiKey(bearer)
    const now = this.now()
    const cached = this.cache.get(hash)
    if (cached != null && cached.expiresAt > now) return cached.info
    this.cache.delete(hash)
    const row = this.sql(`SELECT ${infoColumns} FROM api_keys WHERE hash = ? AND revoked_at IS NULL`).get(
      hash,
    )
    if (row == null) return null
    const info = toInfo(row)
    if (this.cache.size >= authCacheMaxEntries) this.cache.delete(this.cache.keys().next().value as string)
    this.cache.set(hash, { info, expiresAt: now + authCacheTtlMs })
    return info
  }

  /** Forgets every cached key, so the next authenticate() reads the database (e.g. after a revocation elsewhere). */
  invalidate(): void {
    this.cache.clear()
  }

  /** Prepared once per store: authenticate() runs on every request. */
  private sql(text: string): StatementSync {
    let statement = this.statements.get(text)
    if (statement == null) {
      statement = this.db.prepare(text)
      this.statements.set(text, statement)
    }
    return statement
  }

  private byId(id: string): KeyInfo | null {
    const row = this.sql(`SELECT ${infoColumns} FROM api_keys WHERE id = ?`).get(id)
    return row == null ? null : toInfo(row)
  }

  private activeByName(name: string): KeyInfo | null {
    const row = this.sql(`SELECT ${infoColumns} FROM api_keys WHERE name = ? AND revoked_at IS NULL`).get(
      name,
    )
    return row == null ? null : toInfo(row)
  }
}

function nameTaken(name: string): ApiKeyNameTakenError {
  return new ApiKeyNameTakenError(
    `an active key is already named ${JSON.stringify(name)}; pick another name or revoke that key first`,
    'API_KEY_NAME_TAKEN',
  )
}
