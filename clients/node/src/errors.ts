// Errors raised by keypal's SQL functions, as typed exceptions. The class follows the SQLSTATE
// (SPEC §5); `code` is keypal's machine code from the error's DETAIL when it has one.

export class KeypalError extends Error {
  /** The SQLSTATE PostgreSQL reported, e.g. "P0002". */
  readonly sqlstate: string;
  /** keypal's machine code (KEY_NOT_FOUND, INSUFFICIENT_SCOPE, …), else the SQLSTATE. */
  readonly code: string;
  readonly detail?: string;
  readonly hint?: string;

  constructor(message: string, sqlstate: string, detail?: string, hint?: string, cause?: unknown) {
    super(message, { cause });
    this.name = new.target.name;
    this.sqlstate = sqlstate;
    this.detail = detail;
    this.hint = hint;
    this.code = detail && /^[A-Z][A-Z_]+$/.test(detail) ? detail : sqlstate;
  }
}

/** P0002: no key (or webhook, event) with that id. */
export class KeypalNotFoundError extends KeypalError {}
/** 22xxx / 23xxx: a bad argument, named in the message; nothing was written. */
export class KeypalInvalidArgumentError extends KeypalError {}
/** 55000: the key is in a state that forbids the change (e.g. CANNOT_MODIFY_REVOKED). */
export class KeypalStateError extends KeypalError {}
/** 28000: keypal_require/keypal_authenticate refused the key itself. */
export class KeypalUnauthorizedError extends KeypalError {}
/** 42501: a scope, environment, ip or region rule refused, or the role lacks a privilege. */
export class KeypalForbiddenError extends KeypalError {}
/** 53400: over a rate limit or quota; `retryAfterMs` is read from the HINT when given. */
export class KeypalLimitError extends KeypalError {
  get retryAfterMs(): number | undefined {
    const m = this.hint?.match(/(\d+)\s*ms/);
    return m ? Number(m[1]) : undefined;
  }
}

type ErrorClass = new (
  message: string,
  sqlstate: string,
  detail?: string,
  hint?: string,
  cause?: unknown,
) => KeypalError;

function classFor(sqlstate: string): ErrorClass {
  if (sqlstate === "P0002") return KeypalNotFoundError;
  if (sqlstate === "55000") return KeypalStateError;
  if (sqlstate === "28000") return KeypalUnauthorizedError;
  if (sqlstate === "42501") return KeypalForbiddenError;
  if (sqlstate === "53400") return KeypalLimitError;
  if (sqlstate.startsWith("22") || sqlstate.startsWith("23")) return KeypalInvalidArgumentError;
  return KeypalError;
}

interface PgErrorLike {
  message: string;
  severity?: string;
  code?: string;
  detail?: string;
  hint?: string;
}

/** A database error becomes the matching KeypalError; anything else (a lost connection) is kept. */
export function translate(err: unknown): unknown {
  const e = err as PgErrorLike;
  // Only the server's errors carry a severity (a socket's EPIPE also has five capitals).
  if (!e || typeof e.severity !== "string" || typeof e.code !== "string" || !/^[0-9A-Z]{5}$/.test(e.code)) return err;
  const Class = classFor(e.code);
  return new Class(e.message, e.code, e.detail, e.hint, err);
}
