// Next.js App Router route helper (any fetch-style handler: Request in, Response out).

import type { Keypal, VerifyResult } from "./index.js";
import { checkGuard, type Denial, guard, type GuardOptions } from "./http.js";

export interface NextOptions extends GuardOptions<Request> {
  onDenied?: (denial: Denial, req: Request) => Response | Promise<Response>;
}

export type KeyedHandler<Ctx> = (req: Request, ctx: Ctx & { key: VerifyResult }) => Response | Promise<Response>;

/**
 * `export const GET = withApiKey(keys, async (req, { key }) => Response.json({ owner: key.ownerId }), { scope: "read" })`.
 * No client address is sent by default (a route handler has none it can trust); pass `ip` to
 * use the key's ip rules — behind your own proxy, the right-most x-forwarded-for hop it added
 * (the rest of that header is the client's to write). The handler's key is `key`, where the
 * TypeScript keypal's was `record`.
 */
export function withApiKey<Ctx extends object = object>(
  keys: Keypal,
  handler: KeyedHandler<Ctx>,
  options: NextOptions = {},
): (req: Request, ctx: Ctx) => Promise<Response> {
  checkGuard(options, "withApiKey");
  return async (req, ctx) => {
    const { result, denied } = await guard(keys, req.headers, req, options, () => undefined);
    if (!denied) return handler(req, { ...ctx, key: result });
    if (options.onDenied) return options.onDenied(denied, req);
    return Response.json(denied.body, { status: denied.status, headers: denied.headers });
  };
}
