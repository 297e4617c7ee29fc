// Connections to the test database (clients/setup.sql) from the libpq environment.
import pg from "pg";
import { Keypal } from "../src/index.js";

const database = process.env.KEYPAL_DB ?? "keypal_clients";

export function pool(user: string, max = 4): pg.Pool {
  return new pg.Pool({
    host: process.env.PGHOST ?? "127.0.0.1",
    port: Number(process.env.PGPORT ?? 5432),
    database,
    user,
    max,
  });
}

/** The manager (management functions granted) and the web role (PUBLIC's verify rights only). */
export function clients(): { admin: Keypal; web: Keypal; end(): Promise<void> } {
  const admin = new Keypal(pool("keypal_manager"));
  const web = new Keypal(pool("keypal_web"));
  return {
    admin,
    web,
    async end() {
      await Promise.all([admin.pool.end(), web.pool.end()]);
    },
  };
}
