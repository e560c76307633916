import { createHash, randomBytes } from 'node:crypto'
import { GarageError } from '../core/errors.ts'
import type { FederationStore, StoredKey } from './store.ts'

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

function toInfo(key: StoredKey): KeyInfo {
  return Object.freeze({
    id: key.id,
    name: key.name,
    prefix: key.prefix,
    limits: Object.freeze({ rpm: key.rpm, tpm: key.tpm, concurrency: key.concurrency }),
    createdAt: new Date(key.createdAt),
    revokedAt: key.revokedAt == null ? null : new Date(key.revokedAt),
  })
}

const infoOrNull = (key: StoredKey | null): KeyInfo | null => (key == null ? null : toInfo(key))

/**
 * The gateway's API keys in the federation store (SQLite or PostgreSQL). Only sha256(key) is stored;
 * the key is returned once by create(). authenticate() remembers good keys for authCacheTtlMs, so a
 * key revoked by another process (`garage keys revoke`, another gateway) stops working within that
 * time; revoke() here, or invalidate(), is immediate.
 */
export class ApiKeyStore {
  private readonly store: FederationStore
  private readonly now: () => number
  private readonly cache = new Map<string, CacheEntry>()

  constructor(store: FederationStore, options: ApiKeyStoreOptions = {}) {
    this.store = store
    this.now = options.now ?? Date.now
  }

  async create(init: CreateKeyInit): Promise<CreatedApiKey> {
    const name = validateKeyName(init.name)
    const limits: KeyLimits = {
      rpm: validateLimit(init.rpm, 'rpm'),
      tpm: validateLimit(init.tpm, 'tpm'),
      concurrency: validateLimit(init.concurrency, 'concurrency'),
    }
    if ((await this.store.activeKeyByName(name)) != null) throw nameTaken(name)
    const key = apiKeyPrefix + randomBytes(32).toString('base64url')
    const id = `key_${randomBytes(6).toString('hex')}`
    const inserted = await this.store.insertKey({
      id,
      name,
      prefix: key.slice(apiKeyPrefix.length, apiKeyPrefix.length + visiblePrefixLength),
      hash: hashApiKey(key),
      ...limits,
      createdAt: this.now(),
      revokedAt: null,
    })
    // Another process took the name between the check and the insert.
    if (!inserted) throw nameTaken(name)
    const info = (await this.byId(id)) as KeyInfo
    return Object.freeze({ ...info, key })
  }

  /** Every key, active and revoked, oldest first. */
  async list(): Promise<KeyInfo[]> {
    return (await this.store.listKeys()).map(toInfo)
  }

  /**
   * The key a user means by REF: its id; else the active key with that visible prefix (with or
   * without `gk_`) or name; else such a revoked key.
   */
  async find(ref: string): Promise<KeyInfo> {
    const byId = await this.byId(ref)
    if (byId != null) return byId
    const prefix = ref.startsWith(apiKeyPrefix) ? ref.slice(apiKeyPrefix.length) : ref
    const matches = (await this.store.keysByPrefixOrName(prefix, ref)).map(toInfo)
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
  async revoke(ref: string): Promise<KeyInfo> {
    const key = await this.find(ref)
    if (key.revokedAt != null)
      throw new ApiKeyAlreadyRevokedError(
        `key ${key.id} (${key.name}) was already revoked at ${key.revokedAt.toISOString()}`,
        'API_KEY_ALREADY_REVOKED',
      )
    await this.store.revokeKey(key.id, this.now())
    this.invalidate()
    return (await this.byId(key.id)) as KeyInfo
  }

  /**
   * The active key whose text is BEARER (the Authorization header's value after "Bearer "), or null.
   * A lookup by hash; good keys are remembered for authCacheTtlMs, unknown ones are not (a new key works at once).
   */
  async authenticate(bearer: string): Promise<KeyInfo | null> {
    if (!keyPattern.test(bearer)) return null
    const hash = hashApiKey(bearer)
    const now = this.now()
    const cached = this.cache.get(hash)
    if (cached != null && cached.expiresAt > now) return cached.info
    this.cache.delete(hash)
    const info = infoOrNull(await this.store.activeKeyByHash(hash))
    if (info == null) return null
    if (this.cache.size >= authCacheMaxEntries) this.cache.delete(this.cache.keys().next().value as string)
    this.cache.set(hash, { info, expiresAt: now + authCacheTtlMs })
    return info
  }

  /** Forgets every cached key, so the next authenticate() reads the database (e.g. after a revocation elsewhere). */
  invalidate(): void {
    this.cache.clear()
  }

  private async byId(id: string): Promise<KeyInfo | null> {
    return infoOrNull(await this.store.keyById(id))
  }
}

function nameTaken(name: string): ApiKeyNameTakenError {
  return new ApiKeyNameTakenError(
    `an active key is already named ${JSON.stringify(name)}; pick another name or revoke that key first`,
    'API_KEY_NAME_TAKEN',
  )
}
