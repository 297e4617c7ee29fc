//! With `shared_preload_libraries = 'keypal'`: a launcher, started once the server accepts
//! writes (and again after a crash), that starts the worker of every database that can be
//! connected to, and again every few minutes (a worker gone, say after an error, comes
//! back). A database without keypal sends its worker home at once; one with keypal gets
//! its webhook deliveries and maintenance going after a restart or a crash without waiting
//! for a session to use keypal (without the preload, the first verify, key with a schedule,
//! webhook event or `keypal_run_maintenance()` there starts it).

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::Duration;

/// Registers the launcher (from _PG_init, in the postmaster, while preloading).
pub fn init() {
    // SAFETY: reads a postmaster global.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    BackgroundWorkerBuilder::new("keypal launcher")
        .set_type("keypal launcher")
        .set_library("keypal")
        .set_function("keypal_launcher_main")
        .enable_spi_access()
        // Primary only: a standby's workers start with its sessions' verifies.
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // Restarted after a crash (the postmaster resets every worker then); it never
        // leaves otherwise, but when told to stop.
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn keypal_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    loop {
        let databases = BackgroundWorker::transaction(databases);
        for db in databases {
            if crate::limits::shmem::worker_running_for(db) {
                continue;
            }
            // In a transaction: what starting a worker allocates goes with it.
            let started = BackgroundWorker::transaction(|| crate::worker::start(db));
            if let Err(e) = started {
                pgrx::warning!("keypal launcher: database {db}: {e}");
            }
            // One at a time: a worker with nothing to do there leaves within moments, and
            // max_worker_processes is shared with everything else.
            if !BackgroundWorker::wait_latch(Some(Duration::from_millis(200)))
                || crate::bgtx::stopping()
            {
                return;
            }
        }
        if !BackgroundWorker::wait_latch(Some(RESCAN)) || crate::bgtx::stopping() {
            return;
        }
    }
}

/// How often the launcher looks again for databases without a running worker.
const RESCAN: Duration = Duration::from_secs(300);

/// The databases that accept connections (not templates), read from pg_database (the
/// launcher is connected to no database: a catalog scan, as autovacuum's launcher does).
fn databases() -> Vec<u32> {
    let mut found = Vec::new();
    // SAFETY: inside a transaction; a heap scan of a shared catalog under AccessShareLock,
    // reading the fixed-size part of each tuple (FormData_pg_database).
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let header = (*tuple).t_data;
            let form = (header as *const u8).add((*header).t_hoff as usize)
                as *const pg_sys::FormData_pg_database;
            // Not a template, accepting connections, and not left invalid by an interrupted
            // DROP DATABASE (datconnlimit -2).
            if (*form).datallowconn && !(*form).datistemplate && (*form).datconnlimit != -2 {
                found.push((*form).oid.to_u32());
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
    }
    found
}
