//! The shared-memory rate limiter, used when keypal is in `shared_preload_libraries`.
//!
//! A fixed table of `keypal.rate_limit_slots` slots (default 16384, about 200 bytes each),
//! one per key with recent traffic, each holding the key's sliding window (window.rs),
//! guarded by one LWLock held only for the arithmetic.
//! Nothing is written to a table and nothing is rolled back with the caller's transaction;
//! it works in read-only transactions and on a standby (each server counts its own traffic).
//! A slot is reused once all its buckets have left its window. When every slot a key could
//! use (its first `MAX_PROBES` by hash) is busy with live traffic, that key falls back to
//! the table-backed limiter, so the answer stays correct past the cap.

use super::window::{Decision, Limit, Window, BUCKETS};
use pgrx::pg_sys;
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, Ordering};

const MAX_PROBES: usize = 32;
const NAME: &CStr = c"keypal rate limiter";

#[repr(C)]
struct Slot {
    key: [u8; 16],
    window_us: i64,
    window: Window,
}

/// The header; `nslots` slots follow it.
#[repr(C)]
struct Table {
    lock: *mut pg_sys::LWLock,
    nslots: usize,
}

fn size(nslots: usize) -> usize {
    std::mem::size_of::<Table>() + nslots * std::mem::size_of::<Slot>()
}

fn nslots() -> usize {
    crate::gucs::RATE_LIMIT_SLOTS.get().max(1) as usize
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

/// Whether the shared-memory limiter is available in this server.
pub fn available() -> bool {
    !TABLE.load(Ordering::Relaxed).is_null()
}

/// From _PG_init: asks for the shared memory and lock when being preloaded.
pub fn init() {
    // SAFETY: hooks are chained once, from _PG_init in the postmaster.
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_startup);
    }
}

static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(size(nslots()));
        pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock; // AddinShmemInitLock
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let n = nslots();
        let table = pg_sys::ShmemInitStruct(NAME.as_ptr(), size(n), &mut found).cast::<Table>();
        if !found {
            // All zeroes is an empty table: no key is all-zero (keys are random uuids).
            std::ptr::write_bytes(table.cast::<u8>(), 0, size(n));
            (*table).lock = &raw mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock;
            (*table).nslots = n;
        }
        TABLE.store(table, Ordering::Relaxed);
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Decides a request of `cost` for `key` now, counting it when `record` and admitted.
/// None when the key has no slot and none is free: use the table-backed limiter.
pub fn admit(key: [u8; 16], limit: Limit, cost: i64, record: bool) -> Option<Decision> {
    let table = TABLE.load(Ordering::Relaxed);
    if table.is_null() {
        return None;
    }
    // SAFETY: the table lives in shared memory for the life of the server; every access
    // to its slots holds its LWLock exclusively, and nothing in between can raise an error.
    unsafe {
        let now = pg_sys::GetCurrentTimestamp();
        let lock = (*table).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let slots = std::slice::from_raw_parts_mut(table.add(1).cast::<Slot>(), (*table).nslots);
        let decision = slot_for(slots, key, now).map(|slot| {
            if slot.window_us != limit.window_us {
                slot.window = Window::default();
                slot.window_us = limit.window_us;
            }
            slot.window.admit(now, limit, cost, record)
        });
        pg_sys::LWLockRelease(lock);
        decision
    }
}

/// The key's slot, or a free/expired one claimed for it, among its first MAX_PROBES slots.
fn slot_for(slots: &mut [Slot], key: [u8; 16], now: i64) -> Option<&mut Slot> {
    let n = slots.len();
    let start = u64::from_le_bytes(key[..8].try_into().expect("8 bytes")) as usize % n;
    let mut free = None;
    for probe in 0..MAX_PROBES.min(n) {
        let i = (start + probe) % n;
        let slot = &slots[i];
        if slot.key == key {
            return Some(&mut slots[i]);
        }
        let empty = slot.key == [0; 16];
        if free.is_none() && (empty || expired(slot, now)) {
            free = Some(i);
        }
        if empty {
            break;
        }
    }
    let i = free?;
    let slot = &mut slots[i];
    slot.key = key;
    slot.window_us = 0;
    slot.window = Window::default();
    Some(slot)
}

/// Whether every bucket of the slot's window has passed (its counts no longer matter).
fn expired(slot: &Slot, now: i64) -> bool {
    let w = (slot.window_us + BUCKETS as i64 - 1) / BUCKETS as i64;
    w <= 0 || now.div_euclid(w).saturating_sub(slot.window.head) > BUCKETS as i64 + 1
}
