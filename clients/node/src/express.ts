// Express middleware: verifies the request's key, answers 401/403/429 itself, and puts the
// verified key on `req.keypal`.

import type { NextFunction, Request, RequestHandler, Response } from "express";
import type { Keypal, VerifyResult } from "./index.js";
import { checkGuard, type Denial, guard, type GuardOptions } from "./http.js";

declare global {
  // eslint-disable-next-line @typescript-eslint/no-namespace
  namespace Express {
    interface Request {
      /** The verified key, set by keypal-pg's middleware. */
      keypal?: VerifyResult;
    }
  }
}

export interface ExpressOptions extends GuardOptions<Request> {
  /** Answer a refusal yourself (default: JSON `{error, code}` with the status and headers). */
  onDenied?: (denial: Denial, req: Request, res: Response) => void;
}

/** Default client address: `req.ip`, which honours Express's `trust proxy` setting. */
const requestIp = (req: Request) => req.ip ?? req.socket.remoteAddress;

export function keypalMiddleware(keys: Keypal, options: ExpressOptions = {}): RequestHandler {
  checkGuard(options, "keypalMiddleware");
  return (req: Request, res: Response, next: NextFunction) => {
    guard(keys, req.headers, req, options, requestIp)
      .then(({ result, denied }) => {
        if (!denied) {
          req.keypal = result;
          return next();
        }
        if (options.onDenied) return options.onDenied(denied, req, res);
        res.status(denied.status).set(denied.headers).json(denied.body);
      })
      // A database error (or a throwing onDenied) goes to Express's error handling, never
      // to an unhandled rejection; a falsy reason must not read as "carry on".
      .catch((err: unknown) => {
        if (!res.headersSent) next(err ?? new Error("keypal: verify failed"));
      });
  };
}

/** The keypal library's name for it. */
export const createKeysMiddleware = keypalMiddleware;
