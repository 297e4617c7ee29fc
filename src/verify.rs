//! The verify hot path.
//!
//! The key row is found without the executor: a direct scan of the unique index on
//! `keypal.keys(key_hash)` under a snapshot taken at that moment (scan.rs), and each
//! ancestor by id under the same snapshot. Everything after the lookup is in-memory checks in SPEC §4
//! order, against the current time (`clock_timestamp()`), never the transaction's start.
//! A valid verify is then recorded in shared memory (limits/shmem.rs): nothing is written to
//! a table, no row is locked and no WAL is written. SPI is used only to reload the
//! per-backend catalog cache.

use crate::catalog::{self, Catalog, KEY_COLUMNS};
use crate::errors::VerifyError;
use crate::keys::{self, Algorithm};
use crate::limits::enforce::{self, KeyLimits, Refusal, Usage};
use crate::scan::Fresh;
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
    /// The weight of this request for rate limits and quotas (>= 1).
    pub cost: i64,
    /// A NULL was among the required scopes: the scope check fails (never "no scope").
    pub null_scope: bool,
}

impl Request<'_> {
    /// The scopes the request requires: `scope`, then `scopes`.
    fn wanted_scopes(&self) -> impl Iterator<Item = &str> {
        self.scope
            .into_iter()
            .chain(self.scopes.iter().map(String::as_str))
    }
}

/// How deep a key hierarchy may be (a root key is level 1): creation refuses deeper
/// children, and verify walks at most this many ancestors.
pub const MAX_DEPTH: usize = 32;

/// The columns a key's own state is judged by: revoked (now or by a passed `revoke_at`),
/// disabled (now or by a passed `disable_at`), expired. Timestamps in microseconds.
#[derive(Default, Clone, Copy)]
pub struct Lifecycle {
    pub revoked_at: Option<i64>,
    pub revoke_at: Option<i64>,
    pub enabled: bool,
    pub disable_at: Option<i64>,
    pub expires_at: Option<i64>,
}

impl Lifecycle {
    /// (revoked, disabled, expired) at `now`.
    pub fn at(&self, now: i64) -> [bool; 3] {
        let passed = |t: Option<i64>| t.is_some_and(|t| t <= now);
        [
            passed(self.revoked_at) || passed(self.revoke_at),
            !self.enabled || passed(self.disable_at),
            passed(self.expires_at),
        ]
    }
}

/// The first failure (SPEC §4 order) among a key's and its ancestors' states.
pub fn lifecycle_error(states: [bool; 3]) -> Option<VerifyError> {
    let [revoked, disabled, expired] = states;
    if revoked {
        Some(VerifyError::Revoked)
    } else if disabled {
        Some(VerifyError::Disabled)
    } else if expired {
        Some(VerifyError::Expired)
    } else {
        None
    }
}

/// Why the key with this id would fail verify by its state alone — INVALID_KEY (no such
/// key), REVOKED, DISABLED, EXPIRED, its own or an ancestor's — or None when it is usable;
/// read as verify reads it, under a snapshot taken now, at the current time. `then`
/// gets the usable key's scopes and resources datums, read under the same snapshot (and
/// runs after it is released, so it may do anything).
pub fn state_of<R>(
    catalog: &Catalog,
    id: pg_sys::Datum,
    then: impl FnOnce(Option<pg_sys::Datum>, Option<pg_sys::Datum>) -> R,
) -> Result<R, VerifyError> {
    let mut attnums = [0i16; 8];
    for (i, c) in col::LIFECYCLE
        .iter()
        .chain(&[col::SCOPES, col::RESOURCES])
        .enumerate()
    {
        attnums[i] = catalog.attnums[*c];
    }
    let (scopes, resources) = Fresh::with(|snapshot| {
        let [revoked_at, revoke_at, enabled, disable_at, expires_at, parent, scopes, resources] =
            catalog
                .keys_by_id
                .lookup(snapshot, id, &attnums)
                .ok_or(VerifyError::InvalidKey)?;
        // SAFETY: reads the system clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        let own = lifecycle_from(revoked_at, revoke_at, enabled, disable_at, expires_at);
        match lifecycle_error(walk(catalog, snapshot, own.at(now), parent, now)) {
            Some(e) => Err(e),
            None => Ok((scopes, resources)),
        }
    })?;
    // The datums live in the copied tuple, not in the snapshot.
    Ok(then(scopes, resources))
}

fn lifecycle_from(
    revoked_at: Option<pg_sys::Datum>,
    revoke_at: Option<pg_sys::Datum>,
    enabled: Option<pg_sys::Datum>,
    disable_at: Option<pg_sys::Datum>,
    expires_at: Option<pg_sys::Datum>,
) -> Lifecycle {
    // timestamptz is a by-value int64 (microseconds since 2000-01-01); bool by value.
    let ts = |d: Option<pg_sys::Datum>| d.map(|d| d.value() as i64);
    Lifecycle {
        revoked_at: ts(revoked_at),
        revoke_at: ts(revoke_at),
        enabled: enabled.is_some_and(|d| d.value() != 0),
        disable_at: ts(disable_at),
        expires_at: ts(expires_at),
    }
}

/// Adds each ancestor's state (read as the key was) to `states`, walking up from
/// `parent`. A chain longer than MAX_DEPTH (possible only by writing keypal.keys
/// directly) fails closed, as DISABLED.
fn walk(
    catalog: &Catalog,
    snapshot: &Fresh,
    mut states: [bool; 3],
    mut parent: Option<pg_sys::Datum>,
    now: i64,
) -> [bool; 3] {
    let attnums = col::LIFECYCLE.map(|c| catalog.attnums[c]);
    let mut depth = 1;
    while let Some(id) = parent {
        if states[0] {
            break;
        }
        if depth >= MAX_DEPTH {
            states[1] = true;
            break;
        }
        depth += 1;
        let Some([revoked_at, revoke_at, enabled, disable_at, expires_at, up]) =
            catalog.keys_by_id.lookup(snapshot, id, &attnums)
        else {
            // A parent that is not there (only possible by writing keypal.keys directly)
            // fails closed.
            states[0] = true;
            break;
        };
        let s = lifecycle_from(revoked_at, revoke_at, enabled, disable_at, expires_at).at(now);
        for i in 0..3 {
            states[i] |= s[i];
        }
        parent = up;
    }
    states
}

/// Indexes into catalog::KEY_COLUMNS.
mod col {
    pub const ID: usize = 0;
    pub const ENV: usize = 3;
    pub const SCOPES: usize = 5;
    pub const RESOURCES: usize = 6;
    pub const EXPIRES_AT: usize = 9;
    pub const HASH: usize = crate::catalog::KEY_HASH;
    pub const ENABLED: usize = 11;
    pub const REVOKED_AT: usize = 12;
    pub const PARENT_ID: usize = 13;
    pub const ALLOWED_IPS: usize = 14;
    pub const BLOCKED_IPS: usize = 15;
    pub const ALLOWED_REGIONS: usize = 16;
    pub const BLOCKED_REGIONS: usize = 17;
    pub const RATE_LIMIT: usize = 18;
    pub const QUOTA: usize = 19;
    pub const POLICY: usize = 20;
    pub const DISABLE_AT: usize = 21;
    pub const REVOKE_AT: usize = 22;
    /// The columns a key's state is judged by, in the order `walk` and `state_of` read
    /// them: revoked_at, revoke_at, enabled, disable_at, expires_at, parent_id.
    pub const LIFECYCLE: [usize; 6] = [
        REVOKED_AT, REVOKE_AT, ENABLED, DISABLE_AT, EXPIRES_AT, PARENT_ID,
    ];
    /// KEY_COLUMNS[ID..=EXPIRES_AT] are, in order, verify_result's fields 4..=13.
    pub const IDENTITY: std::ops::RangeInclusive<usize> = ID..=EXPIRES_AT;
}

thread_local! {
    /// The salt (0: keypal.salt, 1: previous, 2: TypeScript) and algorithm that matched
    /// last: tried first next time (a backend that serves keys hashed one way pays one
    /// lookup each).
    static LAST_MATCH: Cell<(usize, Algorithm)> = const { Cell::new((0, Algorithm::Sha256)) };
}

/// Verifies `raw_key` for `req`. Returns the `verify_result` row and, on failure, why.
pub fn verify(raw_key: Option<&str>, req: &Request) -> (VerifyResult, Option<VerifyError>) {
    let catalog = catalog::get();
    let key = keys::strip_bearer(raw_key.unwrap_or(""));
    let (row, err) = match verify_in(&catalog, key, req) {
        Ok((row, usage)) => (row.result(&catalog, &usage), None),
        Err(r) => (refused(&catalog, &r), Some(r.err)),
    };
    // keypal_stats(): one atomic add in shared memory per verify.
    let slot = err.map_or(0, |e| {
        1 + VerifyError::ALL.iter().position(|x| *x == e).unwrap_or(0)
    });
    crate::limits::shmem::count_verify(slot);
    (row, err)
}

fn verify_in(catalog: &Catalog, key: &str, req: &Request) -> Result<(Row, Usage), Refusal> {
    if key.is_empty() {
        return Err(VerifyError::MissingKey.into());
    }
    if key.len() > 1024 {
        return Err(VerifyError::InvalidFormat.into());
    }
    // A key of a checksummed key's shape whose checksum is wrong (mistyped, made up), and
    // that no key issued without a checksum could be: refused without a lookup.
    if !catalog.unlooked_shapes.is_empty()
        && keys::refuse_unlooked(key, &catalog.prefixes, &catalog.unlooked_shapes)
    {
        return Err(VerifyError::InvalidFormat.into());
    }
    // The key and its ancestors as of one moment: now.
    let row = Fresh::with(|snapshot| judge(catalog, snapshot, key, req))?;
    let usage = enforce::enforce(catalog, &row.limits(), req.cost);
    // What it recorded is written by the database's flush worker: make sure one runs.
    crate::worker::ensure();
    let usage = usage?;
    Ok((row, usage))
}

/// Finds the key and checks it (SPEC §4, up to the scopes); returns its row.
fn judge(catalog: &Catalog, snapshot: &Fresh, key: &str, req: &Request) -> Result<Row, Refusal> {
    let Some((row, hash)) = find(catalog, snapshot, key) else {
        return Err(if keys::matches_format(
            key,
            &catalog.prefixes,
            catalog.length,
            &catalog.alphabet,
            catalog.checksum,
        ) {
            VerifyError::InvalidKey
        } else {
            VerifyError::InvalidFormat
        }
        .into());
    };
    // The index found the row by hash; compare in constant time all the same.
    // SAFETY: key_hash is a non-null bytea column.
    let stored = row
        .get(col::HASH)
        .and_then(|d| unsafe { <&[u8]>::from_datum(d, false) })
        .unwrap_or_default();
    if !keys::constant_time_eq(stored, &hash) {
        return Err(VerifyError::InvalidKey.into());
    }
    // The current time (clock_timestamp()), not the transaction's start: a key that
    // expires or is revoked while a long transaction or statement runs stops verifying.
    // SAFETY: reads the system clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    check(catalog, snapshot, &row, req, now)?;
    Ok(row)
}

/// Looks the key up under the salt and algorithm that matched last, then the others: under
/// the current salt, keypal.previous_salt and keypal.typescript_salt (those set), each with
/// either algorithm.
fn find(catalog: &Catalog, snapshot: &Fresh, key: &str) -> Option<(Row, Vec<u8>)> {
    let last = LAST_MATCH.get();
    let rest = (0..3usize)
        .flat_map(|salt| [Algorithm::Sha256, Algorithm::Sha512].map(move |alg| (salt, alg)))
        .filter(move |&tried| tried != last);
    for (salt, alg) in std::iter::once(last).chain(rest) {
        let hash = if salt == 0 {
            gucs::with_salt_suffix(|s| keys::hash_key(key, s, alg))
        } else {
            match gucs::with_fallback_suffix(salt, |s| keys::hash_key(key, s, alg)) {
                Some(h) => h,
                None => continue, // that salt is not set
            }
        };
        if let Some(row) = Row::by_hash(catalog, snapshot, &hash) {
            LAST_MATCH.set((salt, alg));
            return Some((row, hash));
        }
    }
    None
}

/// The key's columns (catalog::KEY_COLUMNS), copied out of the buffer into the current
/// memory context.
struct Row([Option<pg_sys::Datum>; KEY_COLUMNS.len()]);

impl Row {
    /// The row whose key_hash equals `hash`, as `snapshot` sees it.
    fn by_hash(catalog: &Catalog, snapshot: &Fresh, hash: &[u8]) -> Option<Row> {
        catalog
            .keys_by_hash
            .lookup(snapshot, hash.into_datum()?, &catalog.attnums)
            .map(Row)
    }

    fn get(&self, c: usize) -> Option<pg_sys::Datum> {
        self.0[c]
    }

    fn text(&self, c: usize) -> Option<String> {
        // SAFETY: c is one of the row's text columns.
        self.get(c)
            .and_then(|d| unsafe { String::from_datum(d, false) })
    }

    fn strings(&self, c: usize) -> Vec<String> {
        // SAFETY: c is one of the row's text[] columns.
        self.get(c)
            .and_then(|d| unsafe { Vec::<String>::from_datum(d, false) })
            .unwrap_or_default()
    }

    /// The verify_result of a valid verify: the verdict, the key's identity columns and
    /// what its limits left.
    fn result(&self, catalog: &Catalog, usage: &Usage) -> VerifyResult {
        let mut datums: Vec<Option<pg_sys::Datum>> = vec![None; 17];
        datums[0] = true.into_datum();
        for c in col::IDENTITY {
            datums[c + 3] = self.get(c);
        }
        datums[13] = false.into_datum();
        datums[15] = usage.rate_limit_remaining.into_datum();
        datums[16] = usage.quota_remaining.into_datum();
        form(catalog, datums)
    }

    /// The key's limit settings (read only for a key that passed every other check).
    fn limits(&self) -> KeyLimits {
        KeyLimits {
            id: self.get(col::ID).unwrap_or(pg_sys::Datum::from(0usize)),
            rate_limit: enforce::json(self.get(col::RATE_LIMIT)),
            quota: enforce::json(self.get(col::QUOTA)),
            policy: self.text(col::POLICY),
            env: self.text(col::ENV),
        }
    }
}

/// The checks after the lookup, in SPEC §4 order (revoked … insufficient scope).
fn check(
    catalog: &Catalog,
    snapshot: &Fresh,
    row: &Row,
    req: &Request,
    now: i64,
) -> Result<(), VerifyError> {
    let own = lifecycle_from(
        row.get(col::REVOKED_AT),
        row.get(col::REVOKE_AT),
        row.get(col::ENABLED),
        row.get(col::DISABLE_AT),
        row.get(col::EXPIRES_AT),
    );
    let states = walk(catalog, snapshot, own.at(now), row.get(col::PARENT_ID), now);
    if let Some(e) = lifecycle_error(states) {
        return Err(e);
    }
    if let Some(want) = req.env {
        if row.text(col::ENV).as_deref() != Some(want) {
            return Err(VerifyError::EnvMismatch);
        }
    }
    let (allowed_ips, blocked_ips) = (row.strings(col::ALLOWED_IPS), row.strings(col::BLOCKED_IPS));
    if !allowed_ips.is_empty() || !blocked_ips.is_empty() {
        let ip = req.ip.and_then(parse_inet);
        let blocked = |i: &IpAddr| net::in_any(*i, &blocked_ips);
        let allowed = |i: &IpAddr| net::in_any(*i, &allowed_ips);
        if !net::allowed(ip, &allowed_ips, blocked, allowed) {
            return Err(VerifyError::IpNotAllowed);
        }
    }
    let (allowed_regions, blocked_regions) = (
        row.strings(col::ALLOWED_REGIONS),
        row.strings(col::BLOCKED_REGIONS),
    );
    if !allowed_regions.is_empty() || !blocked_regions.is_empty() {
        let blocked = |c: &&str| net::region_in(c, &blocked_regions);
        let allowed = |c: &&str| net::region_in(c, &allowed_regions);
        if !net::allowed(req.country, &allowed_regions, blocked, allowed) {
            return Err(VerifyError::RegionNotAllowed);
        }
    }
    if req.null_scope
        || (req.scope.is_some() || !req.scopes.is_empty())
            && !holds_all(row.get(col::SCOPES), row.get(col::RESOURCES), req)
    {
        MISSING_SCOPE.set(first_missing(row, req));
        return Err(VerifyError::InsufficientScope);
    }
    Ok(())
}

thread_local! {
    /// Which scope the last verify refused for (keypal_require names it in its HINT).
    static MISSING_SCOPE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The scope the last verify of this backend found missing, with the resource asked about.
pub fn missing_scope() -> Option<String> {
    MISSING_SCOPE.take()
}

fn first_missing(row: &Row, req: &Request) -> Option<String> {
    if req.null_scope {
        return Some("NULL (a NULL among the required scopes is never held)".into());
    }
    let missing = req.wanted_scopes().find(|s| {
        !holds(
            row.get(col::SCOPES),
            row.get(col::RESOURCES),
            std::iter::once(*s),
            req.resource,
            true,
        )
    })?;
    Some(match req.resource {
        Some(r) => format!("{missing:?} (globally or on {r:?})"),
        None => format!("{missing:?}"),
    })
}

/// Scope check straight from the row's datums; `resources` is parsed only when a
/// resource is asked about and the global scopes do not already answer.
fn holds_all(
    scopes_datum: Option<pg_sys::Datum>,
    resources_datum: Option<pg_sys::Datum>,
    req: &Request,
) -> bool {
    holds(
        scopes_datum,
        resources_datum,
        req.wanted_scopes(),
        req.resource,
        true,
    )
}

/// Whether a key with these scopes/resources datums holds every (`all`) or any of
/// `wanted`, globally or on `resource`. False when `wanted` is empty.
pub fn holds<'a>(
    scopes_datum: Option<pg_sys::Datum>,
    resources_datum: Option<pg_sys::Datum>,
    wanted: impl Iterator<Item = &'a str>,
    resource: Option<&str>,
    all: bool,
) -> bool {
    // SAFETY: the datum is the key's text[] scopes column, copied out of its tuple.
    let array = scopes_datum.and_then(|d| unsafe { Array::<&str>::from_datum(d, false) });
    let global: Vec<&str> = array
        .as_ref()
        .map(|a| a.iter().flatten().collect())
        .unwrap_or_default();
    let mut resources: Option<serde_json::Value> = None;
    let mut any = false;
    for scope in wanted {
        // Lets a cancel or statement_timeout through between scopes.
        pgrx::check_for_interrupts!();
        let held = scopes::holds(&global, None, scope, None)
            || resource.is_some() && {
                if resources.is_none() {
                    // SAFETY: the datum is the key's jsonb resources column.
                    resources = resources_datum
                        .and_then(|d| unsafe { JsonB::from_datum(d, false) })
                        .map(|j| j.0);
                }
                scopes::holds(&global, resources.as_ref(), scope, resource)
            };
        if all && !held {
            return false;
        }
        if !all && held {
            return true;
        }
        any = true;
    }
    // Every scope held (and at least one asked for), or, for "any", none held.
    all && any
}

/// `inet` text (`10.0.0.1` or `10.0.0.0/24`) to its address.
fn parse_inet(s: &str) -> Option<IpAddr> {
    s.split('/').next()?.trim().parse().ok()
}

/// The verify_result of a refused verify: the verdict only (and a retry delay).
fn refused(catalog: &Catalog, r: &Refusal) -> VerifyResult {
    let mut datums: Vec<Option<pg_sys::Datum>> = vec![None; 17];
    datums[0] = false.into_datum();
    datums[1] = r.err.code().into_datum();
    datums[2] = r.err.message().into_datum();
    datums[13] = (r.err == VerifyError::RateLimited).into_datum();
    datums[14] = r.retry_after_ms.into_datum();
    form(catalog, datums)
}

fn form(catalog: &Catalog, datums: Vec<Option<pg_sys::Datum>>) -> VerifyResult {
    let desc = PgTupleDesc::for_composite_type_by_oid(catalog.result_type)
        .expect("keypal.verify_result exists");
    // SAFETY: one datum per attribute of verify_result, each of the attribute's type.
    unsafe { PgHeapTuple::from_datums(desc, datums).expect("verify_result has 17 attributes") }
}
