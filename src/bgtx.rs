//! Transactions of keypal's background worker: what each begins with, and a guard that
//! turns an error inside into None (the worker must not die of one failed statement).

use pgrx::prelude::*;
use pgrx::{pg_sys, Spi};

/// First statement of every worker transaction: nothing it runs may resolve through a
/// search_path the database's owner chose, or wait long for a lock. Itself fully qualified.
pub const PIN_SEARCH_PATH: &str =
    "SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true),
            pg_catalog.set_config('lock_timeout', '1s', true)";

/// The first column of a query's first row, read without marking the transaction as one
/// that writes: pgrx's `Spi::run` and `Spi::get_one` first assign the transaction an id,
/// which a standby refuses ("cannot assign TransactionIds during recovery") — the worker
/// there died at its first flush, and nothing it counted was ever swept.
pub fn read_one<A: pgrx::FromDatum + pgrx::IntoDatum>(
    query: &str,
) -> Result<Option<A>, pgrx::spi::SpiError> {
    Spi::connect(|client| client.select(query, Some(1), &[])?.first().get_one())
}

/// PIN_SEARCH_PATH, read-only (so on a standby too).
pub fn pin_search_path() -> Result<(), pgrx::spi::SpiError> {
    read_one::<String>(PIN_SEARCH_PATH).map(|_| ())
}

/// Runs `f` in an internal subtransaction of the current transaction: an error inside (a
/// lock not granted within lock_timeout, a table dropped meanwhile, a failed statement) is
/// reported as a warning prefixed by `what`, rolled back, and gives None; the transaction
/// stays usable.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Option<T> {
    // SAFETY: the internal-subtransaction pattern PL/pgSQL's exception blocks use: memory
    // context and resource owner are restored whatever happens inside.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        let f = std::panic::AssertUnwindSafe(f);
        let done = PgTryBuilder::new(move || {
            let f = f;
            Some((f.0)())
        })
        .catch_others(|e| {
            if !what.is_empty() {
                let message = match &e {
                    pg_sys::panic::CaughtError::PostgresError(r)
                    | pg_sys::panic::CaughtError::ErrorReport(r) => r.message().to_string(),
                    pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                        ereport.message().to_string()
                    }
                };
                pgrx::warning!("{what}: {message}");
            }
            None
        })
        .execute();
        if done.is_some() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        done
    }
}

/// Whether the worker was told to stop (SIGTERM). Unlike pgrx's `sigterm_received`, reading
/// it does not clear it: every place that looks sees it.
pub fn stopping() -> bool {
    // SAFETY: a flag the SIGTERM handler sets; read volatile.
    unsafe { (&raw const pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

thread_local! {
    /// The latch was set since `latched` last looked (a wait that was not the main loop's —
    /// shipping counts — takes the wakeup, and the main loop must still see it).
    static LATCHED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the latch was set since the last call.
pub fn latched() -> bool {
    LATCHED.replace(false)
}

/// Whether the latch was set since `latched` last looked (without clearing it).
pub fn latched_unseen() -> bool {
    LATCHED.get()
}

/// What the worker does after each wait on its latch (`rc`: what the wait returned): exits
/// if the postmaster died (nothing to flush to: the server is gone), resets the latch, and
/// absorbs barriers (DROP DATABASE's, say) here, not only at the next statement.
pub fn after_wait(rc: i32) {
    if rc & pg_sys::WL_POSTMASTER_DEATH as i32 != 0 {
        // SAFETY: exits this process, as WL_EXIT_ON_PM_DEATH would.
        unsafe { pg_sys::proc_exit(1) };
    }
    // SAFETY: this process's own latch; the check PostgreSQL's own loops make between waits.
    unsafe {
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
            pg_sys::ResetLatch(pg_sys::MyLatch);
            LATCHED.set(true);
        }
        if (&raw const pg_sys::ProcSignalBarrierPending).read_volatile() != 0 {
            pg_sys::ProcessProcSignalBarrier();
        }
    }
}

/// One statement in its own guarded worker transaction (search_path pinned first).
pub fn run(what: &str, sql: &str) -> Option<()> {
    pgrx::bgworkers::BackgroundWorker::transaction(|| {
        guarded(what, || {
            pin_search_path()?;
            Spi::run(sql)
        })
        .and_then(|r: Result<(), pgrx::spi::SpiError>| r.ok())
    })
}
