// One HTTP server for the client bench: GET /api/data behind keypal's middleware (scope
// "read"), answering the verified key's owner. Connection from DATABASE_URL; pool of POOL.
// FRAMEWORK-plain: the same route with no middleware (the framework's own ceiling).
//   node server.mjs express|hono|next[-plain] PORT
import { Keypal } from "../dist/src/index.js";

const [name, port] = process.argv.slice(2);
const [framework, plain] = name.split("-");
// A pass-through in the plain servers: (req, res, next) for Express, (c, next) for Hono.
const guard = (mw) => (plain ? (...args) => args.at(-1)() : mw);
const keys = new Keypal({ connectionString: process.env.DATABASE_URL, poolConfig: { max: Number(process.env.POOL ?? 4) } });

async function start() {
  if (framework === "express") {
    const { default: express } = await import("express");
    const { keypalMiddleware } = await import("../dist/src/express.js");
    const app = express();
    app.use("/api", guard(keypalMiddleware(keys, { scope: "read" })));
    app.get("/api/data", (req, res) => res.json({ owner: req.keypal?.ownerId ?? "plain" }));
    app.listen(Number(port), "127.0.0.1");
    return;
  }
  const { serve } = await import("@hono/node-server");
  let fetch;
  if (framework === "hono") {
    const { Hono } = await import("hono");
    const { keypalMiddleware } = await import("../dist/src/hono.js");
    const app = new Hono();
    app.use("/api/*", guard(keypalMiddleware(keys, { scope: "read" })));
    app.get("/api/data", (c) => c.json({ owner: c.get("keypal")?.ownerId ?? "plain" }));
    fetch = app.fetch;
  } else {
    const { withApiKey } = await import("../dist/src/next.js");
    const GET = withApiKey(keys, async (_req, { key }) => Response.json({ owner: key.ownerId }), { scope: "read" });
    fetch = (req) => GET(req, {});
  }
  serve({ fetch, port: Number(port), hostname: "127.0.0.1" });
}
await start();
