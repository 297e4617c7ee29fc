//! The SQL functions written in Rust: the verify family (callable by every role) and the
//! helpers the SQL layer (sql/*.sql) builds the management functions from.

use crate::errors::{bad_argument, bad_duration, raise, refuse_option};
use crate::keys::{self, Algorithm};
use crate::verify::{self, Request, VerifyResult};
use crate::{duration, gucs, identity, options, scopes};
use pgrx::prelude::*;
use pgrx::{pg_sys, Inet, JsonB, PgSqlErrorCode, Uuid};
use std::num::NonZeroUsize;

type Scopes = Option<Vec<Option<String>>>;

fn request<'a>(
    scope: Option<&'a str>,
    scopes: &Scopes,
    resource: Option<&'a str>,
    ip: &'a Option<Inet>,
    country: Option<&'a str>,
    env: Option<&'a str>,
    cost: Option<i32>,
) -> Request<'a> {
    let cost = cost.unwrap_or(1);
    if cost < 1 {
        bad_argument("cost", "must be at least 1");
    }
    let given = scopes.as_deref().unwrap_or_default();
    if given.len() > options::MAX_LIST {
        bad_argument(
            "scopes",
            &format!("at most {} scopes per verify", options::MAX_LIST),
        );
    }
    Request {
        cost: cost as i64,
        scope,
        null_scope: given.iter().any(Option::is_none),
        scopes: given.iter().flatten().cloned().collect(),
        resource,
        ip: ip.as_ref().map(|i| i.0.as_str()),
        country,
        env,
    }
}

/// Defines a verify-family SQL function: the key (`key text`, unless another first
/// argument is given) plus the verify arguments (SPEC §3). `$req` is bound to the parsed
/// Request. Not SECURITY DEFINER: verify reads its tables without the executor (no
/// privilege checks, no name lookups), and the one path that runs SQL — loading the
/// settings cache — switches to keypal's owner and a pinned search_path itself
/// (catalog.rs), so every call does not pay for the switch.
macro_rules! verify_fn {
    ($(#[$doc:meta])* $name:ident, |$key:ident, $req:ident| $body:expr, $($ret:tt)+) => {
        verify_fn!($(#[$doc])* $name, key: Option<&str>, |$key, $req| $body, $($ret)+);
    };
    ($(#[$doc:meta])* $name:ident, $arg:ident: $argty:ty, |$key:ident, $req:ident| $body:expr, $($ret:tt)+) => {
        $(#[$doc])*
        #[pg_extern(volatile, parallel_unsafe)]
        #[allow(clippy::too_many_arguments)]
        fn $name(
            $arg: default!($argty, "NULL"),
            scope: default!(Option<&str>, "NULL"),
            scopes: default!(Scopes, "NULL"),
            resource: default!(Option<&str>, "NULL"),
            ip: default!(Option<Inet>, "NULL"),
            country: default!(Option<&str>, "NULL"),
            env: default!(Option<&str>, "NULL"),
            cost: default!(Option<i32>, "NULL"),
        ) -> $($ret)+ {
            let $key = $arg;
            let $req = request(scope, &scopes, resource, &ip, country, env, cost);
            $body
        }
    };
}

verify_fn!(
    /// Verifies an API key: `valid`, or the first failed check's `error_code` (SPEC §4).
    keypal_verify,
    |key, req| verify::verify(key, &req).0,
    pgrx::composite_type!('static, "keypal.verify_result")
);

verify_fn!(
    /// `keypal_verify(...).valid`.
    keypal_check,
    |key, req| verify::verify(key, &req).1.is_none(),
    bool
);

verify_fn!(
    /// Verifies, or raises: 28000 (bad key), 42501 (not allowed here), 53400 (limits);
    /// the error code in DETAIL, the retry delay in HINT.
    keypal_require,
    |key, req| require_inner(key, &req),
    pgrx::composite_type!('static, "keypal.verify_result")
);

verify_fn!(
    /// `keypal_require`, then remembers the key's identity for the rest of the transaction
    /// (read it with `keypal_current_*`, e.g. in RLS policies).
    keypal_authenticate,
    |key, req| authenticate_inner(key, &req),
    pgrx::composite_type!('static, "keypal.verify_result")
);

verify_fn!(
    /// `keypal_verify` with the key taken from request headers (PostgREST's `request.headers`).
    keypal_verify_headers,
    headers: Option<JsonB>,
    |given, req| {
        let key = given.and_then(|h| keys::key_from_headers(&h.0));
        verify::verify(key.as_deref(), &req).0
    },
    pgrx::composite_type!('static, "keypal.verify_result")
);

fn require_inner(key: Option<&str>, req: &Request) -> VerifyResult {
    match verify::verify(key, req) {
        (row, None) => row,
        (row, Some(err)) => {
            let retry = row
                .get_by_index::<i64>(NonZeroUsize::new(15).expect("nonzero"))
                .ok()
                .flatten();
            err.raise(retry, verify::missing_scope())
        }
    }
}

fn authenticate_inner(key: Option<&str>, req: &Request) -> VerifyResult {
    let row = require_inner(key, req);
    let at = |i: usize| NonZeroUsize::new(i).expect("nonzero");
    let key_id: Option<Uuid> = row.get_by_index(at(4)).ok().flatten();
    let owner: Option<String> = row.get_by_index(at(5)).ok().flatten();
    let org: Option<String> = row.get_by_index(at(6)).ok().flatten();
    let scopes: Option<pgrx::Array<&str>> = row.get_by_index(at(9)).ok().flatten();
    let scopes: Option<Vec<String>> =
        scopes.map(|a| a.iter().flatten().map(str::to_string).collect());
    let resources: Option<JsonB> = row.get_by_index(at(10)).ok().flatten();
    if let (Some(id), Some(owner)) = (key_id, owner) {
        identity::set(
            id,
            owner,
            org,
            scopes.unwrap_or_default(),
            resources.map(|j| j.0),
        );
    }
    row
}

/// Signs a request (SPEC §3): `t=<unix seconds>,v1=<hex hmac-sha256(secret, canonical)>`,
/// canonical = `METHOD\npath\nt\nlower-hex(sha256(body))` (src/signature.rs).
#[pg_extern(volatile, parallel_safe)]
fn keypal_sign(
    secret: default!(Option<&str>, "NULL"),
    method: default!(Option<&str>, "NULL"),
    path: default!(Option<&str>, "NULL"),
    body: default!(Option<&str>, "''"),
    ts: default!(Option<TimestampWithTimeZone>, "now()"),
) -> String {
    let need = |v: Option<&str>, name: &str| match v {
        Some(v) if !v.is_empty() => v.to_string(),
        _ => bad_argument(name, "required"),
    };
    let (secret, method, path) = (
        need(secret, "secret"),
        need(method, "method"),
        need(path, "path"),
    );
    if !crate::signature::signable(&method, &path) {
        bad_argument(
            "method/path",
            "a method is letters only, and a path has no line breaks",
        );
    }
    let t = match ts {
        None => unix_now(),
        Some(t) => {
            unix_of(t).unwrap_or_else(|| bad_argument("ts", "must be a finite time")) / 1_000_000
        }
    };
    crate::signature::sign_request(&secret, &method, &path, body.unwrap_or("").as_bytes(), t)
}

/// Unix seconds now.
fn unix_now() -> i64 {
    // SAFETY: reads the clock.
    unix_of_us(unsafe { pg_sys::GetCurrentTimestamp() }) / 1_000_000
}

/// Unix microseconds of a timestamptz (None for ±infinity).
fn unix_of(t: TimestampWithTimeZone) -> Option<i64> {
    use pgrx::IntoDatum;
    let us = t.into_datum().map_or(0, |d| d.value() as i64);
    if us == i64::MAX || us == i64::MIN {
        return None;
    }
    us.checked_add(UNIX_MINUS_PG_EPOCH_US)
}

/// How much later PostgreSQL's epoch (2000-01-01) is than unix's (µs).
const UNIX_MINUS_PG_EPOCH_US: i64 = 946_684_800_000_000;

/// PostgreSQL's epoch (2000-01-01) to unix, in microseconds.
fn unix_of_us(pg_us: i64) -> i64 {
    pg_us + UNIX_MINUS_PG_EPOCH_US
}

/// This server's counters (SPEC §3): verifies since server start by outcome (`valid` and
/// each SPEC §4 code), how long ago this database's flush worker last flushed (on a standby:
/// last shipped), the shared entries in use and their bytes, and on a standby whether its
/// worker cannot ship. Reads shared memory only: no table writes.
#[pg_extern(volatile, parallel_restricted)]
fn keypal_stats() -> TableIterator<'static, (name!(name, String), name!(value, Option<i64>))> {
    let counts = crate::limits::shmem::verify_counts();
    let s = crate::limits::shmem::stats();
    let bytes = crate::limits::shmem::BYTES_PER_ENTRY as i64;
    let mut rows = vec![("verifies_valid".to_string(), Some(counts[0] as i64))];
    for (i, e) in crate::errors::VerifyError::ALL.iter().enumerate() {
        let name = format!("verifies_{}", e.code().to_lowercase());
        rows.push((name, Some(counts[i + 1] as i64)));
    }
    let more = [
        ("verifies_total", Some(counts.iter().sum::<u64>() as i64)),
        ("flush_lag_ms", s.flush_age_us.map(|us| us / 1000)),
        ("shared_entries", Some(s.entries)),
        ("shared_bytes", Some(s.entries * bytes)),
        ("shared_entry_bytes", Some(bytes)),
        ("shared_entries_max", Some(s.max_entries)),
        ("shared_queued", Some(s.queued)),
        ("dropped_uses", Some(s.dropped as i64)),
        ("flush_workers", Some(s.workers)),
        // (A standby: 1 while its worker cannot ship to the primary; flush_lag_ms then grows.)
        (
            "ship_failing",
            s.ship_failing
                .filter(|_| unsafe { pg_sys::RecoveryInProgress() })
                .map(i64::from),
        ),
    ];
    rows.extend(more.map(|(n, v)| (n.to_string(), v)));
    TableIterator::new(rows)
}

/// `keypal_authenticate` with the key from PostgREST's `request.headers` setting
/// (usable as PostgREST's `db-pre-request`).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn keypal_authenticate_request(
    scope: default!(Option<&str>, "NULL"),
    scopes: default!(Scopes, "NULL"),
    resource: default!(Option<&str>, "NULL"),
    ip: default!(Option<Inet>, "NULL"),
    country: default!(Option<&str>, "NULL"),
    env: default!(Option<&str>, "NULL"),
) -> pgrx::composite_type!('static, "keypal.verify_result") {
    let headers = request_headers();
    let key = headers.as_ref().and_then(keys::key_from_headers);
    authenticate_inner(
        key.as_deref(),
        &request(scope, &scopes, resource, &ip, country, env, None),
    )
}

/// PostgREST's `request.headers` (a JSON object), if set and valid.
fn request_headers() -> Option<serde_json::Value> {
    serde_json::from_str(&gucs::current_setting("request.headers")?).ok()
}

/// The id of the key authenticated in this transaction, or NULL.
#[pg_extern(stable, parallel_restricted)]
fn keypal_current_key_id() -> Option<Uuid> {
    identity::with(|i| i.map(|i| i.key_id))
}

/// The owner of the key authenticated in this transaction, or NULL.
#[pg_extern(stable, parallel_restricted)]
fn keypal_current_owner() -> Option<String> {
    identity::with(|i| i.map(|i| i.owner_id.clone()))
}

/// The org of the key authenticated in this transaction, or NULL.
#[pg_extern(stable, parallel_restricted)]
fn keypal_current_org() -> Option<String> {
    identity::with(|i| i.and_then(|i| i.org_id.clone()))
}

/// The global scopes of the key authenticated in this transaction, or NULL.
#[pg_extern(stable, parallel_restricted)]
fn keypal_current_scopes() -> Option<Vec<String>> {
    identity::with(|i| i.map(|i| i.scopes.clone()))
}

/// Whether the key authenticated in this transaction holds `scope` (on `resource`).
/// False when nothing is authenticated.
#[pg_extern(stable, parallel_restricted)]
fn keypal_current_has_scope(scope: Option<&str>, resource: default!(Option<&str>, "NULL")) -> bool {
    let Some(scope) = scope else { return false };
    identity::with(|i| {
        i.is_some_and(|i| scopes::holds(&i.scopes, i.resources.as_ref(), scope, resource))
    })
}

/// The alphabet of keys `length` characters long, checked as keypal_configure checks it
/// (22023 naming what is wrong): a new key's shape.
pub(crate) fn key_alphabet(length: i32, alphabet: &str) -> Vec<u8> {
    keys::check_length(length).unwrap_or_else(|e| bad_argument("length", &e));
    let alpha = keys::expand_alphabet(alphabet).unwrap_or_else(|e| bad_argument("alphabet", &e));
    keys::check_entropy(length, alpha.len()).unwrap_or_else(|e| {
        bad_argument("key settings (keypal_configure length and alphabet)", &e)
    });
    alpha
}

/// The role the caller acts as outside any SECURITY DEFINER function (SET ROLE counts).
pub(crate) fn invoking_user_name() -> String {
    // SAFETY: GetOuterUserId is always valid in a backend; noerr lookup.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetOuterUserId(), true);
        if name.is_null() {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                "current role not found".into(),
            );
        }
        std::ffi::CStr::from_ptr(name)
            .to_string_lossy()
            .into_owned()
    }
}

/// A key's request-signing secret, derived from the server's `keypal.signing_secret`
/// (55000 while that is not set). Never stored.
pub(crate) fn signing_secret(key_id: Uuid) -> String {
    let Some(server) = gucs::SIGNING_SECRET.get().filter(|s| !s.is_empty()) else {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "signing keys need a server secret: ALTER SYSTEM SET keypal.signing_secret = \
             '<long random string>'; SELECT pg_reload_conf(); (superuser)"
                .into(),
        );
    };
    crate::signature::derive_signing_secret(&server.to_string_lossy(), &key_id.to_string())
}

#[pg_schema]
mod keypal {
    use super::*;

    /// A new key: `prefix` then `length` characters of `alphabet`, from the OS CSPRNG.
    #[pg_extern(volatile, parallel_safe)]
    fn generate_key(prefix: &str, length: i32, alphabet: &str) -> String {
        keys::check_prefix(prefix).unwrap_or_else(|e| bad_argument("prefix", &e));
        let alpha = key_alphabet(length, alphabet);
        keys::generate(prefix, length as usize, &alpha)
    }

    /// The checksum a new key ends in (keypal_configure(checksum => true)): CRC-32 of the
    /// key so far, in its alphabet.
    #[pg_extern(immutable, strict, parallel_safe)]
    fn key_checksum(body: &str, alphabet: &str) -> String {
        let alpha =
            keys::expand_alphabet(alphabet).unwrap_or_else(|e| bad_argument("alphabet", &e));
        keys::checksum(body, &alpha)
    }

    /// The regular expression keypal_key_pattern() answers: keys of these prefixes in the
    /// current shape (length, alphabet, checksum) or one recorded in `issued`.
    #[pg_extern(immutable, parallel_safe)]
    fn key_regex(
        prefixes: Vec<String>,
        length: i32,
        alphabet: &str,
        checksum: bool,
        issued: Option<JsonB>,
    ) -> String {
        let alpha =
            keys::expand_alphabet(alphabet).unwrap_or_else(|e| bad_argument("alphabet", &e));
        let current = keys::Shape {
            length: length.max(0) as usize,
            alphabet: alpha,
            checksum,
        };
        let (shapes, _) = keys::issued_shapes(issued.as_ref().map(|j| &j.0), current);
        keys::key_regex(&prefixes, &shapes)
    }

    /// `ALG(key || S)` under the server's `keypal.salt`.
    #[pg_extern(stable, strict, parallel_safe)]
    fn hash_key(key: &str, algorithm: &str) -> Vec<u8> {
        let alg = Algorithm::parse(algorithm)
            .unwrap_or_else(|| bad_argument("algorithm", "must be sha256 or sha512"));
        gucs::with_salt_suffix(|s| keys::hash_key(key, s, alg))
    }

    /// A short duration (`30s 5m 1h 7d 2w 1y`) as an interval; NULL when `value` is not
    /// in the short form (the SQL layer then tries interval input).
    #[pg_extern(immutable, strict, parallel_safe)]
    fn parse_short_duration(value: &str, arg: &str) -> Option<Interval> {
        let span = duration::parse_short(value)?.unwrap_or_else(|e| bad_duration(arg, &e));
        Some(
            Interval::new(0, span.days, span.micros)
                .unwrap_or_else(|_| bad_duration(arg, "out of range")),
        )
    }

    /// Checks and normalises key options (see options.rs); raises 22023/22007 naming
    /// the bad argument.
    #[pg_extern(immutable, parallel_safe)]
    fn normalize_options(
        opts: Option<JsonB>,
        arg_prefix: default!(&str, "''"),
        required_owner: default!(bool, "true"),
    ) -> JsonB {
        let v = opts.map(|j| j.0).unwrap_or(serde_json::Value::Null);
        match options::normalize(&v, arg_prefix, required_owner) {
            Ok(m) => JsonB(serde_json::Value::Object(m)),
            Err(e) => refuse_option(e),
        }
    }

    /// Checks a rate limit object (`{"requests": n, "window": "1m"}`); JSON null passes.
    #[pg_extern(immutable, parallel_safe)]
    fn check_rate_limit(value: Option<JsonB>, arg: &str) -> Option<JsonB> {
        let v = value?.0;
        if v.is_null() {
            return Some(JsonB(v));
        }
        match options::rate_limit(&v, arg) {
            Ok(v) => Some(JsonB(v)),
            Err(e) => refuse_option(e),
        }
    }

    /// Checks the `environments` setting: `{"name": {"prefix": "...", "rate_limit": ...}}`.
    #[pg_extern(immutable, parallel_safe)]
    fn check_environments(value: Option<JsonB>) -> Option<JsonB> {
        let v = value?.0;
        if v.is_null() {
            return Some(JsonB(v));
        }
        let map = v.as_object().unwrap_or_else(|| {
            bad_argument("environments", "must be a JSON object of name -> settings")
        });
        for (name, env) in map {
            let arg = format!("environments.{name}");
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                bad_argument(
                    &arg,
                    "environment names are 1-64 characters of A-Z a-z 0-9 _ -",
                );
            }
            let obj = env
                .as_object()
                .unwrap_or_else(|| bad_argument(&arg, "must be an object"));
            for (k, val) in obj {
                match k.as_str() {
                    "prefix" => {
                        let p = val.as_str().unwrap_or_else(|| {
                            bad_argument(&format!("{arg}.prefix"), "must be a string")
                        });
                        keys::check_prefix(p)
                            .unwrap_or_else(|e| bad_argument(&format!("{arg}.prefix"), &e));
                    }
                    "rate_limit" | "rateLimit" => {
                        if !val.is_null() {
                            check_rate_limit(
                                Some(JsonB(val.clone())),
                                &format!("{arg}.rate_limit"),
                            );
                        }
                    }
                    other => bad_argument(&arg, &format!("unknown setting {other:?}")),
                }
            }
        }
        Some(JsonB(v))
    }

    /// Checks key-format settings; raises 22023 naming the bad one.
    #[pg_extern(immutable, parallel_safe)]
    fn check_format(prefix: &str, length: i32, alphabet: &str, algorithm: &str) -> bool {
        keys::check_prefix(prefix).unwrap_or_else(|e| bad_argument("prefix", &e));
        keys::check_length(length).unwrap_or_else(|e| bad_argument("length", &e));
        let symbols = keys::expand_alphabet(alphabet)
            .unwrap_or_else(|e| bad_argument("alphabet", &e))
            .len();
        keys::check_entropy(length, symbols)
            .unwrap_or_else(|e| bad_argument("length/alphabet", &e));
        Algorithm::parse(algorithm)
            .unwrap_or_else(|| bad_argument("algorithm", "must be sha256 or sha512"));
        true
    }

    /// Whether every scope a child asks for (global and per resource) is held by its parent.
    #[pg_extern(immutable, parallel_safe)]
    fn scopes_within(
        child_scopes: Option<Vec<Option<String>>>,
        child_resources: Option<JsonB>,
        parent_scopes: Option<Vec<Option<String>>>,
        parent_resources: Option<JsonB>,
    ) -> bool {
        let child: Vec<String> = child_scopes.into_iter().flatten().flatten().collect();
        let parent: Vec<String> = parent_scopes.into_iter().flatten().flatten().collect();
        if !scopes::is_subset(&child, &parent) {
            return false;
        }
        let parent_res = parent_resources.map(|j| j.0);
        let child_res = child_resources
            .map(|j| j.0)
            .unwrap_or(serde_json::Value::Null);
        child_res
            .as_object()
            .into_iter()
            .flatten()
            .all(|(res, list)| {
                list.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str())
                    .all(|s| {
                        if s == scopes::WILDCARD {
                            parent.iter().any(|p| p == scopes::WILDCARD)
                                || parent_res
                                    .as_ref()
                                    .and_then(|m| m.get(res))
                                    .is_some_and(|l| {
                                        l.as_array().is_some_and(|a| a.iter().any(|x| x == "*"))
                                    })
                        } else {
                            scopes::holds(&parent, parent_res.as_ref(), s, Some(res))
                        }
                    })
            })
    }

    /// The role the caller acts as outside any SECURITY DEFINER function (SET ROLE counts):
    /// what `current_user` says to the code that called keypal.
    #[pg_extern(stable, parallel_restricted)]
    fn invoking_user() -> String {
        invoking_user_name()
    }

    /// keypal_analyze's report from the facts it gathered (see insight.rs).
    #[pg_extern(immutable, strict, parallel_safe)]
    fn analyze_facts(facts: JsonB) -> JsonB {
        JsonB(crate::insight::analyze(&crate::insight::facts_from_json(
            &facts.0,
        )))
    }

    /// A key's use in the current quota `period`, given what keypal.quota_usage says
    /// (`table_used`): exact at this moment, with what shared memory holds that is not yet
    /// written (limits/shmem.rs `quota_used`).
    #[pg_extern(volatile, parallel_unsafe)]
    fn quota_used(key_id: Uuid, period: &str, table_used: i64) -> i64 {
        let start = crate::limits::enforce::period_start(period);
        let Some(id) = key_id.into_datum() else {
            return table_used;
        };
        let catalog = crate::catalog::get();
        crate::limits::shmem::quota_used(*key_id.as_bytes(), start, || {
            crate::limits::enforce::quota_used_at(&catalog, id, start)
        })
        .unwrap_or(table_used)
    }

    /// Whether verify applies a rate limit to a key with these settings (the key's own, its
    /// policy's, its environment's or the default; JSON null = none).
    #[pg_extern(stable, parallel_safe)]
    fn has_rate_limit(rate_limit: Option<JsonB>, policy: Option<&str>, env: Option<&str>) -> bool {
        let catalog = crate::catalog::get();
        let own = rate_limit.map(|j| j.0);
        crate::limits::enforce::rate_limit_of(&catalog, own.as_ref(), policy, env).is_some()
    }

    /// Why the key with this id would fail verify by its state alone (INVALID_KEY when
    /// there is none; REVOKED, DISABLED, EXPIRED, its own or an ancestor's, a passed
    /// revoke_at/disable_at counting), or NULL when it is usable. Read as verify reads:
    /// under a snapshot taken now, at the current time.
    #[pg_extern(volatile, parallel_unsafe)]
    fn key_state(key_id: Option<Uuid>) -> Option<&'static str> {
        let id = key_id?.into_datum()?;
        let catalog = crate::catalog::get();
        verify::state_of(&catalog, id, |_, _| ())
            .err()
            .map(|e| e.code())
    }

    /// Whether the key with this id would verify by its state and holds all (or any) of
    /// `scopes`, globally or on `resource` — one read, as verify reads. False for no such
    /// key, a NULL or empty `scopes`, or a NULL among them when all are asked for.
    #[pg_extern(volatile, parallel_unsafe)]
    fn key_holds(
        key_id: Option<Uuid>,
        scopes: Option<Vec<Option<String>>>,
        resource: Option<&str>,
        all: bool,
    ) -> bool {
        let (Some(id), Some(scopes)) = (key_id.and_then(|k| k.into_datum()), scopes) else {
            return false;
        };
        if all && scopes.iter().any(Option::is_none) {
            return false;
        }
        let catalog = crate::catalog::get();
        let wanted = scopes.iter().flatten().map(String::as_str);
        verify::state_of(&catalog, id, |held, res| {
            verify::holds(held, res, wanted, resource, all)
        })
        .unwrap_or(false)
    }

    /// Wakes this database's worker once the current transaction commits (starting one
    /// before it commits if none runs): it queued webhook deliveries.
    #[pg_extern(volatile, parallel_unsafe)]
    fn wake_worker() {
        crate::worker::wake_at_commit();
    }

    /// A key's request-signing secret, derived from the server's `keypal.signing_secret`
    /// (55000 while that is not set). Never stored.
    #[pg_extern(stable, parallel_safe)]
    fn signing_secret_for(key_id: Uuid) -> String {
        signing_secret(key_id)
    }

    /// keypal_verify_signature's check, once the key is known usable and `secret` is its
    /// signing secret: the signature signs this request, is dated within `max_age_us` of
    /// now (and at most a minute ahead), and has not been presented before within that
    /// time (shared memory: exact across sessions, not undone by a rollback).
    #[pg_extern(volatile, parallel_unsafe)]
    fn accept_signature(
        key_id: Uuid,
        secret: &str,
        method: &str,
        path: &str,
        body: &str,
        signature: &str,
        max_age_us: i64,
    ) -> bool {
        use crate::limits::shmem::SIGNATURE_SKEW_US as SKEW_US;
        let Some(t) =
            crate::signature::check_request(secret, method, path, body.as_bytes(), signature)
        else {
            return false;
        };
        // SAFETY: reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        let t_us = t
            .saturating_mul(1_000_000)
            .saturating_sub(UNIX_MINUS_PG_EPOCH_US);
        if now.saturating_sub(t_us) > max_age_us || t_us.saturating_sub(now) > SKEW_US {
            return false;
        }
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(key_id.as_bytes());
        // The key, and the signature in its one spelling (parse_signature accepts no other).
        h.update(signature.as_bytes());
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&h.finalize()[..16]);
        let until = t_us
            .saturating_add(max_age_us)
            .max(now)
            .saturating_add(1_000_000);
        match crate::limits::shmem::first_sighting(digest, t_us, until) {
            Ok(first) => first,
            Err(e) => {
                pgrx::warning!("{e}; signatures are refused until some expire");
                false
            }
        }
    }

    /// Makes sure, before the current transaction commits, that this database has a
    /// worker: it armed a key's schedule, which the worker's maintenance applies.
    #[pg_extern(volatile, parallel_unsafe)]
    fn ensure_worker() {
        crate::worker::ensure_at_commit();
    }

    /// Whether the caller runs inside a transaction block (BEGIN … COMMIT): then
    /// maintenance cannot commit between its batches.
    #[pg_extern(volatile, parallel_safe)]
    fn in_transaction_block() -> bool {
        // SAFETY: reads the transaction state of this backend.
        unsafe { pg_sys::IsTransactionBlock() }
    }

    /// Whether this backend is running a COPY into `relid` — how pg_restore and pg_dump's
    /// scripts load table data. The audit trigger then records nothing: the restored rows
    /// bring their own audit history.
    #[pg_extern(volatile, parallel_restricted)]
    fn copying_into(relid: pg_sys::Oid) -> bool {
        // SAFETY: MyBEEntry is this backend's own status entry (or null before it exists);
        // only this backend writes its progress fields.
        unsafe {
            let be = pg_sys::MyBEEntry;
            !be.is_null()
                && (*be).st_progress_command == pg_sys::ProgressCommandType::PROGRESS_COMMAND_COPY
                && (*be).st_progress_command_target == relid
        }
    }

    /// REPEATABLE READ or SERIALIZABLE: refuses (40001, as PostgreSQL refuses a concurrent
    /// update) when one of these keys has a child its statement's snapshot does not show —
    /// made, or moved to it, by a transaction that committed after the snapshot was taken,
    /// typically while this one waited for the key's lock. The revocation cascade, the
    /// check of the children's scopes and a rotation's move of the children would miss
    /// it. READ COMMITTED takes a new snapshot per statement, after the wait: nothing to do.
    #[pg_extern(volatile, parallel_unsafe)]
    fn refuse_unseen_children(parents: pgrx::Array<Uuid>) {
        // SAFETY: reads a static flag of the transaction, then syscache lookups by name.
        unsafe {
            if pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32 {
                return;
            }
            let nsp = pg_sys::get_namespace_oid(c"keypal".as_ptr(), false);
            let table = pg_sys::get_relname_relid(c"keys".as_ptr(), nsp);
            let by_parent = crate::scan::Index {
                table,
                index: pg_sys::get_relname_relid(c"keys_parent_idx".as_ptr(), nsp),
                column: pg_sys::get_attnum(table, c"parent_id".as_ptr()),
                eq: pg_sys::F_UUID_EQ,
            };
            if by_parent.index == pg_sys::InvalidOid || by_parent.column <= 0 {
                raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "keypal: the index keypal.keys_parent_idx on keypal.keys (parent_id) is missing".into(),
                );
            }
            let parents: Vec<Uuid> = parents.iter().flatten().collect();
            let values: Vec<pg_sys::Datum> = parents
                .iter()
                .map(|p| p.into_datum().expect("a uuid is a datum"))
                .collect();
            if let Some(at) = by_parent.first_unseen(&values) {
                pgrx::pg_sys::panic::ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                    format!("could not serialize access: key {} has a child key made or moved by a transaction that committed after this one's snapshot", parents[at]),
                    "keypal",
                )
                .set_hint("run the transaction again")
                .report(pgrx::PgLogLevel::ERROR);
            }
        }
    }

    /// How many levels a key hierarchy may have (a root key is level 1).
    #[pg_extern(immutable, parallel_safe)]
    fn max_hierarchy_depth() -> i32 {
        verify::MAX_DEPTH as i32
    }

    /// Makes verify re-read a key's quota use from the table (after a direct write to it)
    /// once this transaction commits.
    #[pg_extern(volatile, parallel_unsafe)]
    fn quota_changed(key_id: Uuid) {
        crate::limits::shmem::reload_quota_at_commit(*key_id.as_bytes());
    }

    /// The key's last admitted verify as shared memory holds it (not yet written to
    /// keypal.keys.last_used_at, or newer than it), or NULL.
    #[pg_extern(volatile, parallel_restricted)]
    fn unwritten_last_use(key_id: Option<Uuid>) -> Option<pgrx::datum::TimestampWithTimeZone> {
        let t = crate::limits::shmem::last_used(*key_id?.as_bytes())?;
        // SAFETY: t is timestamptz microseconds.
        unsafe { pgrx::datum::TimestampWithTimeZone::from_datum(pg_sys::Datum::from(t), false) }
    }

    /// Requests per key and hour that verify counted and the flush worker has not yet
    /// written to keypal.usage (this database's).
    #[pg_extern(volatile, parallel_restricted)]
    fn unwritten_usage() -> TableIterator<
        'static,
        (
            name!(key_id, Uuid),
            name!(hour, pgrx::datum::TimestampWithTimeZone),
            name!(requests, i64),
        ),
    > {
        let rows: Vec<_> = crate::limits::shmem::unwritten_hours()
            .into_iter()
            .filter_map(|(k, h, n)| {
                // SAFETY: h is timestamptz microseconds.
                let h = unsafe {
                    pgrx::datum::TimestampWithTimeZone::from_datum(pg_sys::Datum::from(h), false)
                }?;
                Some((Uuid::from_bytes(k), h, n))
            })
            .collect();
        TableIterator::new(rows)
    }

    /// The pid of this database's flush worker, or NULL when none runs.
    #[pg_extern(volatile, parallel_restricted)]
    fn flush_worker_pid() -> Option<i32> {
        crate::limits::shmem::worker_pid()
    }

    /// Makes every backend reload what verify caches about the settings (called by the
    /// statement trigger on keypal.settings).
    #[pg_extern(volatile)]
    fn invalidate_settings_cache(settings: pg_sys::Oid) {
        crate::catalog::invalidate(settings);
    }

    /// The id of the key authenticated in this transaction (for the SQL layer's checks).
    #[pg_extern(stable, parallel_restricted)]
    fn authenticated_key_id() -> Option<Uuid> {
        identity::with(|i| i.map(|i| i.key_id))
    }
}
