//! The flush worker: with `shared_preload_libraries = 'keypal'`, quota counts are kept in
//! shared memory by verify and written to `keypal.quota_usage` and `keypal.usage` (per key
//! and hour) by this background worker every `keypal.flush_interval` ms, each flush one
//! transaction. A crash loses at most the counts of the last interval.
//!
//! It serves one database, `keypal.database` (default `postgres`); in other databases, and
//! on a standby, quotas count in the tables directly.

use crate::limits::shmem;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting};
use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::CString;
use std::time::Duration;

pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// 5 s: a flush costs one row update per key counted since the last one, so a longer
/// interval writes each busy key once for many requests (docs/DESIGN.md has the figures).
pub static FLUSH_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);

/// From _PG_init while being preloaded: the settings and the worker.
pub fn init() {
    GucRegistry::define_string_guc(
        c"keypal.database",
        c"The database whose quota counts keypal's flush worker writes.",
        c"Only with shared_preload_libraries = 'keypal'.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"keypal.flush_interval",
        c"How often (ms) the flush worker writes quota counts from shared memory to tables.",
        c"A crash loses at most this much of quota counting.",
        &FLUSH_INTERVAL_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    BackgroundWorkerBuilder::new("keypal flush worker")
        .set_type("keypal flush worker")
        .set_library("keypal")
        .set_function("keypal_flush_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn database_name() -> String {
    DATABASE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".into())
}

thread_local! {
    static SERVES_HERE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether the worker writes this database's counts (so verify may count quotas in
/// shared memory here).
pub fn flushes_here() -> bool {
    // SAFETY: reads backend globals; get_database_oid with missing_ok.
    unsafe {
        if pg_sys::RecoveryInProgress() || !shmem::preloaded() {
            return false;
        }
        if let Some(v) = SERVES_HERE.get() {
            return v;
        }
        let name = CString::new(database_name()).unwrap_or_default();
        let v = pg_sys::get_database_oid(name.as_ptr(), true) == pg_sys::MyDatabaseId;
        SERVES_HERE.set(Some(v));
        v
    }
}

/// Gives each key of a flush that still exists a keypal.quota_usage row to count in (no
/// use yet), where it has none.
const ADD_ROWS: &str = "
    INSERT INTO keypal.quota_usage (key_id, period_start, used, hour, hour_requests)
    SELECT f.key_id, f.period_start, 0, pg_catalog.date_trunc('hour', pg_catalog.now()), 0
      FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]),
                      pg_catalog.unnest($2::pg_catalog.timestamptz[])) AS f(key_id, period_start)
     WHERE NOT EXISTS (SELECT 1 FROM keypal.quota_usage x WHERE x.key_id OPERATOR(pg_catalog.=) f.key_id)
       AND EXISTS (SELECT 1 FROM keypal.keys k WHERE k.id OPERATOR(pg_catalog.=) f.key_id)
    ON CONFLICT (key_id) DO NOTHING";

/// Writes the pending counts: one row per key in keypal.quota_usage, which holds both the
/// period's use and the current hour's requests. A count from a period the row has already
/// left is dropped from the quota but still counted for the hour. Returns the keys written
/// (those with a row: ADD_ROWS ran first).
const FLUSH: &str = "
    UPDATE keypal.quota_usage q
       SET used = CASE WHEN q.period_start OPERATOR(pg_catalog.=) f.period_start
                       THEN q.used OPERATOR(pg_catalog.+) f.n
                       WHEN q.period_start OPERATOR(pg_catalog.<) f.period_start THEN f.n
                       ELSE q.used END,
           period_start = greatest(q.period_start, f.period_start),
           hour = coalesce(q.hour, pg_catalog.date_trunc('hour', pg_catalog.now())),
           hour_requests = q.hour_requests OPERATOR(pg_catalog.+) f.n
      FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]),
                      pg_catalog.unnest($2::pg_catalog.timestamptz[]),
                      pg_catalog.unnest($3::pg_catalog.int8[])) AS f(key_id, period_start, n)
     WHERE q.key_id OPERATOR(pg_catalog.=) f.key_id
    RETURNING q.key_id";

/// Moves the requests of hours that are over from keypal.quota_usage to keypal.usage (an
/// index scan that finds nothing, except in the first flush of an hour).
const ROLL_HOURS: &str = "
    WITH old AS (
        SELECT q.key_id, q.hour, q.hour_requests FROM keypal.quota_usage q
         WHERE q.hour OPERATOR(pg_catalog.<) pg_catalog.date_trunc('hour', pg_catalog.now())),
    cleared AS (
        UPDATE keypal.quota_usage q SET hour = NULL, hour_requests = 0
          FROM old WHERE q.key_id OPERATOR(pg_catalog.=) old.key_id)
    INSERT INTO keypal.usage AS u (key_id, hour, endpoint, requests)
    SELECT old.key_id, old.hour, '', old.hour_requests FROM old
     WHERE old.hour_requests OPERATOR(pg_catalog.>) 0
    ON CONFLICT ON CONSTRAINT usage_pkey DO UPDATE
        SET requests = u.requests OPERATOR(pg_catalog.+) EXCLUDED.requests";

/// First statement of every worker transaction: the worker runs as the bootstrap
/// superuser, so nothing it runs may resolve through a search_path the database's owner
/// chose (`ALTER DATABASE … SET search_path`). Itself fully qualified.
const PIN_SEARCH_PATH: &str =
    "SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)";

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn keypal_flush_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&database_name()), None);
    BackgroundWorker::transaction(pin_session);
    // SAFETY: reads a backend global.
    shmem::requeue_inflight(unsafe { pg_sys::MyDatabaseId });
    loop {
        let interval = Duration::from_millis(FLUSH_INTERVAL_MS.get().max(10) as u64);
        if !BackgroundWorker::wait_latch(Some(interval)) {
            flush_once();
            // Exit code 1 has the postmaster start the worker again after its restart
            // interval (e.g. after DROP DATABASE ... WITH (FORCE) terminated it); exit 0
            // would retire it for good.
            // SAFETY: ends this worker process the way PostgreSQL expects.
            unsafe { pg_sys::proc_exit(1) };
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads the configuration files, as a worker must on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        flush_once();
    }
}

/// The settings the worker's session runs with, over anything the database's owner set
/// with `ALTER DATABASE … SET` (applied when the worker connected): a read-only default,
/// timeouts, another session user or role would stop flushing, `exit_on_error` would turn
/// any error into a restart, another time zone would shift the hours. The session user is
/// pinned first, to the bootstrap superuser the worker connected as.
const PINNED: [(&std::ffi::CStr, &std::ffi::CStr); 9] = [
    (c"search_path", c"pg_catalog, pg_temp"),
    (c"role", c"none"),
    (c"exit_on_error", c"off"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"statement_timeout", c"0"),
    (c"lock_timeout", c"0"),
    (c"idle_in_transaction_session_timeout", c"0"),
    (c"TimeZone", c"UTC"),
];

fn pin_session() {
    // SAFETY: inside a transaction (the name lookup and the setting's check read the
    // catalog); the bootstrap superuser always exists.
    unsafe {
        let me = pg_sys::GetUserNameFromId(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), false);
        pg_sys::SetConfigOption(
            c"session_authorization".as_ptr(),
            me,
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
    for (name, value) in PINNED {
        // SAFETY: sets a known setting for this session at the highest priority, inside a
        // transaction (the role setting's check may look up roles).
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }
}

/// Takes every pending count of this database, writes them in one transaction, then
/// confirms them in shared memory (those not written go back to pending).
fn flush_once() {
    // SAFETY: reads a backend global.
    let db = unsafe { pg_sys::MyDatabaseId };
    let pending = shmem::pending(db);
    if pending.is_empty() {
        return;
    }
    let keys: Vec<pgrx::Uuid> = pending
        .iter()
        .map(|p| pgrx::Uuid::from_bytes(p.key))
        .collect();
    // SAFETY: period starts are timestamptz microseconds.
    let periods: Vec<pgrx::datum::TimestampWithTimeZone> = pending
        .iter()
        .filter_map(|p| unsafe {
            pgrx::datum::TimestampWithTimeZone::from_datum(
                pg_sys::Datum::from(p.period_start),
                false,
            )
        })
        .collect();
    let counts: Vec<i64> = pending.iter().map(|p| p.requests).collect();
    // Keys this flush cannot see (created by a transaction still open) keep their counts
    // pending for the next flush.
    let written: HashSet<[u8; 16]> = BackgroundWorker::transaction(|| {
        if let Err(e) = Spi::run(PIN_SEARCH_PATH) {
            pgrx::warning!("keypal flush worker: pinning search_path: {e}");
            return HashSet::new();
        }
        let installed = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension
                             WHERE extname OPERATOR(pg_catalog.=) 'keypal')",
        )
        .ok()
        .flatten()
        .unwrap_or(false);
        if !installed {
            return HashSet::new();
        }
        Spi::connect_mut(|client| {
            if let Err(e) = client.update(ROLL_HOURS, None, &[]) {
                pgrx::warning!("keypal flush worker: moving finished hours to keypal.usage: {e}");
            }
            // (Keys left without a row are not written: their counts stay pending.)
            let args = [keys.clone().into(), periods.clone().into()];
            if let Err(e) = client.update(ADD_ROWS, None, &args) {
                pgrx::warning!("keypal flush worker: adding keypal.quota_usage rows: {e}");
            }
            let rows = client.update(FLUSH, None, &[keys.into(), periods.into(), counts.into()]);
            rows.map(|t| {
                t.filter_map(|r| r.get::<pgrx::Uuid>(1).ok().flatten())
                    .map(|u| *u.as_bytes())
                    .collect()
            })
            .unwrap_or_default()
        })
    });
    // A worker never goes idle the way a backend does: report its table statistics
    // itself, or autovacuum would never learn of the rows it updates.
    // SAFETY: outside any transaction, as PostgreSQL's own workers call it.
    unsafe { pg_sys::pgstat_report_stat(false) };
    shmem::flushed(db, &pending, &written);
}
