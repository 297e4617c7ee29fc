// The README's Express example, run exactly as written (as its own process, the package
// imported by name), against the test database as the verify-only role.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";
import { clients } from "./db.js";

const readme = readFileSync(new URL("../../../../README.md", import.meta.url), "utf8");
const example = readme.split("## From Node.js and Python")[1]?.match(/```js\n([\s\S]*?)```/)?.[1];

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

const { admin, end } = clients();
after(end);

test("README's Express example answers 200, 401 and 403", async () => {
  assert.ok(example, "README has the Express example");
  assert.ok(example.trim().split("\n").length <= 10, "it is ten lines at most");
  const file = fileURLToPath(new URL("../readme-example.mjs", import.meta.url));
  writeFileSync(file, example);
  const port = await freePort();
  const db = process.env.KEYPAL_DB ?? "keypal_clients";
  const env = { ...process.env, PORT: String(port), DATABASE_URL: `postgresql://keypal_web@127.0.0.1:${process.env.PGPORT}/${db}` };
  const child = spawn(process.execPath, [file], { env, stdio: ["ignore", "inherit", "inherit"] });
  try {
    const url = `http://127.0.0.1:${port}/api/me`;
    for (let i = 0; ; i++) {
      try {
        await fetch(url);
        break;
      } catch (e) {
        if (i > 100) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    const { key } = await admin.create({ ownerId: "readme_owner", scopes: ["read"] });
    const { key: writeOnly } = await admin.create({ ownerId: "readme_owner", scopes: ["write"] });
    const ok = await fetch(url, { headers: { authorization: `Bearer ${key}` } });
    assert.equal(ok.status, 200);
    assert.deepEqual(await ok.json(), { owner: "readme_owner" });
    assert.equal((await fetch(url)).status, 401);
    assert.equal((await fetch(url, { headers: { "x-api-key": writeOnly } })).status, 403);
  } finally {
    child.kill();
  }
});
