// Hono middleware: verifies the request's key, answers 401/403/429, and sets `c.get("keypal")`.

import type { Context, MiddlewareHandler } from "hono";
import type { Keypal, VerifyResult } from "./index.js";
import { checkGuard, type Denial, guard, type GuardOptions } from "./http.js";

/** Use as `new Hono<{ Variables: KeypalVariables }>()` to type `c.get("keypal")`. */
export type KeypalVariables = { keypal: VerifyResult };

export interface HonoOptions extends GuardOptions<Context> {
  onDenied?: (denial: Denial, c: Context) => Response | Promise<Response>;
}

/** On @hono/node-server the socket's address; elsewhere none (pass `ip` for your runtime). */
function socketIp(c: Context): string | undefined {
  const env = c.env as { incoming?: { socket?: { remoteAddress?: string } } } | undefined;
  return env?.incoming?.socket?.remoteAddress;
}

export function keypalMiddleware(keys: Keypal, options: HonoOptions = {}): MiddlewareHandler<{ Variables: KeypalVariables }> {
  checkGuard(options, "keypalMiddleware");
  return async (c, next) => {
    const { result, denied } = await guard(keys, c.req.raw.headers, c as Context, options, socketIp);
    if (denied) {
      if (options.onDenied) return options.onDenied(denied, c as Context);
      return c.json(denied.body, denied.status, denied.headers);
    }
    c.set("keypal", result);
    await next();
  };
}

/** The keypal library's name for it. */
export const keysMiddleware = keypalMiddleware;
