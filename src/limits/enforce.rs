//! Rate limits and quotas at verify time.
//!
//! With the preload, both count in shared memory (shmem.rs): rate windows never touch a
//! table; quota counts are written by the flush worker (worker.rs) — in the database it
//! serves, and not on a standby. Otherwise, and for keys past the shared table's cap, they
//! count in `keypal.rate_state` / `keypal.quota_usage`: each limited key's row is locked (an
//! upsert) for the decision, so concurrent verifies of one key are serialised and never
//! over-admit, across all connections; in a read-only transaction (or on a standby) the row
//! is read, not written (decided, not counted); and being a table row, the count rolls back
//! with the caller's transaction. Keys without a rate limit or quota touch nothing.

use super::quota::{self, Quota};
use super::shmem;
use super::window::{Limit, Window};
use crate::catalog::Catalog;
use crate::errors::VerifyError;
use crate::spi::{Connection, Stmt};
use crate::worker;
use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The limit settings of one key row.
pub struct KeyLimits {
    pub id: pg_sys::Datum,
    pub rate_limit: Option<Rc<Value>>,
    pub quota: Option<Rc<Value>>,
    pub policy: Option<String>,
    pub env: Option<String>,
}

/// What the limits left: reported in verify_result.
#[derive(Default)]
pub struct Usage {
    pub rate_limit_remaining: Option<i64>,
    pub quota_remaining: Option<i64>,
}

/// A refused verify and, for limits, how long to wait.
pub struct Refusal {
    pub err: VerifyError,
    pub retry_after_ms: Option<i64>,
}

impl Refusal {
    fn rate_limited(retry_after_ms: i64) -> Refusal {
        Refusal {
            err: VerifyError::RateLimited,
            retry_after_ms: Some(retry_after_ms),
        }
    }
}

impl From<VerifyError> for Refusal {
    fn from(err: VerifyError) -> Refusal {
        Refusal {
            err,
            retry_after_ms: None,
        }
    }
}

static RATE_LOCK: Stmt = Stmt::new(
    c"INSERT INTO keypal.rate_state AS r (key_id, state) VALUES ($1, '{}')
      ON CONFLICT (key_id) DO UPDATE SET state = r.state
      RETURNING r.state",
    &[pg_sys::UUIDOID],
);
static RATE_PEEK: Stmt = Stmt::new(
    c"SELECT r.state FROM keypal.rate_state r WHERE r.key_id = $1",
    &[pg_sys::UUIDOID],
);
static RATE_SAVE: Stmt = Stmt::new(
    c"UPDATE keypal.rate_state SET state = $2 WHERE key_id = $1",
    &[pg_sys::UUIDOID, pg_sys::INT8ARRAYOID],
);
static QUOTA_LOCK: Stmt = Stmt::new(
    c"SELECT keypal.count_quota_use($1, $2, 0)",
    &[pg_sys::UUIDOID, pg_sys::TEXTOID],
);
/// Counts an admitted request against the quota and in the key's usage for this hour.
static QUOTA_ADD: Stmt = Stmt::new(
    c"WITH q AS (UPDATE keypal.quota_usage SET used = used + $2 WHERE key_id = $1)
      INSERT INTO keypal.usage AS u (key_id, hour, endpoint, requests)
      VALUES ($1, date_trunc('hour', now()), '', $2)
      ON CONFLICT ON CONSTRAINT usage_pkey DO UPDATE SET requests = u.requests + EXCLUDED.requests",
    &[pg_sys::UUIDOID, pg_sys::INT8OID],
);
static QUOTA_EVENT: Stmt = Stmt::new(
    c"SELECT keypal.emit_event('quota.exceeded', $1,
             jsonb_build_object('keyId', $1, 'limit', $2, 'used', $3, 'period', $4))",
    &[
        pg_sys::UUIDOID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
        pg_sys::TEXTOID,
    ],
);

/// The rate limit in force for a key with these settings (its own, else its policy's,
/// else its environment's, else the default).
pub fn rate_limit_of(
    catalog: &Catalog,
    rate_limit: Option<&Value>,
    policy: Option<&str>,
    env: Option<&str>,
) -> Option<Limit> {
    let policy = policy.and_then(|p| catalog.policy_rate_limits.as_ref()?.get(p));
    let environment = env.and_then(|e| {
        let env = catalog.environments.as_ref()?.get(e)?;
        env.get("rate_limit").or_else(|| env.get("rateLimit"))
    });
    quota::effective_rate_limit(
        rate_limit,
        policy,
        environment,
        catalog.default_rate_limit.as_ref(),
    )
}

/// Decides the key's limits for a request of `cost`, counting it when admitted and
/// `writable`.
pub fn enforce(
    catalog: &Catalog,
    key: &KeyLimits,
    cost: i64,
    writable: bool,
) -> Result<Usage, Refusal> {
    let rate = rate_limit_of(
        catalog,
        key.rate_limit.as_deref(),
        key.policy.as_deref(),
        key.env.as_deref(),
    );
    let quota = key.quota.as_deref().and_then(quota::parse_quota);
    if rate.is_none() && quota.is_none() {
        return Ok(Usage::default());
    }
    if let Some(result) =
        enforce_in_shared_memory(catalog, key, rate, quota.as_ref(), cost, writable)
    {
        return result;
    }
    Connection::with(|conn| {
        let used = quota
            .as_ref()
            .map(|q| quota_used(catalog, conn, key.id, q, writable));
        let judged = quota
            .as_ref()
            .zip(used)
            .map(|(q, u)| q.judge(u, cost))
            .unwrap_or_default();
        let rate = if judged.throttled {
            Some(quota::throttled(rate))
        } else {
            rate
        };
        let mut usage = Usage::default();
        let mut window = None;
        if let Some(limit) = rate {
            let mut w = rate_window(conn, key.id, writable);
            // SAFETY: reads the clock.
            let now = unsafe { pg_sys::GetCurrentTimestamp() };
            let d = w.admit(now, limit, cost, writable && !judged.blocked);
            window = Some(w);
            if !d.allowed {
                return Err(Refusal::rate_limited(d.retry_after_ms));
            }
            usage.rate_limit_remaining = Some(d.remaining);
        }
        if judged.blocked {
            return Err(VerifyError::QuotaExceeded.into());
        }
        if let (Some(q), Some(u)) = (&quota, used) {
            usage.quota_remaining = Some((q.limit - u - if writable { cost } else { 0 }).max(0));
        }
        if writable {
            if let Some(w) = window {
                RATE_SAVE.exec(conn, &[Some(key.id), w.to_vec().into_datum()], false, 0);
            }
            if let (Some(q), Some(u)) = (&quota, used) {
                QUOTA_ADD.exec(conn, &[Some(key.id), cost.into_datum()], false, 0);
                if judged.warn_crossed {
                    warn_event(conn, key.id, q, u + cost);
                }
            }
        }
        Ok(usage)
    })
}

/// Decides in shared memory when it can: the preload is there and, for a quota, the flush
/// worker serves this database (and this is not a standby). None: use the tables.
fn enforce_in_shared_memory(
    catalog: &Catalog,
    key: &KeyLimits,
    rate: Option<Limit>,
    quota: Option<&Quota>,
    cost: i64,
    writable: bool,
) -> Option<Result<Usage, Refusal>> {
    if !shmem::available() || (quota.is_some() && !worker::flushes_here()) {
        return None;
    }
    let ask = shmem::Ask {
        rate,
        quota: quota.map(|q| shmem::QuotaAsk {
            limit: q.limit,
            period_start: period_start(&q.period),
            on_exceeded: q.on_exceeded,
        }),
        cost,
    };
    let load = || quota.map_or(0, |q| quota_used_now(catalog, key.id, q));
    let answer = shmem::admit(key_bytes(key.id), &ask, load)?;
    if let Some(d) = answer.rate.filter(|d| !d.allowed) {
        return Some(Err(Refusal::rate_limited(d.retry_after_ms)));
    }
    if answer.quota.blocked {
        return Some(Err(VerifyError::QuotaExceeded.into()));
    }
    if let (Some(q), Some(u)) = (quota, answer.quota_used) {
        if writable && answer.quota.warn_crossed {
            Connection::with(|conn| warn_event(conn, key.id, q, u + cost));
        }
    }
    Some(Ok(Usage {
        rate_limit_remaining: answer.rate.map(|d| d.remaining),
        quota_remaining: quota
            .zip(answer.quota_used)
            .map(|(q, u)| (q.limit - u - cost).max(0)),
    }))
}

/// Start of the current quota period (`date_trunc(period, now(), 'UTC')`), as timestamptz
/// microseconds.
pub fn period_start(period: &str) -> i64 {
    // SAFETY: reads the transaction's start time.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    quota::period_start_us(period, now).unwrap_or_else(|| {
        // SAFETY: timestamptz_trunc_zone(text, timestamptz, text) with valid arguments.
        unsafe {
            pgrx::direct_function_call::<i64>(
                pg_sys::timestamptz_trunc_zone,
                &[period.into_datum(), now.into_datum(), "UTC".into_datum()],
            )
            .unwrap_or(now)
        }
    })
}

/// Emits `quota.exceeded` for a warning quota just crossed (`used` includes this request).
fn warn_event(conn: &Connection, id: pg_sys::Datum, q: &Quota, used: i64) {
    let args = [
        Some(id),
        q.limit.into_datum(),
        used.into_datum(),
        q.period.as_str().into_datum(),
    ];
    QUOTA_EVENT.exec(conn, &args, false, 0);
}

/// The 16 bytes of the key's uuid.
fn key_bytes(id: pg_sys::Datum) -> [u8; 16] {
    // SAFETY: id is the key's uuid datum.
    unsafe { pgrx::Uuid::from_datum(id, false) }
        .map(|u| *u.as_bytes())
        .unwrap_or([0; 16])
}

fn rate_window(conn: &Connection, id: pg_sys::Datum, writable: bool) -> Window {
    let stmt = if writable { &RATE_LOCK } else { &RATE_PEEK };
    if stmt.exec(conn, &[Some(id)], !writable, 1) != 1 {
        return Window::default();
    }
    // SAFETY: the statement returns the state as int8[].
    let state = conn
        .get(0, 1)
        .and_then(|d| unsafe { Vec::<i64>::from_datum(d, false) })
        .unwrap_or_default();
    Window::from_slice(&state)
}

/// The key's use in the current period of `q`: read with its row locked (the table
/// path's decision, `writable`), else as a query run now would see it.
fn quota_used(
    catalog: &Catalog,
    conn: &Connection,
    id: pg_sys::Datum,
    q: &Quota,
    writable: bool,
) -> i64 {
    if !writable {
        return quota_used_now(catalog, id, q);
    }
    if QUOTA_LOCK.exec(conn, &[Some(id), q.period.as_str().into_datum()], false, 1) != 1 {
        return 0;
    }
    // SAFETY: the statement returns used as int8.
    conn.get(0, 1)
        .and_then(|d| unsafe { i64::from_datum(d, false) })
        .unwrap_or(0)
}

/// The key's use in the current period of `q` as a query run now would see it (no lock;
/// a direct index lookup, no SPI).
fn quota_used_now(catalog: &Catalog, id: pg_sys::Datum, q: &Quota) -> i64 {
    let [start, used] = catalog.quota_attnums;
    // timestamptz and bigint are by-value 64-bit datums.
    crate::scan::Fresh::with(|snapshot| catalog.quota_by_key.lookup(snapshot, id, &[start, used]))
        .filter(|[s, _]| s.map(|s| s.value() as i64) == Some(period_start(&q.period)))
        .and_then(|[_, u]| u.map(|u| u.value() as i64))
        .unwrap_or(0)
}

thread_local! {
    /// Parsed jsonb limit settings by their bytes: most keys share a few distinct settings.
    static PARSED: RefCell<HashMap<Vec<u8>, Rc<Value>>> = RefCell::new(HashMap::new());
}
const PARSED_MAX: usize = 1024;

/// Reads a jsonb column of the key row (a limit setting), parsing each distinct value once
/// per backend.
pub fn json(d: Option<pg_sys::Datum>) -> Option<Rc<Value>> {
    let d = d?;
    // SAFETY: d is a jsonb column of the key row; its detoasted bytes are read in place.
    unsafe {
        let raw = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
        let bytes = pgrx::varlena::varlena_to_byte_slice(raw);
        if let Some(v) = PARSED.with(|p| p.borrow().get(bytes).cloned()) {
            return Some(v);
        }
        let value = Rc::new(JsonB::from_datum(d, false)?.0);
        PARSED.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() >= PARSED_MAX {
                p.clear();
            }
            p.insert(bytes.to_vec(), value.clone());
        });
        Some(value)
    }
}
