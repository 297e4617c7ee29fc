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

use super::quota::{self, OnExceeded};
use super::window::{Decision, Limit, Window, BUCKETS};
use pgrx::pg_sys;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

const MAX_PROBES: usize = 32;
const NAME: &CStr = c"keypal rate limiter";

#[repr(C)]
struct Slot {
    key: [u8; 16],
    window_us: i64,
    window: Window,
    quota: QuotaCount,
}

/// A key's quota use in shared memory: `base` as read from keypal.quota_usage (or last
/// flushed), plus `pending` counted since and not yet flushed by the worker.
#[repr(C)]
#[derive(Clone, Copy)]
struct QuotaCount {
    loaded: bool,
    db: pg_sys::Oid,
    period_start: i64,
    base: i64,
    pending: i64,
}

/// The header; `nslots` slots follow it. The preloaded table uses a named LWLock tranche
/// (`lock`, the same address in every forked process); a dynamic segment, mapped at a
/// different address in each backend, carries its lock inside (`own_lock`).
#[repr(C)]
struct Table {
    lock: *mut pg_sys::LWLock,
    nslots: usize,
    embedded_lock: bool,
    tranche: i32,
    nonce: u64,
    own_lock: pg_sys::LWLock,
}

/// The lock guarding the table's slots, in this process's address space.
unsafe fn lock_of(table: *mut Table) -> *mut pg_sys::LWLock {
    unsafe {
        if (*table).embedded_lock {
            &raw mut (*table).own_lock
        } else {
            (*table).lock
        }
    }
}

fn size(nslots: usize) -> usize {
    std::mem::size_of::<Table>() + nslots * std::mem::size_of::<Slot>()
}

fn nslots() -> usize {
    crate::gucs::RATE_LIMIT_SLOTS.get().max(1) as usize
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());
static PRELOADED: AtomicBool = AtomicBool::new(false);
static DYNAMIC_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether keypal was preloaded (its table lives in the main shared memory, and the flush
/// worker runs).
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Whether the shared-memory limiter is available to this backend: the preloaded table, or
/// else a dynamic shared memory segment all backends of the server attach to.
pub fn available() -> bool {
    !table().is_null()
}

fn table() -> *mut Table {
    let t = TABLE.load(Ordering::Relaxed);
    if !t.is_null() || preloaded() || DYNAMIC_FAILED.load(Ordering::Relaxed) {
        return t;
    }
    // SAFETY: called from a transaction (verify, or a SQL function).
    let t = unsafe { dynamic::attach_or_create() };
    if t.is_null() {
        DYNAMIC_FAILED.store(true, Ordering::Relaxed);
    } else {
        TABLE.store(t, Ordering::Relaxed);
    }
    t
}

/// Without the preload: one dynamic shared memory segment per server, pinned for the
/// server's life. Its handle and a random nonce are kept in `keypal_limiter.dsm` in the data
/// directory; creators serialise on AddinShmemInitLock. A handle left from an earlier server
/// start either no longer attaches or carries another nonce, and a new segment is made.
mod dynamic {
    use super::{nslots, size, Table};
    use pgrx::pg_sys;

    const FILE: &str = "keypal_limiter.dsm";
    const TRANCHE_NAME: &std::ffi::CStr = c"keypal rate limiter";

    pub unsafe fn attach_or_create() -> *mut Table {
        unsafe {
            // AddinShmemInitLock serialises extensions setting up shared memory; held only
            // for the file read and the attach or create (an error releases it on abort).
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let t = attach().unwrap_or_else(|| create());
            pg_sys::LWLockRelease(init_lock);
            t
        }
    }

    unsafe fn attach() -> Option<*mut Table> {
        let text = std::fs::read_to_string(FILE).ok()?;
        let mut parts = text.split_whitespace();
        let handle: u32 = parts.next()?.parse().ok()?;
        let nonce: u64 = parts.next()?.parse().ok()?;
        unsafe {
            let seg = pg_sys::dsm_attach(handle);
            if seg.is_null() {
                return None;
            }
            let t = pg_sys::dsm_segment_address(seg).cast::<Table>();
            let len = pg_sys::dsm_segment_map_length(seg);
            let fits = len >= std::mem::size_of::<Table>() && len >= size((*t).nslots);
            if !fits || !(*t).embedded_lock || (*t).nonce != nonce {
                pg_sys::dsm_detach(seg);
                return None;
            }
            pg_sys::dsm_pin_mapping(seg);
            pg_sys::LWLockRegisterTranche((*t).tranche, TRANCHE_NAME.as_ptr());
            Some(t)
        }
    }

    unsafe fn create() -> *mut Table {
        unsafe {
            let n = nslots();
            let seg = pg_sys::dsm_create(size(n), pg_sys::DSM_CREATE_NULL_IF_MAXSEGMENTS as i32);
            if seg.is_null() {
                return std::ptr::null_mut();
            }
            let t = pg_sys::dsm_segment_address(seg).cast::<Table>();
            std::ptr::write_bytes(t.cast::<u8>(), 0, size(n));
            (*t).nslots = n;
            (*t).embedded_lock = true;
            (*t).nonce = rand::random::<u64>() | 1;
            (*t).tranche = pg_sys::LWLockNewTrancheId();
            pg_sys::LWLockRegisterTranche((*t).tranche, TRANCHE_NAME.as_ptr());
            pg_sys::LWLockInitialize(&raw mut (*t).own_lock, (*t).tranche);
            pg_sys::dsm_pin_segment(seg);
            pg_sys::dsm_pin_mapping(seg);
            let tmp = format!("{FILE}.tmp");
            let written = std::fs::write(
                &tmp,
                format!("{} {}\n", pg_sys::dsm_segment_handle(seg), (*t).nonce),
            )
            .and_then(|_| std::fs::rename(&tmp, FILE));
            if written.is_err() {
                // Others cannot find it: this backend uses it, they would make their own, and
                // counts would no longer be shared. Say so.
                pgrx::warning!("keypal: could not record the rate limiter's shared memory segment");
            }
            t
        }
    }
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
        PRELOADED.store(true, Ordering::Relaxed);
        pg_sys::LWLockRelease(init_lock);
    }
}

/// What verify asks of the limiter for one request.
pub struct Ask {
    pub rate: Option<Limit>,
    pub quota: Option<QuotaAsk>,
    pub cost: i64,
}

pub struct QuotaAsk {
    pub limit: i64,
    /// Start of the current quota period (timestamptz microseconds).
    pub period_start: i64,
    pub on_exceeded: OnExceeded,
}

#[derive(Default)]
pub struct Answer {
    pub rate: Option<Decision>,
    /// Quota use before this request, and what the quota says about it.
    pub quota_used: Option<i64>,
    pub quota: quota::Judgement,
}

/// Decides a request against the key's rate limit and quota, counting it only when it is
/// admitted by both. `load_used` reads the key's use in the current period from the table
/// when shared memory does not hold it yet. None when the key has no slot and none is
/// free: use the table-backed path.
pub fn admit(key: [u8; 16], ask: &Ask, mut load_used: impl FnMut() -> i64) -> Option<Answer> {
    let table = table();
    if table.is_null() {
        return None;
    }
    // SAFETY: the table lives in shared memory for the life of the server; every access
    // to its slots holds its LWLock exclusively, and nothing in between can raise an error
    // (load_used runs with the lock released).
    unsafe {
        let now = pg_sys::GetCurrentTimestamp();
        let db = pg_sys::MyDatabaseId;
        let lock = lock_of(table);
        let slots = std::slice::from_raw_parts_mut(table.add(1).cast::<Slot>(), (*table).nslots);
        // One lock hold decides, unless the key's quota use must first be read from the
        // table (with the lock released: that read may raise an error).
        let mut loaded = None;
        loop {
            pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let Some(slot) = slot_for(slots, key, now) else {
                pg_sys::LWLockRelease(lock);
                return None;
            };
            let must_load = loaded.is_none()
                && ask.quota.as_ref().is_some_and(|q| {
                    !(slot.quota.loaded
                        && slot.quota.db == db
                        && slot.quota.period_start == q.period_start)
                });
            if must_load {
                pg_sys::LWLockRelease(lock);
                loaded = Some(load_used());
                continue;
            }
            let answer = decide(slot, ask, loaded, db, now);
            pg_sys::LWLockRelease(lock);
            return Some(answer);
        }
    }
}

fn decide(slot: &mut Slot, ask: &Ask, loaded: Option<i64>, db: pg_sys::Oid, now: i64) -> Answer {
    let mut answer = Answer::default();
    let mut rate = ask.rate;
    if let Some(q) = &ask.quota {
        let same_period = slot.quota.db == db && slot.quota.period_start == q.period_start;
        if !(slot.quota.loaded && same_period) {
            // Reloaded from the table: keep counts not yet flushed, unless the period turned.
            // (No table value when the slot was marked for reload after this backend looked:
            // keep the base it had.)
            let (pending, kept_base) = if same_period {
                (slot.quota.pending, slot.quota.base)
            } else {
                (0, 0)
            };
            slot.quota = QuotaCount {
                loaded: true,
                db,
                period_start: q.period_start,
                base: loaded.unwrap_or(kept_base),
                pending,
            };
        }
        let used = slot.quota.base + slot.quota.pending;
        let judged = quota::judge(q.limit, q.on_exceeded, used, ask.cost);
        answer.quota_used = Some(used);
        answer.quota = judged;
        if judged.throttled {
            rate = Some(quota::throttled(rate));
        }
    }
    if let Some(limit) = rate {
        if slot.window_us != limit.window_us {
            slot.window = Window::default();
            slot.window_us = limit.window_us;
        }
        let d = slot
            .window
            .admit(now, limit, ask.cost, !answer.quota.blocked);
        answer.rate = Some(d);
        if !d.allowed {
            return answer;
        }
    }
    if ask.quota.is_some() && !answer.quota.blocked {
        slot.quota.pending += ask.cost;
    }
    answer
}

/// A count the worker is to write to the tables.
pub struct Pending {
    pub key: [u8; 16],
    pub period_start: i64,
    pub requests: i64,
}

/// The counts not yet written for keys of database `db`.
pub fn pending(db: pg_sys::Oid) -> Vec<Pending> {
    locked(pg_sys::LWLockMode::LW_SHARED, |slots| {
        slots
            .iter()
            .filter(|s| s.quota.db == db && s.quota.pending > 0)
            .map(|s| Pending {
                key: s.key,
                period_start: s.quota.period_start,
                requests: s.quota.pending,
            })
            .collect()
    })
    .unwrap_or_default()
}

/// After the worker committed `written`: move those counts from pending to base.
pub fn flushed(db: pg_sys::Oid, written: &[Pending]) {
    with_slots(|slots| {
        for w in written {
            if let Some(s) = find_slot(slots, w.key) {
                if s.quota.db == db && s.quota.period_start == w.period_start {
                    s.quota.pending -= w.requests;
                    s.quota.base += w.requests;
                }
            }
        }
    });
}

/// Makes the next verify of `key` re-read its quota use from the table (after
/// keypal_track_usage wrote to it); counts not yet flushed are kept.
pub fn reload_quota(key: [u8; 16]) {
    with_slots(|slots| {
        if let Some(s) = find_slot(slots, key) {
            s.quota.loaded = false;
        }
    });
}

/// Counted but not yet flushed requests of `key` in the period starting `period_start`.
pub fn pending_for(key: [u8; 16], period_start: i64) -> i64 {
    // SAFETY: reads a backend-global.
    let db = unsafe { pg_sys::MyDatabaseId };
    with_slots(|slots| {
        find_slot(slots, key)
            .filter(|s| s.quota.db == db && s.quota.period_start == period_start)
            .map_or(0, |s| s.quota.pending)
    })
    .unwrap_or(0)
}

fn with_slots<R>(f: impl FnOnce(&mut [Slot]) -> R) -> Option<R> {
    locked(pg_sys::LWLockMode::LW_EXCLUSIVE, f)
}

/// Runs `f` over the slots under the table's lock in `mode` (`f` must only read under a
/// shared lock).
fn locked<R>(mode: pg_sys::LWLockMode::Type, f: impl FnOnce(&mut [Slot]) -> R) -> Option<R> {
    let table = table();
    if table.is_null() {
        return None;
    }
    // SAFETY: as in admit; f does not raise errors.
    unsafe {
        let lock = lock_of(table);
        pg_sys::LWLockAcquire(lock, mode);
        let slots = std::slice::from_raw_parts_mut(table.add(1).cast::<Slot>(), (*table).nslots);
        let r = f(slots);
        pg_sys::LWLockRelease(lock);
        Some(r)
    }
}

/// Where the probe sequence of `key` starts.
fn probe_start(key: [u8; 16], n: usize) -> usize {
    u64::from_le_bytes(key[..8].try_into().expect("8 bytes")) as usize % n
}

/// The key's slot, if it has one (same probe sequence as slot_for, without claiming).
fn find_slot(slots: &mut [Slot], key: [u8; 16]) -> Option<&mut Slot> {
    let n = slots.len();
    let start = probe_start(key, n);
    let i = (0..MAX_PROBES.min(n))
        .map(|p| (start + p) % n)
        .take_while(|&i| slots[i].key != [0; 16] || slots[i].key == key)
        .find(|&i| slots[i].key == key)?;
    Some(&mut slots[i])
}

/// The key's slot, or a free/expired one claimed for it, among its first MAX_PROBES slots.
fn slot_for(slots: &mut [Slot], key: [u8; 16], now: i64) -> Option<&mut Slot> {
    let n = slots.len();
    let start = probe_start(key, n);
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
    slot.quota = QuotaCount {
        loaded: false,
        db: pg_sys::InvalidOid,
        period_start: 0,
        base: 0,
        pending: 0,
    };
    Some(slot)
}

/// Whether the slot may be given to another key: every bucket of its window has passed and
/// its quota count has been flushed.
fn expired(slot: &Slot, now: i64) -> bool {
    let w = (slot.window_us + BUCKETS as i64 - 1) / BUCKETS as i64;
    let window_over =
        w <= 0 || now.div_euclid(w).saturating_sub(slot.window.head) > BUCKETS as i64 + 1;
    window_over && slot.quota.pending == 0
}
