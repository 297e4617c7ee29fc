// Express, Hono and the Next.js helper, each behind a real HTTP server on 127.0.0.1, connected
// as a role that may only verify: every status code a request can get.
import assert from "node:assert/strict";
import type { AddressInfo } from "node:net";
import type { Server } from "node:http";
import { after, before, describe, test } from "node:test";
import express from "express";
import { Hono } from "hono";
import { serve } from "@hono/node-server";
import { Keypal } from "../src/index.js";
import { keypalMiddleware as expressKeypal } from "../src/express.js";
import { keypalMiddleware as honoKeypal, type KeypalVariables } from "../src/hono.js";
import { withApiKey } from "../src/next.js";
import { clients } from "./db.js";

const { admin, web, end } = clients();
const owner = `mw_${process.pid}_${Date.now()}`;

function listen(server: Server): Promise<string> {
  return new Promise((resolve) =>
    server.once("listening", () => resolve(`http://127.0.0.1:${(server.address() as AddressInfo).port}`)),
  );
}

/** Each app answers GET /api/data with the verified key's owner, requiring scope "read". */
const apps: Record<string, (keys: Keypal) => Promise<{ url: string; close(): void }>> = {
  async express(keys) {
    const app = express();
    app.use("/api", expressKeypal(keys, { scope: "read" }));
    app.get("/api/data", (req, res) => {
      res.json({ owner: req.keypal?.ownerId });
    });
    const server = app.listen(0, "127.0.0.1");
    return { url: await listen(server), close: () => server.close() };
  },
  async hono(keys) {
    const app = new Hono<{ Variables: KeypalVariables }>();
    app.use("/api/*", honoKeypal(keys, { scope: "read" }));
    app.get("/api/data", (c) => c.json({ owner: c.get("keypal").ownerId }));
    const server = serve({ fetch: app.fetch, port: 0, hostname: "127.0.0.1" }) as Server;
    return { url: await listen(server), close: () => server.close() };
  },
  async next(keys) {
    // A route module's `export const GET = withApiKey(…)`, served by a fetch-style server.
    const GET = withApiKey(keys, async (_req, { key }) => Response.json({ owner: key.ownerId }), {
      scope: "read",
      ip: (req) => req.headers.get("x-test-client-ip") ?? undefined,
    });
    const server = serve({ fetch: (req) => GET(req, {}), port: 0, hostname: "127.0.0.1" }) as Server;
    return { url: await listen(server), close: () => server.close() };
  },
};

interface Keys {
  good: string;
  noScope: string;
  revoked: string;
  unknown: string;
  limited: string;
  quota: string;
  ipOk: string;
  ipOther: string;
}

async function makeKeys(): Promise<Keys> {
  const make = async (o: Parameters<Keypal["create"]>[0]) => (await admin.create(o)).key;
  const good = await make({ ownerId: owner, scopes: ["read"] });
  const revoked = await admin.create({ ownerId: owner, scopes: ["read"] });
  await admin.revoke(revoked.id);
  // Same shape as a real key, one character changed: well-formed, unknown.
  const unknown = good.slice(0, -1) + (good.endsWith("A") ? "B" : "A");
  return {
    good,
    noScope: await make({ ownerId: owner, scopes: ["write"] }),
    revoked: revoked.key,
    unknown,
    limited: await make({ ownerId: owner, scopes: ["read"], rateLimit: { requests: 2, window: "1m" } }),
    quota: await make({ ownerId: owner, scopes: ["read"], quota: { limit: 1, period: "day" } }),
    ipOk: await make({ ownerId: owner, scopes: ["read"], allowedIps: ["127.0.0.1/32"] }),
    ipOther: await make({ ownerId: owner, scopes: ["read"], allowedIps: ["10.0.0.0/8"] }),
  };
}

async function get(url: string, headers: Record<string, string> = {}) {
  const res = await fetch(`${url}/api/data`, { headers });
  const body = (await res.json()) as { owner?: string; code?: string; error?: string };
  return { status: res.status, headers: res.headers, body };
}

after(end);

for (const [framework, start] of Object.entries(apps)) {
  describe(framework, () => {
    let app: { url: string; close(): void };
    let keys: Keys;
    before(async () => {
      app = await start(web);
      keys = await makeKeys();
    });
    after(() => app.close());

    test("200 with Authorization: Bearer, the verified key on the context", async () => {
      const r = await get(app.url, { authorization: `Bearer ${keys.good}` });
      assert.equal(r.status, 200);
      assert.deepEqual(r.body, { owner });
    });

    test("200 with x-api-key", async () => {
      const r = await get(app.url, { "x-api-key": keys.good });
      assert.equal(r.status, 200);
    });

    const unauthorized: Array<[string, (k: Keys) => Record<string, string>, string]> = [
      ["no key", () => ({}), "MISSING_KEY"],
      ["a malformed key", () => ({ authorization: "Bearer not-a-key" }), "INVALID_FORMAT"],
      ["an unknown key", (k) => ({ authorization: `Bearer ${k.unknown}` }), "INVALID_KEY"],
      ["a revoked key", (k) => ({ "x-api-key": k.revoked }), "REVOKED"],
    ];
    for (const [what, headers, code] of unauthorized) {
      test(`401 for ${what}`, async () => {
        const r = await get(app.url, headers(keys));
        assert.equal(r.status, 401);
        assert.equal(r.body.code, code);
        assert.match(r.headers.get("www-authenticate") ?? "", /^Bearer/);
        assert.equal(r.body.owner, undefined);
      });
    }

    test("403 for a key without the scope", async () => {
      const r = await get(app.url, { authorization: `Bearer ${keys.noScope}` });
      assert.equal(r.status, 403);
      assert.equal(r.body.code, "INSUFFICIENT_SCOPE");
      assert.equal(r.body.error, "Insufficient scope");
    });

    test("ip rules see the client's address", async () => {
      // Express and Hono read the socket (::ffff:127.0.0.1 is sent as 127.0.0.1); the Next
      // helper sends only what its `ip` option returns.
      const client = { "x-test-client-ip": "127.0.0.1" };
      const ok = await get(app.url, { ...client, authorization: `Bearer ${keys.ipOk}` });
      assert.equal(ok.status, 200);
      const other = await get(app.url, { ...client, authorization: `Bearer ${keys.ipOther}` });
      assert.equal(other.status, 403);
      assert.equal(other.body.code, "IP_NOT_ALLOWED");
    });

    test("429 with Retry-After past the rate limit", async () => {
      const auth = { authorization: `Bearer ${keys.limited}` };
      assert.equal((await get(app.url, auth)).status, 200);
      assert.equal((await get(app.url, auth)).status, 200);
      const r = await get(app.url, auth);
      assert.equal(r.status, 429);
      assert.equal(r.body.code, "RATE_LIMITED");
      // Whole seconds; a sliding window can make it up to two windows away.
      const after = Number(r.headers.get("retry-after"));
      assert.ok(Number.isInteger(after) && after >= 1 && after <= 120, `Retry-After ${after}`);
    });

    test("429 past a blocking quota", async () => {
      const auth = { "x-api-key": keys.quota };
      assert.equal((await get(app.url, auth)).status, 200);
      const r = await get(app.url, auth);
      assert.equal(r.status, 429);
      assert.equal(r.body.code, "QUOTA_EXCEEDED");
    });
  });
}

describe("a database failure is not a 401", () => {
  const broken = new Keypal({ connectionString: "postgres://keypal_web@127.0.0.1:1/none" });
  after(() => broken.end());

  test("express hands it to the app's error handler", async () => {
    let seen: unknown;
    const app = express();
    app.use("/api", expressKeypal(broken, { scope: "read" }));
    app.use((err: unknown, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
      seen = err;
      res.status(503).end();
    });
    const server = app.listen(0, "127.0.0.1");
    const url = await listen(server);
    try {
      const res = await fetch(`${url}/api/data`, { headers: { "x-api-key": "sk_anything" } });
      assert.equal(res.status, 503);
      assert.equal((seen as { code?: string }).code, "ECONNREFUSED");
    } finally {
      server.close();
    }
  });

  for (const framework of ["hono", "next"]) {
    test(`${framework} answers 500`, async () => {
      const { url, close } = await apps[framework](broken);
      try {
        const res = await fetch(`${url}/api/data`, { headers: { "x-api-key": "sk_anything" } });
        assert.equal(res.status, 500);
      } finally {
        close();
      }
    });
  }
});

describe("options", () => {
  test("a misspelt option is refused when the middleware is made", () => {
    assert.throws(() => expressKeypal(web, { scpoe: "read" } as never), /unknown option scpoe/);
    assert.throws(() => honoKeypal(web, { Scope: "read" } as never), TypeError);
    assert.throws(() => withApiKey(web, async () => new Response(), "read" as never), TypeError);
  });

  test("onDenied answers a refusal; if it throws, Express's error handler gets it", async () => {
    const app = express();
    app.get("/a", expressKeypal(web, { onDenied: (d, _req, res) => { res.status(418).json({ mine: d.code }); } }), (_q, r) => { r.end(); });
    app.get("/b", expressKeypal(web, { onDenied: () => { throw new Error("boom"); } }), (_q, r) => { r.end(); });
    app.use((err: Error, _req: express.Request, res: express.Response, _next: express.NextFunction) => {
      res.status(599).json({ error: err.message });
    });
    const server = app.listen(0, "127.0.0.1");
    const url = await listen(server);
    try {
      const a = await fetch(`${url}/a`);
      assert.equal(a.status, 418);
      assert.deepEqual(await a.json(), { mine: "MISSING_KEY" });
      const b = await fetch(`${url}/b`);
      assert.equal(b.status, 599);
      assert.deepEqual(await b.json(), { error: "boom" });
    } finally {
      server.close();
    }
  });
});
