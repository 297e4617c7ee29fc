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
use std::collections::HashSet;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

const MAX_PROBES: usize = 32;
const NAME: &CStr = c"keypal rate limiter";

/// A slot belongs to one key of one database: two databases may hold the same key ids (a
/// restored copy does), and each counts its own.
#[repr(C)]
struct Slot {
    key: [u8; 16],
    db: pg_sys::Oid,
    window_us: i64,
    window: Window,
    quota: QuotaCount,
}

/// A key's quota use in shared memory: `base` as read from keypal.quota_usage (or since
/// confirmed flushed), plus `inflight` (taken by the worker for the flush under way) plus
/// `pending` (counted since). `seq` changes whenever the worker takes or confirms counts:
/// a table read is used as `base` only if no flush of this key began or ended while it ran,
/// and nothing was in flight (so the read saw exactly the counts in `base`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct QuotaCount {
    loaded: bool,
    db: pg_sys::Oid,
    period_start: i64,
    base: i64,
    pending: i64,
    inflight: i64,
    seq: u64,
}

impl QuotaCount {
    fn total(&self) -> i64 {
        self.base
            .saturating_add(self.inflight)
            .saturating_add(self.pending)
    }
}

/// Table reads a verify tries before deciding on the base it has.
const LOAD_TRIES: usize = 3;

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
            let init_lock = super::addin_shmem_init_lock();
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

/// PostgreSQL's AddinShmemInitLock (a C macro pgrx does not export): the individual
/// LWLock whose tranche is named "AddinShmemInit", found by name rather than by a slot
/// number that could move between PostgreSQL versions.
unsafe fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    // SAFETY: MainLWLockArray is set up before the postmaster's shared memory startup hook
    // and any backend run; its first NUM_INDIVIDUAL_LWLOCKS entries are the individual
    // locks, each in the tranche numbered as its slot, whose names GetLWLockIdentifier gives.
    unsafe {
        for i in 0..pg_sys::NUM_INDIVIDUAL_LWLOCKS {
            let name = pg_sys::GetLWLockIdentifier(pg_sys::PG_WAIT_LWLOCK, i as u16);
            if !name.is_null() && std::ffi::CStr::from_ptr(name) == c"AddinShmemInit" {
                return &raw mut (*pg_sys::MainLWLockArray.add(i as usize)).lock;
            }
        }
    }
    pgrx::error!("keypal: this PostgreSQL has no AddinShmemInit lock")
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
        let init_lock = addin_shmem_init_lock();
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
    // SAFETY: reads the clock and a backend global.
    let (now, db) = unsafe { (pg_sys::GetCurrentTimestamp(), pg_sys::MyDatabaseId) };
    // One lock hold decides, unless the key's quota use must first be read from the table
    // (with the lock released: that read may raise an error). Err(seq): read it, noting the
    // slot's sequence number before the read.
    let mut loaded: Option<(u64, i64)> = None;
    let mut tries = 0;
    loop {
        let step = with_slots(|slots| {
            let slot = slot_for(slots, db, key, now)?;
            let needs_load = ask.quota.as_ref().is_some_and(|q| {
                !(slot.quota.loaded
                    && slot.quota.db == db
                    && slot.quota.period_start == q.period_start)
            });
            let quiet = slot.quota.inflight == 0;
            let usable = loaded
                .filter(|(seq, _)| quiet && *seq == slot.quota.seq)
                .map(|(_, used)| used);
            if needs_load && usable.is_none() && quiet && tries < LOAD_TRIES {
                return Some(Err(slot.quota.seq));
            }
            Some(Ok(decide(slot, ask, usable, db, now)))
        })??;
        match step {
            Ok(answer) => return Some(answer),
            Err(seq) => {
                tries += 1;
                loaded = Some((seq, load_used()));
            }
        }
    }
}

fn decide(slot: &mut Slot, ask: &Ask, loaded: Option<i64>, db: pg_sys::Oid, now: i64) -> Answer {
    let mut answer = Answer::default();
    let mut rate = ask.rate;
    if let Some(q) = &ask.quota {
        let same_period = slot.quota.db == db && slot.quota.period_start == q.period_start;
        if !same_period {
            // A new period (or the slot's first quota): start from the table's count, or
            // from zero until one can be read.
            slot.quota = QuotaCount {
                loaded: loaded.is_some(),
                db,
                period_start: q.period_start,
                base: loaded.unwrap_or(0),
                seq: slot.quota.seq,
                ..QuotaCount::default()
            };
        } else if let Some(base) = loaded.filter(|_| !slot.quota.loaded) {
            // Re-read after a direct write to the table: counts not yet flushed stay.
            slot.quota.base = base;
            slot.quota.loaded = true;
        }
        let used = slot.quota.total();
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
        slot.quota.pending = slot.quota.pending.saturating_add(ask.cost);
    }
    answer
}

/// A count the worker is to write to the tables.
pub struct Pending {
    pub key: [u8; 16],
    pub period_start: i64,
    pub requests: i64,
}

/// Takes the counts not yet written for keys of database `db`: they are in flight until
/// `flushed` confirms or returns them.
pub fn pending(db: pg_sys::Oid) -> Vec<Pending> {
    with_slots(|slots| {
        slots
            .iter_mut()
            .filter(|s| s.quota.db == db && s.quota.pending > 0 && s.quota.inflight == 0)
            .map(|s| {
                s.quota.inflight = s.quota.pending;
                s.quota.pending = 0;
                s.quota.seq += 1;
                Pending {
                    key: s.key,
                    period_start: s.quota.period_start,
                    requests: s.quota.inflight,
                }
            })
            .collect()
    })
    .unwrap_or_default()
}

/// After the worker's flush transaction: the counts of `batch` whose keys are in `written`
/// are in the table now (base), the others go back to pending.
pub fn flushed(db: pg_sys::Oid, batch: &[Pending], written: &HashSet<[u8; 16]>) {
    with_slots(|slots| {
        for p in batch {
            if let Some(s) = find_slot(slots, db, p.key) {
                if s.quota.db == db && s.quota.period_start == p.period_start {
                    if written.contains(&p.key) {
                        s.quota.base = s.quota.base.saturating_add(s.quota.inflight);
                    } else {
                        s.quota.pending = s.quota.pending.saturating_add(s.quota.inflight);
                    }
                    s.quota.inflight = 0;
                    s.quota.seq += 1;
                }
            }
        }
    });
}

/// At the worker's start: counts a previous worker took but did not confirm (its
/// transaction failed) are pending again.
pub fn requeue_inflight(db: pg_sys::Oid) {
    with_slots(|slots| {
        for s in slots
            .iter_mut()
            .filter(|s| s.quota.db == db && s.quota.inflight > 0)
        {
            s.quota.pending = s.quota.pending.saturating_add(s.quota.inflight);
            s.quota.inflight = 0;
            s.quota.seq += 1;
        }
    });
}

thread_local! {
    /// Keys whose quota use this transaction wrote to the table: marked for reload once it
    /// commits (marked before, a verify elsewhere could reload the pre-commit use and keep it
    /// as its base for good).
    static RELOAD_AT_COMMIT: std::cell::RefCell<HashSet<[u8; 16]>> =
        std::cell::RefCell::new(HashSet::new());
}

/// Makes verify re-read `key`'s quota use from the table once this transaction commits
/// (after keypal_track_usage wrote to it).
pub fn reload_quota_at_commit(key: [u8; 16]) {
    // Attach the shared table now, inside the transaction, where an error is harmless: the
    // commit callback only marks an attached table.
    if table().is_null() {
        return;
    }
    RELOAD_AT_COMMIT.with(|k| k.borrow_mut().insert(key));
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            let keys = RELOAD_AT_COMMIT.with(|k| std::mem::take(&mut *k.borrow_mut()));
            if !keys.is_empty() && !TABLE.load(Ordering::Relaxed).is_null() {
                keys.into_iter().for_each(reload_quota);
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            RELOAD_AT_COMMIT.with(|k| k.borrow_mut().clear());
        }
        _ => {}
    }
}

/// From _PG_init, in every backend: the commit callback above.
pub fn init_backend() {
    // SAFETY: registers a backend-lifetime callback once.
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut()) }
}

/// Makes the next verify of `key` re-read its quota use from the table; counts not yet
/// flushed are kept.
fn reload_quota(key: [u8; 16]) {
    // SAFETY: reads a backend-global.
    let db = unsafe { pg_sys::MyDatabaseId };
    with_slots(|slots| {
        if let Some(s) = find_slot(slots, db, key) {
            s.quota.loaded = false;
        }
    });
}

/// The key's use in the period starting `period_start` as shared memory holds it: `(total,
/// unflushed)`: total when its base is loaded (exact at this moment), and the counts not yet
/// in the table (in flight or pending).
pub fn quota_count(key: [u8; 16], period_start: i64) -> (Option<i64>, i64) {
    // SAFETY: reads a backend-global.
    let db = unsafe { pg_sys::MyDatabaseId };
    // This transaction wrote the key's use to the table (not yet committed, so not yet in
    // any base): only the table, as this transaction sees it, has it.
    let own_write = RELOAD_AT_COMMIT.with(|k| k.borrow().contains(&key));
    with_slots(|slots| {
        find_slot(slots, db, key)
            .filter(|s| s.quota.db == db && s.quota.period_start == period_start)
            .map_or((None, 0), |s| {
                (
                    (s.quota.loaded && !own_write).then(|| s.quota.total()),
                    s.quota.inflight + s.quota.pending,
                )
            })
    })
    .unwrap_or((None, 0))
}

/// Runs `f` over the slots with the table's lock held exclusively; None without a table.
fn with_slots<R>(f: impl FnOnce(&mut [Slot]) -> R) -> Option<R> {
    let table = table();
    if table.is_null() {
        return None;
    }
    // SAFETY: the table lives in shared memory for the life of the server and its slots
    // follow its header; every access to them holds its LWLock, and `f` (arithmetic on
    // the slots) cannot raise an error while the lock is held.
    unsafe {
        let lock = lock_of(table);
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let slots = std::slice::from_raw_parts_mut(table.add(1).cast::<Slot>(), (*table).nslots);
        let r = f(slots);
        pg_sys::LWLockRelease(lock);
        Some(r)
    }
}

/// Where the probe sequence of `key` in database `db` starts.
fn probe_start(db: pg_sys::Oid, key: [u8; 16], n: usize) -> usize {
    let k = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
    (k ^ u64::from(db.to_u32()).wrapping_mul(0x9E37_79B9_7F4A_7C15)) as usize % n
}

/// The key's slot, if it has one (same probe sequence as slot_for, without claiming).
fn find_slot(slots: &mut [Slot], db: pg_sys::Oid, key: [u8; 16]) -> Option<&mut Slot> {
    find_index(slots, db, key).map(|i| &mut slots[i])
}

/// Where the key's slot is: slots are claimed along the probe sequence and never emptied,
/// so the search ends at the first empty slot.
fn find_index(slots: &[Slot], db: pg_sys::Oid, key: [u8; 16]) -> Option<usize> {
    let n = slots.len();
    let start = probe_start(db, key, n);
    (0..MAX_PROBES.min(n))
        .map(|p| (start + p) % n)
        .take_while(|&i| slots[i].key != [0; 16])
        .find(|&i| slots[i].key == key && slots[i].db == db)
}

/// The key's slot, or a free/expired one claimed for it, among its first MAX_PROBES slots.
/// (Keys are compared first, without touching the rest of the slots probed: each slot spans
/// several cache lines.)
fn slot_for(slots: &mut [Slot], db: pg_sys::Oid, key: [u8; 16], now: i64) -> Option<&mut Slot> {
    if let Some(i) = find_index(slots, db, key) {
        return Some(&mut slots[i]);
    }
    let n = slots.len();
    let start = probe_start(db, key, n);
    let free = (0..MAX_PROBES.min(n))
        .map(|p| (start + p) % n)
        .find(|&i| slots[i].key == [0; 16] || expired(&slots[i], now));
    let i = free?;
    let slot = &mut slots[i];
    slot.key = key;
    slot.db = db;
    slot.window_us = 0;
    slot.window = Window::default();
    slot.quota = QuotaCount::default();
    Some(slot)
}

/// Whether the slot may be given to another key: every bucket of its window has passed and
/// its quota count has been flushed.
fn expired(slot: &Slot, now: i64) -> bool {
    let w = (slot.window_us + BUCKETS as i64 - 1) / BUCKETS as i64;
    let window_over =
        w <= 0 || now.div_euclid(w).saturating_sub(slot.window.head) > BUCKETS as i64 + 1;
    window_over && slot.quota.pending == 0 && slot.quota.inflight == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The database of the keys in these tests (the id 0 leaves probe starts as the key's
    /// first bytes say).
    const DB: pg_sys::Oid = pg_sys::Oid::from_u32(0);

    fn table(n: usize) -> Vec<Slot> {
        (0..n)
            .map(|_| Slot {
                key: [0; 16],
                db: DB,
                window_us: 0,
                window: Window::default(),
                quota: QuotaCount::default(),
            })
            .collect()
    }

    /// A key whose probe sequence starts at `start` (in a table of n slots), told apart by `tag`.
    fn key(start: u64, tag: u8) -> [u8; 16] {
        let mut k = [tag; 16];
        k[..8].copy_from_slice(&start.to_le_bytes());
        k
    }

    fn busy(slot: &mut Slot, now: i64) {
        let limit = Limit {
            requests: 10,
            window_us: 60_000_000,
        };
        slot.window_us = limit.window_us;
        assert!(slot.window.admit(now, limit, 1, true).allowed);
    }

    #[test]
    fn the_same_key_in_two_databases_counts_apart() {
        let mut slots = table(100);
        let now = 1_000_000_000;
        let (other, k) = (pg_sys::Oid::from_u32(16_384), key(7, 1));
        busy(slot_for(&mut slots, DB, k, now).unwrap(), now);
        busy(slot_for(&mut slots, DB, k, now).unwrap(), now);
        let i = find_index(&slots, DB, k).unwrap();
        assert_eq!(
            find_index(&slots, other, k),
            None,
            "no slot in the other database yet"
        );
        busy(slot_for(&mut slots, other, k, now).unwrap(), now);
        let j = find_index(&slots, other, k).unwrap();
        assert_ne!(i, j);
        assert_eq!(slots[i].window.counts.iter().sum::<i64>(), 2);
        assert_eq!(slots[j].window.counts.iter().sum::<i64>(), 1);
    }

    #[test]
    fn keys_find_their_slots_along_the_probe_sequence() {
        let mut slots = table(100);
        let now = 1_000_000_000;
        let (a, b, c) = (key(7, 1), key(7, 2), key(8, 3));
        for k in [a, b, c] {
            busy(slot_for(&mut slots, DB, k, now).unwrap(), now);
        }
        assert_eq!(find_index(&slots, DB, a), Some(7));
        assert_eq!(find_index(&slots, DB, b), Some(8));
        assert_eq!(
            find_index(&slots, DB, c),
            Some(9),
            "c's start was taken by b"
        );
        assert_eq!(find_index(&slots, DB, key(7, 4)), None);
        // The same key gets the same slot, with its count.
        assert_eq!(slots[8].window.counts.iter().sum::<i64>(), 1);
        busy(slot_for(&mut slots, DB, b, now).unwrap(), now);
        assert_eq!(slots[8].window.counts.iter().sum::<i64>(), 2);
    }

    #[test]
    fn a_slot_whose_window_passed_is_reused_and_later_keys_stay_found() {
        let mut slots = table(100);
        let now = 1_000_000_000;
        let (a, b) = (key(7, 1), key(7, 2));
        busy(slot_for(&mut slots, DB, a, now).unwrap(), now);
        // 50 s on, a's one-minute window is still live: b goes to the next slot.
        busy(
            slot_for(&mut slots, DB, b, now + 50_000_000).unwrap(),
            now + 50_000_000,
        );
        assert_eq!(find_index(&slots, DB, b), Some(8));
        // 70 s on, a's window is over (b's is not): a new key takes slot 7 ...
        let later = now + 70_000_000;
        let c = key(7, 3);
        slot_for(&mut slots, DB, c, later).unwrap();
        assert_eq!(find_index(&slots, DB, c), Some(7));
        // ... b is still found behind it, and a is gone.
        assert_eq!(find_index(&slots, DB, b), Some(8));
        assert_eq!(find_index(&slots, DB, a), None);
    }

    #[test]
    fn pending_quota_counts_keep_a_slot_and_a_full_probe_range_says_none() {
        let mut slots = table(MAX_PROBES);
        let now = 1_000_000_000;
        for tag in 0..MAX_PROBES as u8 {
            slot_for(&mut slots, DB, key(0, tag + 1), now)
                .unwrap()
                .quota
                .pending = 1;
        }
        // Windows never used, but counts not yet flushed: nothing may be reused.
        assert!(slot_for(&mut slots, DB, key(0, 200), now + 1_000_000_000_000).is_none());
        slots[5].quota.pending = 0;
        assert!(slot_for(&mut slots, DB, key(0, 200), now).is_some());
        assert_eq!(find_index(&slots, DB, key(0, 200)), Some(5));
    }

    #[test]
    fn decide_counts_on_the_base_it_is_given_and_keeps_unflushed_counts() {
        let mut slots = table(1);
        let slot = &mut slots[0];
        let db = pg_sys::Oid::from(5u32);
        let now = 1_000_000_000;
        let ask = |period_start, cost| Ask {
            rate: None,
            quota: Some(QuotaAsk {
                limit: 1000,
                period_start,
                on_exceeded: OnExceeded::Block,
            }),
            cost,
        };
        // First use: the table said 100.
        let a = decide(slot, &ask(10, 1), Some(100), db, now);
        assert_eq!((a.quota_used, slot.quota.total()), (Some(100), 101));
        // The worker takes the pending count; a reload mark (a direct table write) follows.
        slot.quota.inflight = slot.quota.pending;
        slot.quota.pending = 0;
        slot.quota.loaded = false;
        // No usable table read (a flush was under way): the base stays, the count goes on.
        let a = decide(slot, &ask(10, 2), None, db, now);
        assert_eq!((a.quota_used, slot.quota.total()), (Some(101), 103));
        assert!(!slot.quota.loaded, "still to be re-read");
        // A usable read (the table now says 150, with the flush confirmed): in-flight and
        // pending counts stay on top of it.
        slot.quota.base += slot.quota.inflight;
        slot.quota.inflight = 0;
        let a = decide(slot, &ask(10, 1), Some(150), db, now);
        assert_eq!((a.quota_used, slot.quota.total()), (Some(152), 153));
        assert!(slot.quota.loaded);
        // A blocking quota refuses without counting.
        let a = decide(slot, &ask(10, 900), None, db, now);
        assert!(a.quota.blocked);
        assert_eq!(slot.quota.total(), 153);
        // A new period starts from the table's count for it, or from zero.
        decide(slot, &ask(20, 1), None, db, now);
        assert_eq!((slot.quota.total(), slot.quota.loaded), (1, false));
    }
}
