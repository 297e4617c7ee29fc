// keypal_verify vs a raw indexed lookup of the same key, from one Node client process: a
// pool of 4 connections, each statement a named prepared statement, keys drawn at random
// from the 100 000 plain bench keys. Rounds interleave the two; prints the median
// requests/s of each and their ratio. Connection from PGHOST/PGPORT/PGUSER/PGDATABASE.
//   node bench.js [seconds per run = 5] [rounds = 3]
'use strict';
const { Pool } = require('pg');

const SECONDS = Number(process.argv[2] || 5);
const ROUNDS = Number(process.argv[3] || 3);
const POOL = 4;
const key = () => 'k' + String(1 + Math.floor(Math.random() * 100000)).padStart(31, '0');

const queries = {
  verify: { name: 'verify', text: 'SELECT valid, key_id FROM keypal_verify($1, $2)' },
  raw: {
    name: 'raw',
    text: `SELECT id, owner_id, scopes FROM bench_inline
            WHERE key_hash = digest($1, 'sha256') AND enabled AND revoked_at IS NULL
              AND (expires_at IS NULL OR expires_at > now()) AND $2 = ANY (scopes)`,
  },
};

async function run(pool, q) {
  const until = Date.now() + SECONDS * 1000;
  let n = 0;
  const worker = async () => {
    while (Date.now() < until) {
      const r = await pool.query({ ...q, values: [key(), 'read'] });
      if (r.rows.length !== 1) throw new Error(`${q.name}: no row`);
      n++;
    }
  };
  await Promise.all(Array.from({ length: POOL }, worker));
  return n / SECONDS;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

(async () => {
  const pool = new Pool({ max: POOL });
  const rates = { verify: [], raw: [] };
  for (let r = 0; r < ROUNDS; r++) {
    for (const name of ['raw', 'verify']) rates[name].push(await run(pool, queries[name]));
  }
  await pool.end();
  const v = median(rates.verify);
  const raw = median(rates.raw);
  const fmt = (xs) => xs.map((x) => x.toFixed(0)).join(' ');
  console.log(`client raw lookup    ${raw.toFixed(0).padStart(8)} req/s  (${fmt(rates.raw)})`);
  console.log(`client keypal_verify ${v.toFixed(0).padStart(8)} req/s  (${fmt(rates.verify)})`);
  console.log(`client verify / raw  ${(v / raw).toFixed(2).padStart(8)}   (target >= 0.9; pool of ${POOL}, ${SECONDS}s x ${ROUNDS} rounds, medians)`);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
