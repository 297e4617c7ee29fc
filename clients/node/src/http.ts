// What the framework middleware share: which options a request is verified with, and which HTTP
// answer a failed verify becomes. Pure apart from the one verify call.

import type { ErrorCode, HeaderSource, Keypal, VerifyOptions, VerifyResult } from "./index.js";

type PerRequest<Req, T> = T | ((req: Req) => T | undefined);

export interface GuardOptions<Req> {
  /** One scope the key must hold. */
  scope?: string;
  /** Every one of these scopes. */
  scopes?: string[];
  /** A resource ("project:123") whose scopes also count; may be read from the request. */
  resource?: PerRequest<Req, string>;
  /** The environment the key must belong to ("live"). */
  env?: string;
  /** Quota units this request costs (default 1). */
  cost?: PerRequest<Req, number>;
  /** The client address checked against the key's ip rules; `false` sends none. */
  ip?: false | ((req: Req) => string | undefined);
  /** ISO country code checked against the key's region rules. */
  country?: (req: Req) => string | undefined;
}

export interface Denial {
  status: 401 | 403 | 429;
  code: ErrorCode;
  message: string;
  headers: Record<string, string>;
  body: { error: string; code: ErrorCode };
}

const FORBIDDEN = new Set<ErrorCode>(["ENV_MISMATCH", "IP_NOT_ALLOWED", "REGION_NOT_ALLOWED", "INSUFFICIENT_SCOPE"]);
const LIMITED = new Set<ErrorCode>(["RATE_LIMITED", "QUOTA_EXCEEDED"]);

/**
 * The HTTP answer for a failed verify: 401 when the key itself is bad (missing, malformed,
 * unknown, revoked, disabled, expired), 403 when it is good but not for this request, 429 with
 * Retry-After (whole seconds, at least 1) over a rate limit or quota. `null` when valid.
 */
export function denial(result: VerifyResult): Denial | null {
  if (result.valid) return null;
  const code = result.errorCode ?? "INVALID_KEY";
  const message = result.error ?? "Invalid API key";
  const headers: Record<string, string> = {};
  let status: Denial["status"] = 401;
  if (FORBIDDEN.has(code)) {
    status = 403;
  } else if (LIMITED.has(code)) {
    status = 429;
    if (result.retryAfterMs !== null) headers["Retry-After"] = String(Math.max(1, Math.ceil(result.retryAfterMs / 1000)));
  } else {
    headers["WWW-Authenticate"] = code === "MISSING_KEY" ? "Bearer" : 'Bearer error="invalid_token"';
  }
  return { status, code, message, headers, body: { error: message, code } };
}

const GUARD_OPTIONS = new Set(["scope", "scopes", "resource", "env", "cost", "ip", "country", "onDenied"]);

/** Refuses a misspelt option when the middleware is made: `{ scpoe: "read" }` would drop the scope check. */
export function checkGuard<O extends object>(options: O, helper: string): O {
  if (options === null || typeof options !== "object" || Array.isArray(options)) {
    throw new TypeError(`keypal: the options of ${helper} must be an object`);
  }
  for (const key of Object.keys(options)) {
    if (!GUARD_OPTIONS.has(key)) throw new TypeError(`keypal: unknown option ${key} for ${helper}`);
  }
  return options;
}

function pick<Req, T>(value: PerRequest<Req, T> | undefined, req: Req): T | undefined {
  return typeof value === "function" ? (value as (r: Req) => T | undefined)(req) : value;
}

/** Verifies the key in `headers` with the options resolved for this request. */
export async function guard<Req>(
  keys: Keypal,
  headers: HeaderSource,
  req: Req,
  options: GuardOptions<Req>,
  defaultIp: (req: Req) => string | undefined,
): Promise<{ result: VerifyResult; denied: Denial | null }> {
  const verifyOptions: VerifyOptions = {
    scope: options.scope,
    scopes: options.scopes,
    resource: pick(options.resource, req),
    env: options.env,
    cost: pick(options.cost, req),
    ip: options.ip === false ? undefined : (options.ip ?? defaultIp)(req),
    country: options.country?.(req),
  };
  const result = await keys.verify(headers, verifyOptions);
  return { result, denied: denial(result) };
}
