// Builds one SQL function call with bind parameters from an options object. Every value is a
// parameter; the only text put into the SQL is from the fixed argument tables below.

/** camelCase option → [SQL argument name, SQL type of its parameter]. */
export type ArgTable = Record<string, readonly [string, string]>;

const timing: ArgTable = {
  expiresIn: ["expires_in", "text"],
  expiresAt: ["expires_at", "timestamptz"],
};

const limits: ArgTable = {
  rateLimit: ["rate_limit", "jsonb"],
  quota: ["quota", "jsonb"],
  allowedIps: ["allowed_ips", "text[]"],
  blockedIps: ["blocked_ips", "text[]"],
  allowedRegions: ["allowed_regions", "text[]"],
  blockedRegions: ["blocked_regions", "text[]"],
};

const described: ArgTable = {
  name: ["name", "text"],
  description: ["description", "text"],
  scopes: ["scopes", "text[]"],
  resources: ["resources", "jsonb"],
  tags: ["tags", "text[]"],
  metadata: ["metadata", "jsonb"],
};

const schedules: ArgTable = {
  disableAt: ["disable_at", "timestamptz"],
  revokeAt: ["revoke_at", "timestamptz"],
  notifyBefore: ["notify_before", "text"],
};

export const ACTOR: ArgTable = { actor: ["actor", "text"] };
const actor = ACTOR;

export const CREATE: ArgTable = {
  ownerId: ["owner_id", "text"],
  ...described,
  ...timing,
  env: ["env", "text"],
  orgId: ["org_id", "text"],
  parentId: ["parent_id", "uuid"],
  policy: ["policy", "text"],
  ...limits,
  ...schedules,
  signing: ["signing", "boolean"],
  ...actor,
};

export const ROTATE: ArgTable = { grace: ["grace", "text"], ...described, ...timing, ...limits, ...actor };

export const UPDATE: ArgTable = {
  ...described,
  ...timing,
  orgId: ["org_id", "text"],
  ...limits,
  ...schedules,
  ...actor,
};

export const LIST: ArgTable = {
  ownerId: ["owner_id", "text"],
  orgId: ["org_id", "text"],
  tag: ["tag", "text"],
  tags: ["tags", "text[]"],
  env: ["env", "text"],
  includeRevoked: ["include_revoked", "boolean"],
  limit: ['"limit"', "integer"],
  offset: ['"offset"', "integer"],
};

export const REVOKE: ArgTable = { reason: ["reason", "text"], ...actor };

/** keypal_verify's options after the key (their order is the function's). */
export const VERIFY: ArgTable = {
  scope: ["scope", "text"],
  scopes: ["scopes", "text[]"],
  resource: ["resource", "text"],
  ip: ["ip", "inet"],
  country: ["country", "text"],
  env: ["env", "text"],
  cost: ["cost", "integer"],
};

/** The options object itself, after refusing anything not in `table` (a typo must not drop a check). */
export function checkOptions<T extends object>(options: T, table: ArgTable, fn: string): T {
  if (options === null || typeof options !== "object" || Array.isArray(options)) {
    throw new TypeError(`keypal: the options of ${fn} must be an object`);
  }
  for (const key of Object.keys(options)) {
    if (!Object.hasOwn(table, key)) throw new TypeError(`keypal: unknown option ${key} for ${fn}`);
  }
  return options;
}

export interface Call {
  text: string;
  values: unknown[];
}

function param(value: unknown, type: string): unknown {
  // JSON null is a value keypal understands ("clear this setting"), unlike SQL NULL.
  if (type === "jsonb") return JSON.stringify(value);
  return value;
}

/**
 * `SELECT * FROM fn(first => $1::type, name => $2::type, …)`: `first` are the leading
 * arguments always passed; of `options`, only the ones set (not undefined; for non-JSON
 * arguments not null either) are passed, so the function's defaults apply to the rest.
 */
export function call(
  fn: string,
  first: ReadonlyArray<readonly [string, string, unknown]>,
  table: ArgTable,
  options: object = {},
): Call {
  const args: string[] = [];
  const values: unknown[] = [];
  const add = (name: string, type: string, value: unknown) => {
    values.push(param(value, type));
    args.push(`${name} => $${values.length}::${type}`);
  };
  for (const [name, type, value] of first) add(name, type, value);
  for (const [key, value] of Object.entries(checkOptions(options, table, fn))) {
    const [name, type] = table[key];
    if (value === undefined || (value === null && type !== "jsonb")) continue;
    add(name, type, value);
  }
  return { text: `SELECT * FROM ${fn}(${args.join(", ")})`, values };
}
