// Writes API keys as the TypeScript keypal stores them ({id, keyHash, metadata}), with
// their plaintexts alongside, for keypal_import. Run: node ts_records.js COUNT [SALT]
// Prints {"records": [...], "keys": {"<id>": "<plaintext>"}} on stdout.
//
// The hash is the TypeScript keypal's: hex(ALG(key + salt)), its salt appended as it is
// given (keypal verifies such keys with keypal.typescript_salt set to that salt), or
// hex(ALG(key)) with no salt.
const crypto = require("node:crypto");

const count = Number(process.argv[2] || 3);
const suffix = process.argv[3] || "";
const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

function randomString(n) {
  // Rejection sampling: no modulo bias (62 letters: take bytes < 248).
  let out = "";
  while (out.length < n) {
    for (const b of crypto.randomBytes(n)) {
      if (b < 248 && out.length < n) out += alphabet[b % 62];
    }
  }
  return out;
}

const records = [];
const keys = {};
for (let i = 0; i < count; i++) {
  const key = "sk_ts_" + randomString(32);
  const algorithm = i % 10 === 9 ? "sha512" : "sha256";
  const id = crypto.randomBytes(15).toString("base64url"); // nanoid-like, not a uuid
  const now = new Date();
  const metadata = {
    ownerId: "ts-user-" + (i % 100),
    name: "key " + i,
    scopes: i % 2 ? ["read"] : ["read", "write"],
    resources: i % 3 ? undefined : { ["project:" + i]: ["admin"] },
    expiresAt: i % 7 === 6 ? new Date(now.getTime() - 86400e3).toISOString() : null,
    createdAt: now.toISOString(),
    lastUsedAt: undefined,
    enabled: i % 11 !== 10,
    revokedAt: i % 13 === 12 ? now.toISOString() : null,
    rotatedTo: null,
    tags: i % 5 ? undefined : ["batch"],
  };
  records.push({
    id,
    keyHash: crypto.createHash(algorithm).update(key + suffix).digest("hex"),
    metadata, // JSON.stringify drops the undefined fields, as the TypeScript keypal's stores do
  });
  keys[id] = key;
}
process.stdout.write(JSON.stringify({ records, keys }));
