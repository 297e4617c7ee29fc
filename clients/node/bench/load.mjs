// HTTP load for the client bench: CONCURRENCY keep-alive loops GET a URL with
// `Authorization: Bearer KEY` for SECONDS; every answer must be 200. Prints requests/s.
//   node load.mjs URL KEY SECONDS CONCURRENCY
import http from "node:http";

const [url, key, seconds, concurrency] = process.argv.slice(2);
const agent = new http.Agent({ keepAlive: true, maxSockets: Number(concurrency) });
const headers = { authorization: `Bearer ${key}` };

function get() {
  return new Promise((resolve, reject) => {
    http.get(url, { agent, headers }, (res) => {
      res.resume();
      res.on("end", () => (res.statusCode === 200 ? resolve() : reject(new Error(`status ${res.statusCode}`))));
    }).on("error", reject);
  });
}

async function waitUp() {
  for (let i = 0; ; i++) {
    try {
      return await get();
    } catch (e) {
      if (i > 200) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

await waitUp();
const until = Date.now() + Number(seconds) * 1000;
let n = 0;
const loop = async () => {
  while (Date.now() < until) {
    await get();
    n++;
  }
};
const start = Date.now();
await Promise.all(Array.from({ length: Number(concurrency) }, loop));
console.log(Math.round(n / ((Date.now() - start) / 1000)));
agent.destroy();
