// The client against the real extension: each method, its types, and its errors.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import {
  KeypalError,
  KeypalForbiddenError,
  KeypalInvalidArgumentError,
  KeypalNotFoundError,
  KeypalStateError,
  keyHeaders,
  plainIp,
} from "../src/index.js";
import { Keypal } from "../src/index.js";
import { clients, pool } from "./db.js";

const { admin, web, end } = clients();
after(end);
const owner = `node_${process.pid}_${Date.now()}`;

describe("create, verify, read", () => {
  test("a created key verifies, typed and camelCased", async () => {
    const created = await admin.create({
      ownerId: owner,
      name: "ci",
      scopes: ["read", "write"],
      resources: { "project:1": ["deploy"] },
      tags: ["a", "b"],
      metadata: { plan: "pro", n: 3 },
      expiresIn: "30d",
    });
    assert.match(created.key, /^[A-Za-z0-9_]{24,}$/);
    assert.match(created.id, /^[0-9a-f-]{36}$/);
    assert.ok(created.expiresAt instanceof Date);
    const days = (created.expiresAt!.getTime() - Date.now()) / 86_400_000;
    assert.ok(days > 29.9 && days <= 30, `expires in ${days} days`);

    const r = await web.verify(created.key, { scope: "read" });
    assert.equal(r.valid, true);
    assert.equal(r.errorCode, null);
    assert.equal(r.keyId, created.id);
    assert.equal(r.ownerId, owner);
    assert.deepEqual(r.scopes, ["read", "write"]);
    assert.deepEqual(r.metadata, { plan: "pro", n: 3 });
    assert.equal(r.rateLimited, false);

    assert.equal((await web.verify(created.key, { scope: "deploy", resource: "project:1" })).valid, true);
    const denied = await web.verify(created.key, { scope: "deploy" });
    assert.equal(denied.valid, false);
    assert.equal(denied.errorCode, "INSUFFICIENT_SCOPE");
    assert.equal(await admin.hasScope(created.id, "deploy", "project:1"), true);
    assert.equal(await web.hasScope(created.id, "deploy", "project:1"), false, "only for callers allowed keypal_get");
    assert.equal(await admin.hasScope(created.id, "deploy"), false);

    const rec = await admin.get(created.id);
    assert.equal(rec.ownerId, owner);
    assert.equal(rec.enabled, true);
    assert.deepEqual(rec.tags, ["a", "b"]);
    assert.ok(rec.createdAt instanceof Date);
    assert.equal(rec.algorithm, "sha256");
    assert.ok(!("keyHash" in rec) && !("hash" in rec), "no hash is returned");
  });

  test("verify reads Authorization: Bearer, then x-api-key, from any header shape", async () => {
    const { key } = await admin.create({ ownerId: owner, scopes: ["read"] });
    assert.equal((await web.verify({ authorization: `Bearer ${key}` })).valid, true);
    assert.equal((await web.verify({ "X-API-Key": key })).valid, true);
    assert.equal((await web.verify(new Headers({ "x-api-key": key }))).valid, true);
    assert.equal((await web.verify({})).errorCode, "MISSING_KEY");
    assert.equal((await web.verify(null)).errorCode, "MISSING_KEY");
    assert.equal((await web.verify("sk_short")).errorCode, "INVALID_FORMAT");
    assert.deepEqual(keyHeaders({ Authorization: ["Bearer x", "y"], other: "z" }), { authorization: "Bearer x" });
  });

  test("values are bound, never spliced into SQL", async () => {
    const hostile = `o'); DROP TABLE keypal.keys; --${owner}`;
    const { id } = await admin.create({ ownerId: hostile, name: "$1 \\ '" });
    const rec = await admin.get(id);
    assert.equal(rec.ownerId, hostile);
    assert.equal(rec.name, "$1 \\ '");
    assert.equal((await admin.list({ ownerId: hostile })).length, 1);
  });

  test("createMany and verifyMany keep order; list filters", async () => {
    const made = await admin.createMany([
      { ownerId: owner, tags: ["many"], scopes: ["read"] },
      { ownerId: owner, tags: ["many"], scopes: ["write"] },
    ]);
    assert.equal(made.length, 2);
    const results = await web.verifyMany([made[1].key, "nope", made[0].key], { scope: "write" });
    assert.deepEqual(
      results.map((r) => r.errorCode),
      [null, "INVALID_FORMAT", "INSUFFICIENT_SCOPE"],
    );
    const listed = await admin.list({ ownerId: owner, tag: "many" });
    assert.deepEqual(listed.map((k) => k.id).sort(), made.map((k) => k.id).sort());
  });
});

describe("lifecycle", () => {
  test("disable, enable, update, rotate, revoke", async () => {
    const { key, id } = await admin.create({ ownerId: owner, scopes: ["read"], rateLimit: { requests: 100, window: "1m" } });

    assert.equal(await admin.disable(id), true);
    assert.equal((await web.verify(key)).errorCode, "DISABLED");
    assert.equal(await admin.enable(id), true);
    assert.equal((await web.verify(key)).valid, true);

    const updated = await admin.update(id, { name: "renamed", tags: ["prod"], rateLimit: null });
    assert.equal(updated.name, "renamed");
    assert.deepEqual(updated.tags, ["prod"]);
    assert.equal(updated.rateLimit, null, "JSON null clears the rate limit");
    assert.deepEqual(updated.scopes, ["read"], "what is not given is kept");

    const rotated = await admin.rotate(id, { grace: "1h", name: "next" });
    assert.equal(rotated.oldId, id);
    assert.equal((await web.verify(rotated.key)).valid, true);
    assert.equal((await web.verify(key)).valid, true, "old key verifies during the grace");
    assert.equal((await admin.get(rotated.id)).rotatedFrom, id);

    const child = await admin.create({ ownerId: owner, parentId: rotated.id, scopes: ["read"] });
    assert.equal(await admin.revoke(rotated.id, { reason: "leaked" }), 1);
    const gone = await web.verify(child.key); // revoked by the cascade, same transaction
    assert.equal(gone.errorCode, "REVOKED");
    assert.equal((await admin.get(rotated.id)).revokeReason, "leaked");
    assert.equal(await admin.revokeMany([rotated.id, child.id]), 0, "already revoked is not an error in bulk");
  });

  test("usage reports quota use as numbers", async () => {
    const { key, id } = await admin.create({ ownerId: owner, quota: { limit: 5, period: "day" } });
    await web.verify(key, { cost: 2 });
    const u = await admin.usage(id);
    assert.equal(u.used, 2);
    assert.equal(u.limit, 5);
    assert.equal(u.remaining, 3);
    assert.equal(u.period, "day");
    assert.ok(u.resetsAt instanceof Date);
    assert.equal(typeof u.cost, "number");
  });
});

describe("errors carry the SQLSTATE and keypal's code", () => {
  test("unknown id → KeypalNotFoundError P0002 KEY_NOT_FOUND", async () => {
    await assert.rejects(admin.get("00000000-0000-0000-0000-000000000001"), (e: unknown) => {
      assert.ok(e instanceof KeypalNotFoundError);
      assert.ok(e instanceof KeypalError);
      assert.equal(e.sqlstate, "P0002");
      assert.equal(e.code, "KEY_NOT_FOUND");
      return true;
    });
  });

  test("a bad duration → 22007, and nothing is created", async () => {
    const before = (await admin.list({ ownerId: owner, includeRevoked: true })).length;
    await assert.rejects(admin.create({ ownerId: owner, expiresIn: "soon" }), (e: unknown) => {
      assert.ok(e instanceof KeypalInvalidArgumentError);
      assert.equal(e.sqlstate, "22007");
      assert.match(e.message, /expires_in/);
      return true;
    });
    await assert.rejects(admin.createMany([{ ownerId: owner }, { ownerId: owner, expiresIn: "soon" }]), KeypalInvalidArgumentError);
    assert.equal((await admin.list({ ownerId: owner, includeRevoked: true })).length, before);
  });

  test("changing a revoked key → KeypalStateError CANNOT_MODIFY_REVOKED", async () => {
    const { id } = await admin.create({ ownerId: owner });
    await admin.revoke(id);
    await assert.rejects(admin.update(id, { name: "x" }), (e: unknown) => {
      assert.ok(e instanceof KeypalStateError);
      assert.equal(e.sqlstate, "55000");
      assert.equal(e.code, "CANNOT_MODIFY_REVOKED");
      return true;
    });
  });

  test("the verify-only role cannot manage keys (42501)", async () => {
    await assert.rejects(web.create({ ownerId: owner }), (e: unknown) => {
      assert.ok(e instanceof KeypalForbiddenError);
      assert.equal(e.code, "42501");
      return true;
    });
  });

  test("an unknown option is refused before any SQL runs", async () => {
    await assert.rejects(admin.create({ ownerId: owner, colour: "red" } as never), TypeError);
    await assert.rejects(admin.createMany([{ ownerId: owner }, { ownerId: owner, constructor: 1 } as never]), TypeError);
    // A misspelt scope must not verify without the scope.
    const { key } = await admin.create({ ownerId: owner, scopes: ["write"] });
    await assert.rejects(web.verify(key, { scpoe: "read" } as never), /unknown option scpoe/);
    await assert.rejects(web.verify(key, "read" as never), TypeError);
    await assert.rejects(web.verifyMany([key], { Scope: "read" } as never), TypeError);
  });

  test("a pool is anything with query() and end(), e.g. from another copy of pg", async () => {
    const inner = pool("keypal_web", 1);
    const wrapped = new Keypal({ query: (q) => inner.query(q), end: () => inner.end() });
    const { key } = await admin.create({ ownerId: owner, scopes: ["read"] });
    assert.equal((await wrapped.verify(key, { scope: "read" })).valid, true);
    await wrapped.end();
    assert.equal(inner.ended, false, "a pool given is the caller's to end");
    await inner.end();
    assert.throws(() => new Keypal({}), TypeError);
  });

  test("one pool, two schemas: prepared statements do not collide", async () => {
    const shared = pool("keypal_web", 1);
    const plain = new Keypal(shared);
    const qualified = new Keypal({ pool: shared, schema: "public" });
    const unprepared = new Keypal({ pool: shared, prepare: false });
    const { key } = await admin.create({ ownerId: owner, scopes: ["read"] });
    for (const k of [plain, qualified, unprepared, plain, qualified]) {
      assert.equal((await k.verify(key, { scope: "read" })).valid, true);
    }
    await shared.end();
  });

  test("a header value with NUL is no key", async () => {
    const r = await web.verify({ authorization: "Bearer abc\0def" });
    assert.equal(r.errorCode, "MISSING_KEY");
  });

  test("IPv4-mapped addresses are sent as IPv4", () => {
    assert.equal(plainIp("::ffff:10.1.2.3"), "10.1.2.3");
    assert.equal(plainIp("::1"), "::1");
    assert.equal(plainIp(undefined), undefined);
    assert.equal(plainIp("10.0.0.1, 10.0.0.2"), undefined);
    assert.equal(plainIp("/run/app.sock"), undefined);
  });
});
