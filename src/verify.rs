//! The verify hot path.
//!
//! One prepared statement finds the key by its hash and returns, beside the facts verify
//! checks, the `verify_result` row already built for the success case, so a valid verify
//! copies one datum out instead of assembling seventeen. Everything after the lookup is
//! in-memory checks in SPEC §4 order; the only write, `last_used_at`, happens at most once
//! per key per `last_used_resolution` and never in a read-only transaction.

use crate::errors::VerifyError;
use crate::keys::{self, Algorithm};
use crate::spi::{Connection, Stmt};
use crate::{gucs, net, scopes};
use pgrx::prelude::*;
use pgrx::{pg_sys, Array, JsonB, PgTupleDesc};
use std::cell::Cell;
use std::net::IpAddr;

pub type VerifyResult = PgHeapTuple<'static, AllocatedByRust>;

/// What a caller asks of a key besides the key itself.
#[derive(Default)]
pub struct Request<'a> {
    pub scope: Option<&'a str>,
    pub scopes: Vec<String>,
    pub resource: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub country: Option<&'a str>,
    pub env: Option<&'a str>,
}

/// The key by its hash. Empty IP/region lists come back as NULL so the common case
/// (no rules) reads no arrays.
static LOOKUP: Stmt = Stmt::new(
    c"SELECT ROW(true, NULL, NULL, k.id, k.owner_id, k.org_id, k.env, k.name, k.scopes, k.resources,
                 k.tags, k.metadata, k.expires_at, false, NULL, NULL, NULL)::keypal.verify_result,
             k.key_hash,
             k.revoked_at IS NOT NULL AND k.revoked_at <= now(),
             NOT k.enabled,
             k.expires_at IS NOT NULL AND k.expires_at <= now(),
             k.parent_id IS NOT NULL,
             k.env,
             k.scopes,
             k.resources,
             nullif(k.allowed_ips, '{}'),
             nullif(k.blocked_ips, '{}'),
             nullif(k.allowed_regions, '{}'),
             nullif(k.blocked_regions, '{}'),
             k.last_used_at IS NULL OR k.last_used_at <= now() -
                 coalesce((SELECT s.last_used_resolution FROM keypal.settings s), '60 seconds'),
             k.id
        FROM keypal.keys k
       WHERE k.key_hash = $1",
    &[pg_sys::BYTEAOID],
);
mod col {
    pub const RESULT: i32 = 1;
    pub const HASH: i32 = 2;
    pub const REVOKED: i32 = 3;
    pub const DISABLED: i32 = 4;
    pub const EXPIRED: i32 = 5;
    pub const HAS_PARENT: i32 = 6;
    pub const ENV: i32 = 7;
    pub const SCOPES: i32 = 8;
    pub const RESOURCES: i32 = 9;
    pub const ALLOWED_IPS: i32 = 10;
    pub const BLOCKED_IPS: i32 = 11;
    pub const ALLOWED_REGIONS: i32 = 12;
    pub const BLOCKED_REGIONS: i32 = 13;
    pub const STALE: i32 = 14;
    pub const ID: i32 = 15;
    pub const COUNT: usize = 15;
}

/// Whether any ancestor is revoked, disabled or expired (depth-capped against cycles).
static ANCESTORS: Stmt = Stmt::new(
    c"WITH RECURSIVE up(id, depth) AS (
          SELECT k.parent_id, 1 FROM keypal.keys k WHERE k.id = $1
          UNION ALL
          SELECT k.parent_id, up.depth + 1 FROM keypal.keys k JOIN up ON k.id = up.id
           WHERE k.parent_id IS NOT NULL AND up.depth < 64)
      SELECT coalesce(bool_or(a.revoked_at IS NOT NULL AND a.revoked_at <= now()), false),
             coalesce(bool_or(NOT a.enabled), false),
             coalesce(bool_or(a.expires_at IS NOT NULL AND a.expires_at <= now()), false)
        FROM up JOIN keypal.keys a ON a.id = up.id",
    &[pg_sys::UUIDOID],
);

/// The settings INVALID_FORMAT is judged by (read only when no key matched).
static FORMAT: Stmt = Stmt::new(
    c"SELECT c.length, c.alphabet,
             ARRAY[c.prefix] || coalesce((SELECT array_agg(coalesce(e.value->>'prefix', c.prefix))
                                            FROM jsonb_each(c.environments) e), '{}')
        FROM keypal.config() c",
    &[],
);

/// Records use without blocking and without touching any other column: a concurrent
/// revoke or disable holding the row makes this skip, never wait or overwrite.
static TOUCH: Stmt = Stmt::new(
    c"UPDATE keypal.keys SET last_used_at = now()
       WHERE id = (SELECT id FROM keypal.keys WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED)",
    &[pg_sys::UUIDOID],
);

thread_local! {
    /// The algorithm that matched last: tried first next time.
    static LAST_ALGORITHM: Cell<Algorithm> = const { Cell::new(Algorithm::Sha256) };
}

/// Verifies `raw_key` for `req`. Returns the `verify_result` row and, on failure, why.
pub fn verify(raw_key: Option<&str>, req: &Request) -> (VerifyResult, Option<VerifyError>) {
    let key = keys::strip_bearer(raw_key.unwrap_or(""));
    if key.is_empty() {
        return failure(VerifyError::MissingKey);
    }
    if key.len() > 1024 {
        return failure(VerifyError::InvalidFormat);
    }
    let conn = Connection::open();
    let Some(hash) = find(&conn, key) else {
        let err = if matches_configured_format(&conn, key) {
            VerifyError::InvalidKey
        } else {
            VerifyError::InvalidFormat
        };
        drop(conn);
        return failure(err);
    };
    let row = Row::read(&conn);
    // The index found the row by hash; compare in constant time all the same.
    let stored: Vec<u8> = row
        .get(col::HASH)
        .and_then(|d| unsafe { Vec::<u8>::from_datum(d, false) })
        .unwrap_or_default();
    if !keys::constant_time_eq(&stored, &hash) {
        drop(conn);
        return failure(VerifyError::InvalidKey);
    }
    if let Some(err) = check(&conn, &row, req) {
        drop(conn);
        return failure(err);
    }
    let result = row.get(col::RESULT).map(|d| conn.transfer(d));
    if row.flag(col::STALE) && writable() {
        if let Some(id) = row.get(col::ID) {
            TOUCH.exec(&conn, &[Some(id)], false, 0);
        }
    }
    drop(conn);
    match result {
        // SAFETY: the datum is a keypal.verify_result built by LOOKUP, copied out of SPI.
        Some(d) => (unsafe { PgHeapTuple::from_composite_datum(d) }, None),
        None => failure(VerifyError::InvalidKey),
    }
}

/// The looked-up key's columns, read before any later statement replaces the
/// connection's result. The datums stay valid until the connection finishes.
struct Row([Option<pg_sys::Datum>; col::COUNT]);

impl Row {
    fn read(conn: &Connection) -> Row {
        Row(std::array::from_fn(|i| conn.get(0, i as i32 + 1)))
    }

    fn get(&self, c: i32) -> Option<pg_sys::Datum> {
        self.0[c as usize - 1]
    }

    fn flag(&self, c: i32) -> bool {
        self.get(c).is_some_and(|d| d.value() != 0)
    }

    fn strings(&self, c: i32) -> Vec<String> {
        // SAFETY: c is one of the row's text[] columns.
        self.get(c)
            .and_then(|d| unsafe { Vec::<String>::from_datum(d, false) })
            .unwrap_or_default()
    }
}

/// Looks the key up under the last-matching algorithm, then the other one. Leaves the
/// row (if any) as the connection's current result; returns the matching hash.
fn find(conn: &Connection, key: &str) -> Option<Vec<u8>> {
    let first = LAST_ALGORITHM.get();
    for alg in [first, first.other()] {
        let hash = gucs::with_salt_suffix(|s| keys::hash_key(key, s, alg));
        let datum = hash.as_slice().into_datum();
        if LOOKUP.exec(conn, &[datum], true, 1) == 1 {
            LAST_ALGORITHM.set(alg);
            return Some(hash);
        }
    }
    None
}

/// The checks after the lookup, in SPEC §4 order (revoked … insufficient scope).
fn check(conn: &Connection, row: &Row, req: &Request) -> Option<VerifyError> {
    let (mut revoked, mut disabled, mut expired) = (
        row.flag(col::REVOKED),
        row.flag(col::DISABLED),
        row.flag(col::EXPIRED),
    );
    if revoked {
        return Some(VerifyError::Revoked);
    }
    if row.flag(col::HAS_PARENT) && ANCESTORS.exec(conn, &[row.get(col::ID)], true, 1) == 1 {
        revoked |= conn.get_bool(0, 1);
        disabled |= conn.get_bool(0, 2);
        expired |= conn.get_bool(0, 3);
    }
    if revoked {
        return Some(VerifyError::Revoked);
    }
    if disabled {
        return Some(VerifyError::Disabled);
    }
    if expired {
        return Some(VerifyError::Expired);
    }
    if let Some(want) = req.env {
        let env = row
            .get(col::ENV)
            .and_then(|d| unsafe { String::from_datum(d, false) });
        if env.as_deref() != Some(want) {
            return Some(VerifyError::EnvMismatch);
        }
    }
    let [allowed_ips, blocked_ips, allowed_regions, blocked_regions] = [
        col::ALLOWED_IPS,
        col::BLOCKED_IPS,
        col::ALLOWED_REGIONS,
        col::BLOCKED_REGIONS,
    ]
    .map(|c| row.strings(c));
    let (allowed_ips, blocked_ips, allowed_regions, blocked_regions) = (
        &allowed_ips,
        &blocked_ips,
        &allowed_regions,
        &blocked_regions,
    );
    if !allowed_ips.is_empty() || !blocked_ips.is_empty() {
        let ip = req.ip.and_then(parse_inet);
        if !net::allowed(
            ip,
            allowed_ips,
            |i| net::in_any(*i, blocked_ips),
            |i| net::in_any(*i, allowed_ips),
        ) {
            return Some(VerifyError::IpNotAllowed);
        }
    }
    if !allowed_regions.is_empty() || !blocked_regions.is_empty() {
        let blocked = |c: &&str| net::region_in(c, blocked_regions);
        let allowed = |c: &&str| net::region_in(c, allowed_regions);
        if !net::allowed(req.country, allowed_regions, blocked, allowed) {
            return Some(VerifyError::RegionNotAllowed);
        }
    }
    if (req.scope.is_some() || !req.scopes.is_empty())
        && !holds_all(row.get(col::SCOPES), row.get(col::RESOURCES), req)
    {
        return Some(VerifyError::InsufficientScope);
    }
    None
}

/// Scope check straight from the row's datums; `resources` is parsed only when a
/// resource is asked about and the global scopes do not already answer.
fn holds_all(
    scopes_datum: Option<pg_sys::Datum>,
    resources_datum: Option<pg_sys::Datum>,
    req: &Request,
) -> bool {
    // SAFETY: the datum is the key's text[] column from the current SPI result.
    let array = scopes_datum.and_then(|d| unsafe { Array::<&str>::from_datum(d, false) });
    let global: Vec<&str> = array
        .as_ref()
        .map(|a| a.iter().flatten().collect())
        .unwrap_or_default();
    let mut resources: Option<serde_json::Value> = None;
    let wanted = req
        .scope
        .into_iter()
        .chain(req.scopes.iter().map(String::as_str));
    for scope in wanted {
        if scopes::holds(&global, None, scope, None) {
            continue;
        }
        if req.resource.is_none() {
            return false;
        }
        if resources.is_none() {
            resources = resources_datum
                .and_then(|d| unsafe { JsonB::from_datum(d, false) })
                .map(|j| j.0);
        }
        if !scopes::holds(&global, resources.as_ref(), scope, req.resource) {
            return false;
        }
    }
    true
}

/// Whether the key could have been issued under the current settings (any environment).
fn matches_configured_format(conn: &Connection, key: &str) -> bool {
    if FORMAT.exec(conn, &[], true, 1) != 1 {
        return true;
    }
    let length = conn
        .get(0, 1)
        .and_then(|d| unsafe { i32::from_datum(d, false) })
        .unwrap_or(keys::DEFAULT_LENGTH);
    let alphabet = conn
        .get(0, 2)
        .and_then(|d| unsafe { String::from_datum(d, false) })
        .unwrap_or_default();
    let prefixes = conn
        .get(0, 3)
        .and_then(|d| unsafe { Vec::<String>::from_datum(d, false) })
        .unwrap_or_default();
    match keys::expand_alphabet(&alphabet) {
        Ok(alpha) => keys::matches_format(key, &prefixes, length as usize, &alpha),
        Err(_) => true,
    }
}

/// `inet` text (`10.0.0.1` or `10.0.0.0/24`) to its address.
fn parse_inet(s: &str) -> Option<IpAddr> {
    s.split('/').next()?.trim().parse().ok()
}

/// Whether verify may write: not in a read-only transaction, not on a standby, and not
/// under a snapshot isolation level where a concurrent change would fail the caller.
fn writable() -> bool {
    // SAFETY: reads of backend-global flags.
    unsafe {
        !pg_sys::XactReadOnly
            && !pg_sys::RecoveryInProgress()
            && pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32
    }
}

/// A `verify_result` row for a failed verify.
pub fn failure(err: VerifyError) -> (VerifyResult, Option<VerifyError>) {
    (result_row(false, Some(err), None), Some(err))
}

/// Builds a verify_result row carrying only the verdict (and a retry delay).
pub fn result_row(
    valid: bool,
    err: Option<VerifyError>,
    retry_after_ms: Option<i64>,
) -> VerifyResult {
    let desc = PgTupleDesc::for_composite_type("keypal.verify_result")
        .expect("type keypal.verify_result exists");
    let mut datums: Vec<Option<pg_sys::Datum>> = vec![None; desc.len()];
    datums[0] = valid.into_datum();
    datums[1] = err.map(|e| e.code()).into_datum();
    datums[2] = err.map(|e| e.message()).into_datum();
    datums[13] = err
        .map(|e| e == VerifyError::RateLimited)
        .unwrap_or(false)
        .into_datum();
    datums[14] = retry_after_ms.into_datum();
    // SAFETY: one datum per attribute, each of the attribute's type.
    unsafe { PgHeapTuple::from_datums(desc, datums).expect("verify_result has 17 attributes") }
}
