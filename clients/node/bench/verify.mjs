// The baseline for the client bench: keys.verify(KEY, { scope: "read" }) straight from the
// client (pool of POOL), CONCURRENCY loops for SECONDS; every result must be valid. Prints verifies/s.
//   node verify.mjs KEY SECONDS CONCURRENCY
import { Keypal } from "../dist/src/index.js";

const [key, seconds, concurrency] = process.argv.slice(2);
const keys = new Keypal({ connectionString: process.env.DATABASE_URL, poolConfig: { max: Number(process.env.POOL ?? 4) } });
await keys.verify(key, { scope: "read" });
const until = Date.now() + Number(seconds) * 1000;
let n = 0;
const loop = async () => {
  while (Date.now() < until) {
    const r = await keys.verify(key, { scope: "read" });
    if (!r.valid) throw new Error(r.errorCode ?? "invalid");
    n++;
  }
};
const start = Date.now();
await Promise.all(Array.from({ length: Number(concurrency) }, loop));
console.log(Math.round(n / ((Date.now() - start) / 1000)));
await keys.end();
