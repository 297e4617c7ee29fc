//! Rate limits and quotas at verify time.
//!
//! Every fully valid verify is decided and recorded in shared memory (shmem.rs): its rate
//! window, quota count, hour and last use, in one entry lock, in every transaction kind and
//! on a standby alike. Nothing is written to a table by verify and nothing is rolled back
//! with the caller's transaction; the flush worker (worker.rs) writes behind.

use super::entry::{Ask, QuotaAsk, Scope};
use super::quota::{self, Quota};
use super::shmem;
use super::window::Limit;
use crate::catalog::Catalog;
use crate::errors::VerifyError;
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

/// Decides a fully valid verify against the key's limits and records it in shared memory
/// (its last use; its rate window, quota count and hour when it has them).
/// With keypal_configure(limit_split => n), each server enforces its share of every limit
/// (quota::share) and counts only its own traffic: a standby's quota count starts from
/// zero, not from the primary's count it replays.
pub fn enforce(catalog: &Catalog, key: &KeyLimits, cost: i64) -> Result<Usage, Refusal> {
    let servers = catalog.limit_split;
    // SAFETY: reads shared recovery state.
    let standby = unsafe { pg_sys::RecoveryInProgress() };
    let primary = servers <= 1 || !standby;
    // A standby's admissions are shipped to the primary (worker.rs); unless limits are split,
    // every server decides on the global count.
    let scope = Scope {
        replica: standby,
        global: servers <= 1,
        stale_us: 2 * i64::from(crate::gucs::FLUSH_INTERVAL_MS.get()) * 1000,
    };
    let rate = rate_limit_of(
        catalog,
        key.rate_limit.as_deref(),
        key.policy.as_deref(),
        key.env.as_deref(),
    )
    .map(|l| Limit {
        requests: quota::share(l.requests, servers, primary),
        ..l
    });
    let quota = key
        .quota
        .as_deref()
        .and_then(quota::parse_quota)
        .map(|q| Quota {
            limit: quota::share(q.limit, servers, primary),
            ..q
        });
    let ask = Ask {
        rate,
        quota: quota.as_ref().map(|q| QuotaAsk {
            limit: q.limit,
            period_start: period_start(&q.period),
            on_exceeded: q.on_exceeded,
        }),
        cost,
    };
    let load = || match &quota {
        Some(q) if primary => quota_used_now(catalog, key.id, q),
        _ => 0,
    };
    let resolution = catalog.last_used_resolution_us;
    let Ok(answer) = shmem::admit(key_bytes(key.id), &ask, scope, resolution, load) else {
        if rate.is_none() && quota.is_none() {
            // Nothing to enforce: the key verifies; only its use goes unrecorded.
            shmem::note_dropped();
            return Ok(Usage::default());
        }
        shmem::Full.raise("a key with limits cannot be checked");
    };
    if let Some(d) = answer.rate.filter(|d| !d.allowed) {
        return Err(Refusal::rate_limited(d.retry_after_ms));
    }
    if answer.quota.blocked {
        return Err(VerifyError::QuotaExceeded.into());
    }
    Ok(Usage {
        rate_limit_remaining: answer.rate.map(|d| d.remaining),
        quota_remaining: quota
            .as_ref()
            .zip(answer.quota_used)
            .map(|(q, u)| (q.limit - u - cost).max(0)),
    })
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

/// The 16 bytes of the key's uuid.
fn key_bytes(id: pg_sys::Datum) -> [u8; 16] {
    // SAFETY: id is the key's uuid datum.
    unsafe { pgrx::Uuid::from_datum(id, false) }
        .map(|u| *u.as_bytes())
        .unwrap_or([0; 16])
}

/// The key's use in the current period of `q` as a query run now would see it (no lock;
/// a direct index lookup, no SPI).
fn quota_used_now(catalog: &Catalog, id: pg_sys::Datum, q: &Quota) -> i64 {
    quota_used_at(catalog, id, period_start(&q.period))
}

/// The key's use in the quota period starting `start`, as a query run now would see it (no
/// lock; a direct index lookup, no SPI).
pub fn quota_used_at(catalog: &Catalog, id: pg_sys::Datum, start: i64) -> i64 {
    let [start_col, used] = catalog.quota_attnums;
    // timestamptz and bigint are by-value 64-bit datums.
    crate::scan::Fresh::with(|snapshot| {
        catalog
            .quota_by_key
            .lookup(snapshot, id, &[start_col, used])
    })
    .filter(|[s, _]| s.map(|s| s.value() as i64) == Some(start))
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
