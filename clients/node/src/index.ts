// keypal-pg: a thin client for the keypal PostgreSQL extension. Each method is one SQL function
// call with bind parameters; every rule (hashing, scopes, limits, audit) runs in the database.

import { isIP } from "node:net";
import pg from "pg";
import { translate } from "./errors.js";
import { ACTOR, call, type ArgTable, type Call, checkOptions, CREATE, LIST, REVOKE, ROTATE, UPDATE, VERIFY } from "./sql.js";

export * from "./errors.js";

/** The verify outcome codes of SPEC §4. */
export type ErrorCode =
  | "MISSING_KEY"
  | "INVALID_FORMAT"
  | "INVALID_KEY"
  | "REVOKED"
  | "DISABLED"
  | "EXPIRED"
  | "ENV_MISMATCH"
  | "IP_NOT_ALLOWED"
  | "REGION_NOT_ALLOWED"
  | "INSUFFICIENT_SCOPE"
  | "RATE_LIMITED"
  | "QUOTA_EXCEEDED";

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
/** `"type:id"` → scopes held on that resource, e.g. `{"project:123": ["read"]}`. */
export type Resources = Record<string, string[]>;
export interface RateLimit {
  requests: number;
  window: string;
}
export interface Quota {
  limit: number;
  period: "day" | "week" | "month" | "year";
  on_exceeded?: "block" | "warn" | "throttle";
}

interface Described {
  name?: string;
  description?: string;
  scopes?: string[];
  resources?: Resources;
  tags?: string[];
  metadata?: { [key: string]: Json };
}
interface Limits {
  /** `null` means no rate limit for this key, whatever the default. */
  rateLimit?: RateLimit | null;
  quota?: Quota | null;
  allowedIps?: string[];
  blockedIps?: string[];
  allowedRegions?: string[];
  blockedRegions?: string[];
}
interface Timing {
  /** A duration such as "30d", "1h", "2w". */
  expiresIn?: string;
  expiresAt?: Date | string;
}
interface Schedules {
  disableAt?: Date | string;
  revokeAt?: Date | string;
  notifyBefore?: string;
}

export interface CreateOptions extends Described, Limits, Timing, Schedules {
  ownerId: string;
  env?: string;
  orgId?: string;
  parentId?: string;
  policy?: string;
  /** Also return a per-key request-signing secret (shown once). */
  signing?: boolean;
  actor?: string;
}
export interface RotateOptions extends Described, Limits, Timing {
  /** How long the old key keeps verifying, e.g. "1h"; default: it stops at once. */
  grace?: string;
  actor?: string;
}
export interface UpdateOptions extends Described, Limits, Timing, Schedules {
  orgId?: string;
  actor?: string;
}
export interface ListOptions {
  ownerId?: string;
  orgId?: string;
  tag?: string;
  tags?: string[];
  env?: string;
  includeRevoked?: boolean;
  limit?: number;
  offset?: number;
}
export interface VerifyOptions {
  scope?: string;
  scopes?: string[];
  resource?: string;
  ip?: string;
  country?: string;
  env?: string;
  cost?: number;
}

export interface CreatedKey {
  /** The plaintext key: shown once, stored nowhere. */
  key: string;
  id: string;
  expiresAt: Date | null;
  env: string | null;
  signingSecret: string | null;
}
export interface RotatedKey extends CreatedKey {
  oldId: string;
}
export interface VerifyResult {
  valid: boolean;
  errorCode: ErrorCode | null;
  error: string | null;
  keyId: string | null;
  ownerId: string | null;
  orgId: string | null;
  env: string | null;
  name: string | null;
  scopes: string[] | null;
  resources: Resources | null;
  tags: string[] | null;
  metadata: { [key: string]: Json } | null;
  expiresAt: Date | null;
  rateLimited: boolean;
  retryAfterMs: number | null;
  rateLimitRemaining: number | null;
  quotaRemaining: number | null;
}
export interface ApiKeyRecord {
  id: string;
  ownerId: string | null;
  orgId: string | null;
  env: string | null;
  name: string | null;
  description: string | null;
  scopes: string[] | null;
  resources: Resources | null;
  tags: string[] | null;
  metadata: { [key: string]: Json } | null;
  enabled: boolean;
  createdAt: Date;
  updatedAt: Date | null;
  expiresAt: Date | null;
  lastUsedAt: Date | null;
  revokedAt: Date | null;
  revokeReason: string | null;
  revokedBy: string | null;
  rotatedFrom: string | null;
  rotatedTo: string | null;
  parentId: string | null;
  policy: string | null;
  rateLimit: RateLimit | null;
  quota: Quota | null;
  allowedIps: string[] | null;
  blockedIps: string[] | null;
  allowedRegions: string[] | null;
  blockedRegions: string[] | null;
  disableAt: Date | null;
  revokeAt: Date | null;
  /** An interval, as PostgreSQL prints it. */
  notifyBefore: string | null;
  algorithm: string;
}
export interface Usage {
  used: number;
  limit: number | null;
  remaining: number | null;
  resetsAt: Date | null;
  period: string | null;
  tokens: number;
  cost: number;
}

/** Request headers in any of the shapes frameworks hand out. */
export type HeaderSource =
  | { get(name: string): string | null | undefined }
  | Record<string, string | string[] | undefined>;

/** What keypal-pg needs of a pool: pg.Pool, pg.native.Pool, or one from another copy of pg. */
export interface Queryable {
  query(config: pg.QueryConfig & { types?: pg.CustomTypesConfig }): Promise<pg.QueryResult>;
  end(): Promise<void>;
}

export interface KeypalConfig {
  /** A pool of your own (its connections need only EXECUTE on what you call). */
  pool?: Queryable;
  /** Or a connection string (or pg.PoolConfig) for a pool keypal-pg owns. */
  connectionString?: string;
  poolConfig?: pg.PoolConfig;
  /** The schema keypal was installed in, when it is not on the search_path. */
  schema?: string;
  /**
   * Verify runs as a named prepared statement (parsed once per connection). Set false behind
   * a pooler that cannot keep them (PgBouncer before 1.21, transaction-mode poolers).
   */
  prepare?: boolean;
}

function isPool(x: unknown): x is Queryable {
  const p = x as Partial<Queryable> | null;
  return typeof p?.query === "function" && typeof p?.end === "function";
}

// bigint and numeric as numbers (counts, ms, cost all fit), an interval as PostgreSQL's text.
const NUMBERS = new Set([20, 1700]);
const INTERVAL = 1186;
const types = {
  getTypeParser(oid: number, format?: string): (value: string) => unknown {
    if (NUMBERS.has(oid)) return Number;
    if (oid === INTERVAL) return (v: string) => v;
    return pg.types.getTypeParser(oid, format as "text");
  },
} as pg.CustomTypesConfig;

const camel = (s: string) => s.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());

function camelRow<T>(row: Record<string, unknown>): T {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(row)) out[camel(k)] = v;
  return out as T;
}

/** Picks the key-bearing headers (the database reads them: Bearer first, then x-api-key). */
export function keyHeaders(headers: HeaderSource): Record<string, string> {
  const read = (name: string): string | undefined => {
    if (typeof (headers as { get?: unknown }).get === "function") {
      return (headers as { get(n: string): string | null | undefined }).get(name) ?? undefined;
    }
    const rec = headers as Record<string, string | string[] | undefined>;
    const hit = Object.keys(rec).find((k) => k.toLowerCase() === name);
    const v = hit === undefined ? undefined : rec[hit];
    return Array.isArray(v) ? v[0] : v;
  };
  const out: Record<string, string> = {};
  for (const name of ["authorization", "x-api-key"]) {
    const v = read(name);
    // JSON cannot carry NUL to PostgreSQL; a value with one is no key (and must not be echoed).
    if (v !== undefined && !v.includes("\0")) out[name] = v;
  }
  return out;
}

/**
 * `::ffff:10.0.0.1` (how Node reports IPv4 on a dual-stack socket) → `10.0.0.1`; anything that is
 * not one address (a Unix socket, a whole x-forwarded-for list) → undefined: no address, so a
 * key's allow list refuses.
 */
export function plainIp(ip: string | undefined | null): string | undefined {
  if (!ip) return undefined;
  const plain = ip.startsWith("::ffff:") && ip.includes(".") ? ip.slice(7) : ip;
  return isIP(plain) ? plain : undefined;
}

export class Keypal {
  readonly pool: Queryable;
  private readonly owned: boolean;
  private readonly prefix: string;
  private readonly prepare: boolean;

  constructor(config: KeypalConfig | Queryable) {
    if (isPool(config)) config = { pool: config };
    if (config.pool !== undefined && !isPool(config.pool)) throw new TypeError("keypal: pool has no query()/end()");
    if (!config.pool && !config.connectionString && !config.poolConfig) {
      throw new TypeError("keypal: give a pool, a connectionString or a poolConfig");
    }
    this.owned = !config.pool;
    this.pool =
      config.pool ?? new pg.Pool({ connectionString: config.connectionString, ...config.poolConfig });
    this.prefix = config.schema ? `"${config.schema.replace(/"/g, '""')}".` : "";
    this.prepare = config.prepare ?? true;
  }

  private async rows<T>(q: Call, name?: string): Promise<T[]> {
    try {
      // The statement's name carries the schema: one name, one text, on every connection.
      const named = name && this.prepare ? { name: `${name}${this.prefix}` } : {};
      const res = await this.pool.query({ ...q, ...named, types });
      return res.rows.map((r) => camelRow<T>(r));
    } catch (err) {
      throw translate(err);
    }
  }

  private async one<T>(q: Call, name?: string): Promise<T> {
    const [row] = await this.rows<T>(q, name);
    return row;
  }

  private fn(name: string): string {
    return this.prefix + name;
  }

  private byId(fn: string, id: string, table: ArgTable = {}, options: object = {}): Call {
    return call(this.fn(fn), [["id", "uuid", id]], table, options);
  }

  // ---- create

  async create(options: CreateOptions): Promise<CreatedKey> {
    return this.one(call(this.fn("keypal_create"), [], CREATE, options));
  }

  /** All in one transaction: every key is created, or none. */
  async createMany(specs: CreateOptions[]): Promise<CreatedKey[]> {
    const snake = specs.map((s) =>
      Object.fromEntries(Object.entries(checkOptions(s, CREATE, "keypal_create_many")).map(([k, v]) => [CREATE[k][0], v])),
    );
    return this.rows(call(this.fn("keypal_create_many"), [["specs", "jsonb", snake]], {}));
  }

  // ---- verify (any role may call these)

  /**
   * Verifies a key, or the key in request headers (`Authorization: Bearer …`, then
   * `x-api-key`). Never throws for a bad key: read `valid` and `errorCode`.
   */
  async verify(key: string | null | undefined | HeaderSource, options: VerifyOptions = {}): Promise<VerifyResult> {
    const o = checkOptions(options, VERIFY, "keypal_verify");
    const rest = [o.scope, o.scopes, o.resource, plainIp(o.ip), o.country, o.env, o.cost];
    const args = "$2, $3::text[], $4, $5::inet, $6, $7, $8";
    if (key !== null && typeof key === "object") {
      const text = `SELECT * FROM ${this.fn("keypal_verify_headers")}($1::jsonb, ${args})`;
      return this.one({ text, values: [JSON.stringify(keyHeaders(key)), ...rest] }, "keypal_verify_headers");
    }
    const text = `SELECT * FROM ${this.fn("keypal_verify")}($1, ${args})`;
    return this.one({ text, values: [key ?? null, ...rest] }, "keypal_verify");
  }

  async verifyMany(keys: string[], options: VerifyOptions = {}): Promise<VerifyResult[]> {
    const o = checkOptions(options, VERIFY, "keypal_verify_many");
    return this.rows({
      text: `SELECT * FROM ${this.fn("keypal_verify_many")}($1::text[], $2, $3::text[], $4, $5::inet, $6, $7, $8)`,
      values: [keys, o.scope, o.scopes, o.resource, plainIp(o.ip), o.country, o.env, o.cost],
    });
  }

  async hasScope(keyId: string, scope: string, resource?: string): Promise<boolean> {
    const q = call(this.fn("keypal_has_scope"), [["key_id", "uuid", keyId], ["scope", "text", scope]], {
      resource: ["resource", "text"],
    }, { resource });
    const row = await this.one<{ keypalHasScope: boolean }>(q);
    return row.keypalHasScope;
  }

  // ---- lifecycle

  /** Revokes the key and, in the same transaction (by trigger), every descendant. Returns 1, or 0 if it was already revoked. */
  async revoke(id: string, options: { reason?: string; actor?: string } = {}): Promise<number> {
    const row = await this.one<{ keypalRevoke: number }>(this.byId("keypal_revoke", id, REVOKE, options));
    return row.keypalRevoke;
  }

  /** Returns how many of `ids` were newly revoked (descendants revoked by cascade are not counted). */
  async revokeMany(ids: string[], options: { reason?: string; actor?: string } = {}): Promise<number> {
    const q = call(this.fn("keypal_revoke_many"), [["ids", "uuid[]", ids]], REVOKE, options);
    const row = await this.one<{ keypalRevokeMany: number }>(q);
    return row.keypalRevokeMany;
  }

  async rotate(id: string, options: RotateOptions = {}): Promise<RotatedKey> {
    return this.one(this.byId("keypal_rotate", id, ROTATE, options));
  }

  async enable(id: string, options: { actor?: string } = {}): Promise<boolean> {
    const row = await this.one<{ keypalEnable: boolean }>(this.byId("keypal_enable", id, ACTOR, options));
    return row.keypalEnable;
  }

  async disable(id: string, options: { actor?: string } = {}): Promise<boolean> {
    const row = await this.one<{ keypalDisable: boolean }>(this.byId("keypal_disable", id, ACTOR, options));
    return row.keypalDisable;
  }

  /** Changes only what is given; `null` for `rateLimit`/`quota` clears it. */
  async update(id: string, changes: UpdateOptions): Promise<ApiKeyRecord> {
    return this.one(this.byId("keypal_update", id, UPDATE, changes));
  }

  async get(id: string): Promise<ApiKeyRecord> {
    return this.one(this.byId("keypal_get", id));
  }

  async list(options: ListOptions = {}): Promise<ApiKeyRecord[]> {
    return this.rows(call(this.fn("keypal_list"), [], LIST, options));
  }

  /** Quota use in the current period and custom usage (exact: counts not yet flushed included). */
  async usage(id: string): Promise<Usage> {
    return this.one(call(this.fn("keypal_usage"), [["key_id", "uuid", id]], {}));
  }

  /** Closes the pool if keypal-pg made it. */
  async end(): Promise<void> {
    if (this.owned) await this.pool.end();
  }
}
