#!/usr/bin/env node
// keypal request signing, client side: the same signature keypal_sign makes.
//   node sign.js SIGNING_SECRET METHOD PATH BODY   ->  prints the Keypal-Signature value
const crypto = require("crypto");

function keypalSignature(secret, method, path, body, t = Math.floor(Date.now() / 1000)) {
  const bodyHash = crypto.createHash("sha256").update(body).digest("hex");
  const canonical = `${method.toUpperCase()}\n${path}\n${t}\n${bodyHash}`;
  const v1 = crypto.createHmac("sha256", secret).update(canonical).digest("hex");
  return `t=${t},v1=${v1}`;
}

module.exports = { keypalSignature };

if (require.main === module) {
  const [secret, method, path, body] = process.argv.slice(2);
  console.log(keypalSignature(secret, method, path, Buffer.from(body, "utf8")));
}
