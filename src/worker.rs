//! The flush worker: writes what verify recorded in shared memory (limits/shmem.rs) to the
//! tables — `last_used_at`, quota use, per-hour requests, `quota.exceeded` events — every
//! `keypal.flush_interval`, each flush one transaction, and drops entries that are done.
//! Between flushes it delivers webhooks and runs maintenance (src/automation.rs).
//!
//! One per database that uses keypal, a dynamic background worker started by the first
//! verify that records something there, or by a commit that queued webhook deliveries
//! (preloaded or not: one behaviour). It leaves when its database has no entries, no
//! deliveries to make and no maintenance to run (keypal.maintenance_interval = 0) for a
//! while, when keypal is dropped there, or when told to
//! stop — then, at a clean shutdown, only after the database's other sessions have gone,
//! writing everything they counted. A flush that fails (an error in SQL) keeps its batch for
//! the next one. On a standby it writes nothing: it ships what verify counted there to the
//! primary (replica.rs), or, with nowhere to ship to, keeps it local to that server.

use crate::limits::entry::{Outcome, Taken, NEVER};
use crate::limits::shmem::{self, Sweep};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::{pg_sys, IntoDatum};
use std::collections::HashSet;
use std::time::Duration;

/// A database's worker leaves once it has had no entries for this long.
const IDLE_EXIT_US: i64 = 30_000_000;
/// What a key that is not in the table counted is kept this long (its creating transaction
/// may still commit), then dropped.
const MISSING_GRACE_US: i64 = 600_000_000;
/// At a clean stop, how long the worker waits for its database's sessions to go.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

thread_local! {
    /// When this backend last warned that no worker could be started (µs).
    static LAST_WARNING: std::cell::Cell<i64> = const { std::cell::Cell::new(i64::MIN) };
}

/// After verify recorded something: makes sure this database has a flush worker (asks the
/// postmaster for one if none runs). Loud when it cannot, but once a minute per backend:
/// counts stay in shared memory until a worker runs, and verify goes on.
pub fn ensure() {
    report(shmem::worker_wanted());
}

/// Starts the worker if it is wanted (`wanted`), or warns (once a minute per backend).
fn report(wanted: Result<bool, String>) {
    // SAFETY: reads a backend global.
    let db = unsafe { pg_sys::MyDatabaseId.to_u32() };
    let problem = match wanted {
        Ok(false) => return,
        Ok(true) => match start(db) {
            Ok(()) => return,
            Err(e) => e,
        },
        Err(e) => e,
    };
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if now.saturating_sub(LAST_WARNING.get()) >= 60_000_000 {
        LAST_WARNING.set(now);
        pgrx::warning!("keypal: {problem}; usage and webhook deliveries wait until one runs");
    }
}

thread_local! {
    /// What this transaction asked of the worker at its commit: None nothing; Some(None) a
    /// worker to run; Some(Some(pid)) also to wake it (pid 0 until known, before commit).
    static AT_COMMIT: std::cell::Cell<Option<Option<i32>>> = const { std::cell::Cell::new(None) };
}

/// The current transaction queued webhook deliveries: before it commits, make sure the
/// database has a worker (unthrottled); once it committed, set that worker's latch, so
/// that it claims them at once rather than at its next turn.
pub fn wake_at_commit() {
    at_commit(true);
}

/// The current transaction made work only a worker does (a key's schedule): make sure,
/// before it commits, that the database has one.
pub fn ensure_at_commit() {
    at_commit(false);
}

fn at_commit(wake: bool) {
    use pgrx::{register_xact_callback, PgXactCallbackEvent as Ev};
    match AT_COMMIT.get() {
        Some(Some(_)) => return,
        Some(None) => {
            if wake {
                AT_COMMIT.set(Some(Some(0)));
            }
            return;
        }
        None => {}
    }
    AT_COMMIT.set(Some(wake.then_some(0)));
    register_xact_callback(Ev::PreCommit, || {
        report(shmem::worker_wanted_now());
        // Everything that may fail (attaching the shared state) is done here, before the
        // commit: the commit callback below only reads a pid and sets a latch.
        if let Some(Some(_)) = AT_COMMIT.get() {
            AT_COMMIT.set(Some(Some(shmem::worker_pid().unwrap_or(0))));
        }
    });
    register_xact_callback(Ev::Commit, || {
        if let Some(Some(pid)) = AT_COMMIT.replace(None) {
            set_latch_of(pid);
        }
    });
    register_xact_callback(Ev::Abort, || AT_COMMIT.set(None));
    register_xact_callback(Ev::Prepare, || AT_COMMIT.set(None));
}

/// Sets the latch of the process `pid`, if it is one of the server's (0: none).
pub fn set_latch_of(pid: i32) {
    if pid == 0 {
        return;
    }
    // SAFETY: looks the process up in the proc array (under its lock) and sets its latch,
    // which is safe on any live PGPROC; a pid reused meanwhile only gets a spurious wakeup.
    // Neither can raise an error (this runs after the commit).
    unsafe {
        let proc_ = pg_sys::BackendPidGetProc(pid);
        if !proc_.is_null() {
            pg_sys::SetLatch(&mut (*proc_).procLatch);
        }
    }
}

/// Waits for the latch or `us` microseconds: (keep going, the latch was set).
fn wait(us: i64) -> (bool, bool) {
    let ms = (us.max(0) + 999) / 1000;
    // SAFETY: this process's own latch, as every worker waits on it.
    let rc = unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_POSTMASTER_DEATH) as i32,
            ms as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        )
    };
    crate::bgtx::after_wait(rc);
    (!crate::bgtx::stopping(), crate::bgtx::latched())
}

/// Asks the postmaster to start `db`'s worker; Err says why it could not.
pub fn start(db: u32) -> Result<(), String> {
    BackgroundWorkerBuilder::new(&format!("keypal flush worker {db}"))
        .set_type("keypal flush worker")
        .set_library("keypal")
        .set_function("keypal_flush_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        // Not restarted by the postmaster: the next verify that records something starts
        // one again (a database dropped meanwhile must not be retried forever).
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(db)))
        .load_dynamic()
        .map(|_| ())
        .map_err(|_| "could not start a flush worker (max_worker_processes reached?)".to_string())
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, arg: pg_sys::Datum) {
    shmem::release_worker(arg.value() as u32);
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn keypal_flush_worker_main(arg: pg_sys::Datum) {
    let db = arg.value() as u32;
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: the registry slot is freed however the worker ends.
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), arg) };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    BackgroundWorker::transaction(pin_session);
    if !BackgroundWorker::transaction(|| shmem::claim_worker(db)) {
        return; // another worker serves this database
    }
    let mut state = State::default();
    let mut automation = crate::automation::Automation::default();
    let mut last_flush = 0i64;
    loop {
        let flush_us = i64::from(crate::gucs::FLUSH_INTERVAL_MS.get().max(10)) * 1000;
        // SAFETY: reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        // A full batch means more is queued: the next one at once.
        let flush_in = if state.full_batch {
            0
        } else {
            (last_flush + flush_us - now).clamp(0, flush_us)
        };
        // SAFETY: reads a shared flag.
        let standby = unsafe { pg_sys::RecoveryInProgress() };
        let wait = if standby {
            flush_in
        } else {
            automation
                .wait_us(now)
                .map_or(flush_in, |w| w.min(flush_in))
        };
        // The latch is set by a commit that queued webhook deliveries, and by each answer
        // of a delivery thread. (Set while the worker shipped counts: no sleep.)
        let wait = if crate::bgtx::latched_unseen() {
            0
        } else {
            wait
        };
        let (go_on, woken) = self::wait(wait);
        if !go_on {
            last_flushes(db, &mut state);
            return;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads the configuration files, as a worker must on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // SAFETY: reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        // On a standby, the latch is set by a verify waiting for a key's global count.
        if state.full_batch || now - last_flush >= flush_us || (standby && woken) {
            last_flush = now;
            if flush_once(db, &mut state).is_none() {
                // keypal is not installed here (any more): what it counted here has nowhere to go.
                shmem::purge(db);
                shmem::retire_worker(db);
                return;
            }
        }
        // On a standby: no deliveries, no maintenance (nothing can be written).
        if !standby {
            automation.turn(woken, flush_us);
        }
        // SAFETY: reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        if state.remaining > 0 || state.full_batch || (!standby && automation.busy()) {
            state.empty_since = None;
            continue;
        }
        let since = *state.empty_since.get_or_insert(now);
        if now - since >= IDLE_EXIT_US {
            // Leave, unless a verify made an entry just as the slot was given up (it saw
            // this worker running and started none).
            shmem::retire_worker(db);
            if shmem::entries_of(db) == 0 || !shmem::claim_worker(db) {
                return;
            }
            state.empty_since = None;
        }
    }
}

/// What the worker remembers between flushes.
#[derive(Default)]
struct State {
    /// When it last swept every entry (µs; 0: never).
    swept_at: i64,
    /// Entries of its database at the last sweep.
    remaining: usize,
    /// The last flush took as many entries as a batch holds.
    full_batch: bool,
    empty_since: Option<i64>,
    /// On a standby: what it ships to the primary.
    shipper: crate::replica::Shipper,
    /// This database's name (known after the first flush).
    db_name: String,
}

/// Entries one flush transaction writes at most (more wait for the next, at once).
const MAX_BATCH: usize = 10_000;
/// How often the worker sweeps every entry for eviction (more often when memory is
/// nearly full).
const SWEEP_EVERY_US: i64 = 5_000_000;

/// Told to stop: flushes until the database's sessions have gone — at a clean shutdown they
/// are stopping too, and what they count until then is written — then once more. Stopped
/// alone (pg_terminate_backend, DROP DATABASE … WITH (FORCE)) the sessions stay: it leaves
/// once their number has not fallen for a moment.
fn last_flushes(db: u32, state: &mut State) {
    let deadline = std::time::Instant::now() + SHUTDOWN_WAIT;
    let mut fewest = i32::MAX;
    let mut stalled_since = std::time::Instant::now();
    let more = |state: &mut State| {
        flush_once(db, state).is_some() && state.full_batch && std::time::Instant::now() < deadline
    };
    loop {
        while more(state) {}
        // SAFETY: counts the sessions connected to this database (background workers not
        // included).
        let sessions = unsafe { pg_sys::CountDBConnections(pg_sys::Oid::from(db)) };
        let now = std::time::Instant::now();
        if sessions < fewest {
            fewest = sessions;
            stalled_since = now;
        }
        if sessions == 0 || now >= deadline || now - stalled_since >= STALL {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    while more(state) {}
}

/// How long the sessions' number may stay put before a stopping worker stops waiting.
const STALL: Duration = Duration::from_millis(300);

/// The settings the worker's session runs with, over anything the database's owner set
/// with `ALTER DATABASE … SET` (applied when the worker connected): a read-only default,
/// timeouts, another session user or role would stop flushing, `exit_on_error` would turn
/// any error into an exit, another time zone would shift the hours, planner settings would
/// slow every flush. The session user is
/// pinned first, to the bootstrap superuser the worker connected as.
const PINNED: [(&std::ffi::CStr, &std::ffi::CStr); 16] = [
    (c"search_path", c"pg_catalog, pg_temp"),
    // The flush is index probes, one per item: planner settings that would turn them into
    // scans (or JIT-compile a small statement) slow every flush down.
    (c"enable_indexscan", c"on"),
    (c"enable_bitmapscan", c"on"),
    (c"enable_nestloop", c"on"),
    (c"enable_seqscan", c"on"),
    (c"enable_hashjoin", c"on"),
    (c"plan_cache_mode", c"auto"),
    (c"jit", c"off"),
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

const INSTALLED: &str = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension
                                          WHERE extname OPERATOR(pg_catalog.=) 'keypal')";

const RESOLUTION: &str = "SELECT (pg_catalog.date_part('epoch', s.last_used_resolution)
                                  OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8
                            FROM keypal.settings s LIMIT 1";

const SPLIT: &str = "SELECT s.limit_split FROM keypal.settings s LIMIT 1";

/// Writes one batch (keypal.flush_usage, which catches its own errors: then nothing of it
/// is written and it all stays for the next flush). Rows back: what was written.
const FLUSH: &str = "SELECT f.kind::pg_catalog.text, f.key_id, f.at
                       FROM keypal.flush_usage($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                            pg_catalog.make_interval(secs => $13 OPERATOR(pg_catalog./) 1e6)) f";

/// One flush: takes a batch of this database's queued entries, writes it in one
/// transaction, confirms it in shared memory; sweeps every entry now and then. None when
/// keypal is not installed in the database.
fn flush_once(db: u32, state: &mut State) -> Option<()> {
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let standby = unsafe { pg_sys::RecoveryInProgress() };
    let sweep_due = now - state.swept_at >= SWEEP_EVERY_US || shmem::nearly_full();
    let held = state.shipper.held_batch();
    let name_wanted = state.db_name.is_empty();
    let result = BackgroundWorker::transaction(|| {
        if crate::bgtx::pin_search_path().is_err() {
            return Some(None);
        }
        if !crate::bgtx::read_one::<bool>(INSTALLED)
            .ok()
            .flatten()
            .unwrap_or(false)
        {
            return None;
        }
        // keypal's tables may be locked by a DROP EXTENSION not yet committed (or an ALTER):
        // then this flush waits for the next interval rather than for the lock.
        let Ok(resolution_us) = resolution() else {
            return Some(None);
        };
        // (Not known: no flush now. Shipping quota counts under limit_split would add them to
        // the primary's own.)
        let split = if standby {
            match crate::bgtx::read_one::<i32>(SPLIT) {
                Ok(n) => n.unwrap_or(1),
                Err(_) => return Some(None),
            }
        } else {
            1
        };
        // A standby keeps the quota counts only it holds: under limit_split, or with nowhere
        // to ship them.
        let sweep = Sweep {
            db,
            now,
            resolution_us,
            idle_us: idle_us(),
            keep_local_counts: standby && (split > 1 || !crate::replica::configured()),
        };
        let remaining = sweep_due.then(|| shmem::sweep(&sweep, db_exists));
        // SAFETY: a catalog lookup of this database, inside the transaction.
        let name = name_wanted.then(|| unsafe {
            let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
            if name.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(name)
                    .to_string_lossy()
                    .into_owned()
            }
        });
        // A standby ships a batch not answered before anything new; a promoted one writes it.
        let batch = match held {
            Some(b) => b,
            None => shmem::take(&sweep, MAX_BATCH),
        };
        // (Nothing to write: no batch, or a standby, which ships it below instead.)
        let written = if batch.is_empty() || standby {
            Some(Written::default())
        } else {
            write(&batch, sweep.resolution_us)
        };
        Some(Some((sweep, batch, remaining, written, split, name)))
    });
    let Some((sweep, batch, remaining, written, split, name)) = result? else {
        state.full_batch = false;
        return Some(());
    };
    if let Some(name) = name {
        state.db_name = name;
    }
    if !standby {
        state.shipper.forget_held();
    }
    if let Some(n) = remaining {
        state.remaining = n;
        state.swept_at = now;
    }
    // More waits at once only if this batch was written (not on a failing flush).
    state.full_batch = batch.len() >= MAX_BATCH && written.is_some();
    if batch.is_empty() {
        return Some(());
    }
    if standby {
        // Shipped outside any transaction: no snapshot is held while the primary answers.
        let deadline = crate::replica::ship_deadline();
        let shipped = state
            .shipper
            .ship(batch.clone(), &state.db_name, split <= 1, deadline);
        let answered = matches!(shipped, crate::replica::Shipped::Answered(_));
        shmem::set_ship_failing(db, !answered);
        if matches!(shipped, crate::replica::Shipped::Held) {
            // (The database may have been renamed: its name is read again.)
            state.db_name.clear();
            state.full_batch = false;
            return Some(());
        }
        let outcome = |t: &Taken| crate::replica::outcome(&shipped, t);
        shmem::confirm(&sweep, &batch, outcome, &HashSet::new(), MISSING_GRACE_US);
        return Some(());
    }
    // Nothing is known written unless the flush transaction committed (it did, if we are
    // here with its answer).
    let outcome = |t: &Taken| match &written {
        None => Outcome::all(false, t),
        Some(w) => Outcome {
            last_used: w.last_used.get(&t.key).copied(),
            quota: w.quota.contains(&t.key),
            warn: w.warn.contains(&t.key),
            hours_unwritten: t
                .hours
                .iter()
                .map(|h| h.start)
                .filter(|h| !w.hours.contains(&(t.key, *h)))
                .collect(),
            window: true,
            global: None,
        },
    };
    let missing = written
        .as_ref()
        .map(|w| w.missing.clone())
        .unwrap_or_default();
    shmem::confirm(&sweep, &batch, outcome, &missing, MISSING_GRACE_US);
    report_stats();
    Some(())
}

/// A worker never goes idle the way a backend does: it reports its table statistics itself,
/// or autovacuum would never learn of the rows it updates.
fn report_stats() {
    // SAFETY: outside any transaction, as PostgreSQL's own workers call it.
    unsafe { pg_sys::pgstat_report_stat(false) };
}

/// `last_used_resolution` (µs; 60 s when keypal.settings has no row yet), read in a
/// subtransaction: an error (a lock not granted within the pinned lock_timeout, the table
/// dropped meanwhile) gives Err(()), which skips this flush, and leaves the transaction
/// usable.
fn resolution() -> Result<i64, ()> {
    crate::bgtx::guarded("", || {
        crate::bgtx::read_one::<i64>(RESOLUTION)
            .ok()
            .flatten()
            .unwrap_or(60_000_000)
    })
    .ok_or(())
}

/// How long an entry stays after its last use: long enough that a key in steady use keeps
/// it, and at least a few flushes.
fn idle_us() -> i64 {
    (crate::gucs::FLUSH_INTERVAL_MS.get() as i64 * 3_000).max(10_000_000)
}

fn db_exists(db: u32) -> bool {
    // SAFETY: a syscache lookup inside the flush transaction.
    unsafe {
        pg_sys::SearchSysCacheExists(
            pg_sys::SysCacheIdentifier::DATABASEOID as i32,
            pg_sys::Datum::from(db),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    }
}

/// What a committed flush wrote, and the keys it found missing from the table.
#[derive(Default)]
struct Written {
    missing: HashSet<[u8; 16]>,
    /// Each key's last_used_at as the table holds it after the flush.
    last_used: std::collections::HashMap<[u8; 16], i64>,
    quota: HashSet<[u8; 16]>,
    warn: HashSet<[u8; 16]>,
    hours: HashSet<([u8; 16], i64)>,
}

/// Writes the batch; None when the flush failed (nothing of it written).
fn write(batch: &[Taken], resolution_us: i64) -> Option<Written> {
    use pgrx::datum::TimestampWithTimeZone as Ts;
    let uuid = |k: &[u8; 16]| pgrx::Uuid::from_bytes(*k);
    // SAFETY: timestamps are timestamptz microseconds.
    let ts = |t: i64| unsafe { Ts::from_datum(pg_sys::Datum::from(t), false) };
    let mut lu = (Vec::new(), Vec::new());
    let mut hours = (Vec::new(), Vec::new(), Vec::new());
    let mut quota = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut warn = (Vec::new(), Vec::new());
    for t in batch {
        if let Some(at) = t.last_used {
            lu.0.push(uuid(&t.key));
            lu.1.push(ts(at));
        }
        // The newest hour rides in the key's quota row (one row update per key); others
        // (an hour's turn, or hours without the quota's count) go to keypal.usage.
        let newest = t.quota.and(t.hours.iter().max_by_key(|h| h.start).copied());
        for h in t.hours.iter().filter(|h| Some(**h) != newest) {
            hours.0.push(uuid(&t.key));
            hours.1.push(ts(h.start));
            hours.2.push(h.n);
        }
        if let Some((p, n)) = t.quota {
            quota.0.push(uuid(&t.key));
            quota.1.push(ts(p));
            quota.2.push(n);
            quota.3.push(newest.and_then(|h| ts(h.start)));
            quota.4.push(newest.map_or(0, |h| h.n));
        }
        if let Some(used) = t.warn {
            warn.0.push(uuid(&t.key));
            warn.1.push(used);
        }
    }
    let args: [pgrx::datum::DatumWithOid; 13] = [
        lu.0.into(),
        lu.1.into(),
        hours.0.into(),
        hours.1.into(),
        hours.2.into(),
        quota.0.into(),
        quota.1.into(),
        quota.2.into(),
        quota.3.into(),
        quota.4.into(),
        warn.0.into(),
        warn.1.into(),
        resolution_us.into(),
    ];
    Spi::connect_mut(|client| {
        let rows = match client.update(FLUSH, None, &args) {
            Ok(rows) => rows,
            Err(e) => {
                pgrx::warning!("keypal flush worker: {e}; counts kept for the next flush");
                return None;
            }
        };
        let mut w = Written::default();
        for r in rows {
            let kind = r.get::<String>(1).ok().flatten().unwrap_or_default();
            let key = r.get::<pgrx::Uuid>(2).ok().flatten().map(|k| *k.as_bytes());
            let at = r
                .get::<pgrx::datum::TimestampWithTimeZone>(3)
                .ok()
                .flatten()
                .and_then(|t| t.into_datum())
                .map(|d| d.value() as i64);
            match (kind.as_str(), key) {
                ("m", Some(k)) => w.missing.insert(k),
                ("L", Some(k)) => {
                    w.last_used.insert(k, at.unwrap_or(NEVER));
                    true
                }
                ("Q", Some(k)) => w.quota.insert(k),
                ("W", Some(k)) => w.warn.insert(k),
                ("H", Some(k)) => w.hours.insert((k, at.unwrap_or(NEVER))),
                _ => return None, // the flush failed inside: nothing written
            };
        }
        Some(w)
    })
}
