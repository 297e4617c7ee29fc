//! The shared state verify records into: one dynamic shared hash table (dshash.rs) of
//! entries (entry.rs), keyed by (database, key), in a DSA area that grows with the keys in
//! use and is bounded by `keypal.shared_memory`. Every backend of the server attaches to it.
//!
//! Where it is found: a small fixed `Root` — in the main shared memory when keypal is in
//! `shared_preload_libraries`, else in a dynamic shared memory segment whose handle and a
//! random nonce are kept in `keypal_shared.dsm` in the data directory (a handle left from an
//! earlier server start no longer attaches or carries another nonce, and a new root is
//! made). The root holds the area's and table's handles, the entry count and the registry
//! of flush workers (one per database, worker.rs), started on demand by the first verify
//! that records something in a database without one.
//!
//! Verify takes one entry lock (a partition of the table) for its arithmetic; it never
//! writes a table, takes a row lock or writes WAL. The flush worker writes entries behind.

use super::dshash::{self, DshashTable, Parameters, SeqStatus};
use super::entry::{self, Answer, Ask, Entry, EntryKey, Outcome, Scope, Taken, NEVER};
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::ffi::{c_void, CStr};
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering,
};

/// Databases whose flush workers the root can track at once.
pub const MAX_WORKERS: usize = 64;

/// Bytes an entry takes in the area: the entry, dshash's item header, its share of the
/// bucket array, its place in the queue and the allocator's rounding (measured:
/// docs/DESIGN.md).
pub const BYTES_PER_ENTRY: usize = std::mem::size_of::<Entry>() + 96;

#[repr(C)]
struct WorkerSlot {
    db: AtomicU32,
    pid: AtomicI32,
    /// When a backend last asked the postmaster to start this database's worker (µs).
    requested_at: AtomicI64,
    /// When the worker last finished a flush (µs).
    flushed_at: AtomicI64,
    /// On a standby: the worker could not ship its last batch to the primary (or has nowhere
    /// to): verify does not wait for news it would not bring.
    ship_failing: AtomicBool,
}

#[repr(C)]
struct Root {
    nonce: u64,
    /// This build's layout of the root (ROOT_LAYOUT): a root made by another build is not
    /// used (its fields may lie elsewhere).
    layout: u64,
    lock: pg_sys::LWLock,
    lock_tranche: i32,
    area_tranche: i32,
    table_tranche: i32,
    ready: bool,
    area: pg_sys::dsa_handle,
    table: pg_sys::dsa_pointer,
    /// The flush worker's queue: a second table of the keys whose entries have changes to
    /// write, so a flush visits those, not every entry.
    queue: pg_sys::dsa_pointer,
    /// Request signatures seen (keypal_verify_signature's replay check), until they expire.
    seen: pg_sys::dsa_pointer,
    seen_count: AtomicI64,
    /// When the replay memory began (µs): a signature dated before it (plus the skew
    /// allowed) may have been accepted by a server run before this one, and is refused. Set
    /// when the tables are made, and again when a standby that made them is promoted (its
    /// memory never saw what the old primary accepted).
    made_at: AtomicI64,
    made_in_recovery: AtomicBool,
    /// When the replay memory was last swept inline (µs).
    seen_swept_at: AtomicI64,
    entries: AtomicI64,
    queued: AtomicI64,
    seq: AtomicU64,
    /// Uses not recorded because the memory was full (keys without limits still verify).
    dropped: AtomicU64,
    /// Verifies since server start: [valid, then each error in SPEC §4 order].
    verifies: [AtomicU64; 13],
    workers: [WorkerSlot; MAX_WORKERS],
    /// Broadcast by a standby's worker when a batch brought keys' global counts (verify
    /// waits on it for news: `admit`).
    news: pg_sys::ConditionVariable,
}

/// Changes whenever the shared layout changes: the sizes of the root and of the tables'
/// items, and a version bumped with any other change.
const ROOT_LAYOUT: u64 = ((std::mem::size_of::<Root>() as u64) << 40)
    ^ ((std::mem::size_of::<Entry>() as u64) << 24)
    ^ ((std::mem::size_of::<Seen>() as u64) << 12)
    ^ ((std::mem::size_of::<EntryKey>() as u64) << 4)
    ^ 3;

const LOCK_NAME: &CStr = c"keypal shared state";
const AREA_NAME: &CStr = c"keypal shared area";
const TABLE_NAME: &CStr = c"keypal shared table";
const ROOT_NAME: &CStr = c"keypal root";

/// This backend's view of the shared state.
struct Local {
    root: *mut Root,
    table: *mut DshashTable,
    queue: *mut DshashTable,
    seen: *mut DshashTable,
}

static ROOT: AtomicPtr<Root> = AtomicPtr::new(std::ptr::null_mut());
static TABLE: AtomicPtr<DshashTable> = AtomicPtr::new(std::ptr::null_mut());
static QUEUE: AtomicPtr<DshashTable> = AtomicPtr::new(std::ptr::null_mut());
static SEEN: AtomicPtr<DshashTable> = AtomicPtr::new(std::ptr::null_mut());

fn local() -> Local {
    let (root, table, queue, seen) = (
        ROOT.load(Ordering::Relaxed),
        TABLE.load(Ordering::Relaxed),
        QUEUE.load(Ordering::Relaxed),
        SEEN.load(Ordering::Relaxed),
    );
    if !root.is_null() && !table.is_null() && !queue.is_null() && !seen.is_null() {
        return Local {
            root,
            table,
            queue,
            seen,
        };
    }
    // SAFETY: called inside a transaction or from the flush worker; errors (no memory for a
    // segment) leave nothing half set: the pointers are stored once everything is attached.
    unsafe {
        let root = if root.is_null() {
            dynamic::attach_or_create()
        } else {
            root
        };
        ROOT.store(root, Ordering::Relaxed);
        let (table, queue, seen) = attach_tables(root);
        TABLE.store(table, Ordering::Relaxed);
        QUEUE.store(queue, Ordering::Relaxed);
        SEEN.store(seen, Ordering::Relaxed);
        Local {
            root,
            table,
            queue,
            seen,
        }
    }
}

/// The lock guarding the root, in this process's address space.
unsafe fn root_lock(root: *mut Root) -> *mut pg_sys::LWLock {
    unsafe { &raw mut (*root).lock }
}

unsafe fn register_tranches(root: *mut Root) {
    unsafe {
        pg_sys::LWLockRegisterTranche((*root).lock_tranche, LOCK_NAME.as_ptr());
        pg_sys::LWLockRegisterTranche((*root).area_tranche, AREA_NAME.as_ptr());
        pg_sys::LWLockRegisterTranche((*root).table_tranche, TABLE_NAME.as_ptr());
    }
}

/// A fresh root: zeroed, its lock and tranches set up.
unsafe fn init_root(root: *mut Root) {
    unsafe {
        std::ptr::write_bytes(root.cast::<u8>(), 0, std::mem::size_of::<Root>());
        (*root).nonce = rand::random::<u64>() | 1;
        (*root).layout = ROOT_LAYOUT;
        (*root).lock_tranche = pg_sys::LWLockNewTrancheId();
        (*root).area_tranche = pg_sys::LWLockNewTrancheId();
        (*root).table_tranche = pg_sys::LWLockNewTrancheId();
        pg_sys::LWLockInitialize(root_lock(root), (*root).lock_tranche);
        (*root).seq.store(1, Ordering::Relaxed);
        pg_sys::ConditionVariableInit(&raw mut (*root).news);
    }
}

fn params(root: *mut Root, entry_size: usize) -> Parameters {
    Parameters {
        key_size: std::mem::size_of::<EntryKey>(),
        entry_size,
        compare_function: compare_keys,
        hash_function: hash_key,
        // SAFETY: the root is set up before any table is made or attached.
        tranche_id: unsafe { (*root).table_tranche },
    }
}

unsafe extern "C-unwind" fn compare_keys(
    a: *const c_void,
    b: *const c_void,
    _: usize,
    _: *mut c_void,
) -> i32 {
    // SAFETY: dshash passes two entry keys.
    let (a, b) = unsafe { (&*a.cast::<EntryKey>(), &*b.cast::<EntryKey>()) };
    i32::from(a != b)
}

unsafe extern "C-unwind" fn hash_key(v: *const c_void, _: usize, _: *mut c_void) -> u32 {
    // SAFETY: dshash passes an entry key.
    let k = unsafe { &*v.cast::<EntryKey>() };
    key_hash(k)
}

/// Key ids are usually random, but imported ones need not be: mix every byte.
fn key_hash(k: &EntryKey) -> u32 {
    let lo = u64::from_le_bytes(k.key[..8].try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(k.key[8..].try_into().expect("8 bytes"));
    let mut h = lo ^ hi.rotate_left(29) ^ u64::from(k.db).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    h as u32
}

/// Attaches this backend to the root's area, table and queue, making them on first use.
unsafe fn attach_tables(root: *mut Root) -> (*mut DshashTable, *mut DshashTable, *mut DshashTable) {
    unsafe {
        register_tranches(root);
        // The area and table descriptors live as long as the backend.
        let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        pg_sys::LWLockAcquire(root_lock(root), pg_sys::LWLockMode::LW_EXCLUSIVE);
        let entries = params(root, std::mem::size_of::<Entry>());
        let keys = params(root, std::mem::size_of::<EntryKey>());
        let seen = params(root, std::mem::size_of::<Seen>());
        let tables = if (*root).ready {
            let area = pg_sys::dsa_attach((*root).area);
            pg_sys::dsa_pin_mapping(area);
            (
                dshash::dshash_attach(area, &entries, (*root).table, std::ptr::null_mut()),
                dshash::dshash_attach(area, &keys, (*root).queue, std::ptr::null_mut()),
                dshash::dshash_attach(area, &seen, (*root).seen, std::ptr::null_mut()),
            )
        } else {
            let area = pg_sys::dsa_create((*root).area_tranche);
            pg_sys::dsa_pin(area);
            pg_sys::dsa_pin_mapping(area);
            let table = dshash::dshash_create(area, &entries, std::ptr::null_mut());
            let queue = dshash::dshash_create(area, &keys, std::ptr::null_mut());
            let seen_table = dshash::dshash_create(area, &seen, std::ptr::null_mut());
            (*root).area = pg_sys::dsa_get_handle(area);
            (*root).table = dshash::dshash_get_hash_table_handle(table);
            (*root).queue = dshash::dshash_get_hash_table_handle(queue);
            (*root).seen = dshash::dshash_get_hash_table_handle(seen_table);
            (*root)
                .made_at
                .store(pg_sys::GetCurrentTimestamp(), Ordering::Relaxed);
            (*root)
                .made_in_recovery
                .store(pg_sys::RecoveryInProgress(), Ordering::Relaxed);
            (*root).ready = true;
            (table, queue, seen_table)
        };
        pg_sys::LWLockRelease(root_lock(root));
        pg_sys::MemoryContextSwitchTo(old);
        tables
    }
}

/// Without the preload: the root in a dynamic shared memory segment pinned for the
/// server's life, found through a file in the data directory; creators serialise on
/// AddinShmemInitLock.
mod dynamic {
    use super::{init_root, Root, ROOT_LAYOUT};
    use pgrx::pg_sys;

    const FILE: &str = "keypal_shared.dsm";

    pub unsafe fn attach_or_create() -> *mut Root {
        unsafe {
            let init_lock = super::addin_shmem_init_lock();
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let t = attach().unwrap_or_else(|| create());
            pg_sys::LWLockRelease(init_lock);
            t
        }
    }

    unsafe fn attach() -> Option<*mut Root> {
        // Only a missing file means "no root yet": any other failure to read it (out of file
        // descriptors …) must not make a second root that part of the server would count in.
        let text = match std::fs::read_to_string(FILE) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => pgrx::error!("keypal: could not read {FILE}: {e}"),
        };
        let mut parts = text.split_whitespace();
        let handle: u32 = parts.next()?.parse().ok()?;
        let nonce: u64 = parts.next()?.parse().ok()?;
        unsafe {
            let seg = pg_sys::dsm_attach(handle);
            if seg.is_null() {
                return None;
            }
            let root = pg_sys::dsm_segment_address(seg).cast::<Root>();
            let len = pg_sys::dsm_segment_map_length(seg);
            if len < 2 * std::mem::size_of::<u64>() || (*root).nonce != nonce {
                pg_sys::dsm_detach(seg);
                return None;
            }
            // The server's live root, made by another keypal build (the library was replaced
            // while the server ran): its fields may lie elsewhere. Using it would corrupt it;
            // making a second would split every count. Refuse, loudly, until a restart.
            if len < std::mem::size_of::<Root>() || (*root).layout != ROOT_LAYOUT {
                pg_sys::dsm_detach(seg);
                pgrx::error!(
                    "keypal: this server's shared state was made by another build of keypal; \
                     restart PostgreSQL to use the one now installed"
                );
            }
            pg_sys::dsm_pin_mapping(seg);
            Some(root)
        }
    }

    unsafe fn create() -> *mut Root {
        unsafe {
            let seg = pg_sys::dsm_create(std::mem::size_of::<Root>(), 0);
            let root = pg_sys::dsm_segment_address(seg).cast::<Root>();
            init_root(root);
            pg_sys::dsm_pin_segment(seg);
            pg_sys::dsm_pin_mapping(seg);
            let tmp = format!("{FILE}.tmp");
            let written = std::fs::write(
                &tmp,
                format!("{} {}\n", pg_sys::dsm_segment_handle(seg), (*root).nonce),
            )
            .and_then(|_| std::fs::rename(&tmp, FILE));
            if let Err(e) = written {
                // Others could not find it, would make their own, and counts would no
                // longer be shared: refuse rather than count apart.
                pgrx::error!("keypal: could not record its shared memory segment in {FILE}: {e}");
            }
            root
        }
    }
}

/// PostgreSQL's AddinShmemInitLock (a C macro pgrx does not export): the individual
/// LWLock whose tranche is named "AddinShmemInit", found by name rather than by a slot
/// number that could move between PostgreSQL versions.
unsafe fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    // SAFETY: MainLWLockArray is set up before any backend runs; its first
    // NUM_INDIVIDUAL_LWLOCKS entries are the individual locks, each in the tranche numbered
    // as its slot, whose names GetLWLockIdentifier gives.
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

/// From _PG_init: when being preloaded, the root goes in the main shared memory.
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
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Root>());
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
        let root =
            pg_sys::ShmemInitStruct(ROOT_NAME.as_ptr(), std::mem::size_of::<Root>(), &mut found)
                .cast::<Root>();
        if !found {
            init_root(root);
        }
        ROOT.store(root, Ordering::Relaxed);
        pg_sys::LWLockRelease(init_lock);
    }
}

/// The most entries `keypal.shared_memory` allows.
pub fn max_entries() -> i64 {
    crate::gucs::SHARED_MEMORY_MB.get().max(1) as i64 * 1024 * 1024 / BYTES_PER_ENTRY as i64
}

/// An entry, locked (exclusively unless found for reading) until dropped.
struct Locked {
    table: *mut DshashTable,
    entry: *mut Entry,
}

impl Locked {
    fn get(&mut self) -> &mut Entry {
        // SAFETY: the entry lives in the area and its partition lock is held.
        unsafe { &mut *self.entry }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: the lock was taken by dshash_find / dshash_find_or_insert on this table.
        unsafe { dshash::dshash_release_lock(self.table, self.entry.cast()) };
    }
}

/// The entry of `k`, if there is one.
fn find(l: &Local, k: &EntryKey, exclusive: bool) -> Option<Locked> {
    // SAFETY: the table is attached; the key is 20 plain bytes.
    let e = unsafe { dshash::dshash_find(l.table, (k as *const EntryKey).cast(), exclusive) };
    // (Built only when found: dropping a Locked releases its lock.)
    (!e.is_null()).then(|| Locked {
        table: l.table,
        entry: e.cast(),
    })
}

/// The entry of `k`, made if there is none and the memory allows (None: it is full).
fn find_or_make(l: &Local, k: &EntryKey) -> Option<Locked> {
    if let Some(e) = find(l, k, true) {
        return Some(e);
    }
    // SAFETY: the root is attached; its counters are atomics.
    let root = unsafe { &*l.root };
    if root.entries.load(Ordering::Relaxed) >= max_entries() {
        return None;
    }
    let mut found = false;
    // SAFETY: as in find; a new entry's bytes are written before the lock is released.
    unsafe {
        let e = dshash::dshash_find_or_insert(l.table, (k as *const EntryKey).cast(), &mut found)
            .cast::<Entry>();
        if !found {
            e.write(Entry::new(*k, next_seq(root)));
            root.entries.fetch_add(1, Ordering::Relaxed);
        }
        Some(Locked {
            table: l.table,
            entry: e,
        })
    }
}

fn next_seq(root: &Root) -> u64 {
    root.seq.fetch_add(1, Ordering::Relaxed)
}

fn my_db() -> u32 {
    // SAFETY: reads a backend global.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// Memory for shared entries is used up (`keypal.shared_memory`).
pub struct Full;

impl Full {
    /// Raises out_of_memory (53200), saying what could not be done (`cannot`).
    pub fn raise(self, cannot: &str) -> ! {
        crate::errors::raise(
            pgrx::PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
            format!(
                "keypal: shared memory for usage is full ({} entries, keypal.shared_memory = {} MB): {cannot}",
                max_entries(),
                crate::gucs::SHARED_MEMORY_MB.get()
            ),
        )
    }
}

/// The registry slot of `db`'s flush worker (a database has one at most), if it has one.
fn slot_of(root: &Root, db: u32) -> Option<&WorkerSlot> {
    root.workers
        .iter()
        .find(|s| s.db.load(Ordering::Relaxed) == db)
}

/// Decides a fully valid verify against the key's limits and records it: its last use
/// always, its window, quota and hour when it has them. `load_used` reads the key's quota use
/// from the table when shared memory does not hold it yet. Err(Full) when the key has no
/// entry and no memory is left for one.
pub fn admit(
    key: [u8; 16],
    ask: &Ask,
    scope: Scope,
    resolution_us: i64,
    load_used: impl FnMut() -> i64,
) -> Result<Answer, Full> {
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if scope.replica && scope.global {
        await_news(key, ask, scope, resolution_us, now);
    }
    let period = ask.quota.as_ref().map(|q| q.period_start);
    with_base(key, period, resolution_us, load_used, |e, usable| {
        entry::decide(e, ask, usable, now, scope)
    })
}

/// How long a verify on a standby waits for a key's global count (a round trip to the
/// primary: about a millisecond) before deciding on what it has.
const NEWS_WAIT_MS: i64 = 100;

thread_local! {
    /// When this backend last waited NEWS_WAIT_MS for news in vain (a statement verifying
    /// many keys does not wait that long for each).
    static NEWS_GAVE_UP: Cell<i64> = const { Cell::new(i64::MIN / 2) };
}

/// On a standby, before deciding a key whose global count it has not heard within
/// `scope.stale_us`: asks its worker to fetch it (at once) and waits for it, NEWS_WAIT_MS at
/// most — not at all while the worker cannot reach the primary.
fn await_news(key: [u8; 16], ask: &Ask, scope: Scope, resolution_us: i64, now: i64) {
    let l = local();
    let k = EntryKey { db: my_db(), key };
    let Some(mut locked) = find_or_make(&l, &k) else {
        return;
    };
    let e = locked.get();
    if !entry::wants_news(e, ask, scope, now) {
        return;
    }
    entry::ask_news(e, ask);
    queue_if_dirty(&l, e, resolution_us);
    drop(locked);
    // SAFETY: the root is attached.
    let root = unsafe { &*l.root };
    // SAFETY: reads the clock.
    if NEWS_GAVE_UP.get() > unsafe { pg_sys::GetCurrentTimestamp() } - 1_000_000 {
        return; // a wait timed out within the last second: do not pile waits up
    }
    let slot = slot_of(root, k.db).filter(|s| s.pid.load(Ordering::Relaxed) != 0);
    let failing = || slot.is_some_and(|s| s.ship_failing.load(Ordering::Relaxed));
    match slot {
        // No worker yet: one is started, and its first flush (at once) brings the news.
        None => crate::worker::ensure(),
        Some(_) if failing() => return,
        Some(s) => crate::worker::set_latch_of(s.pid.load(Ordering::Relaxed)),
    }
    let cv = (&raw const root.news).cast_mut();
    // SAFETY: the condition variable lives in the attached root; a sleep is cancelled before
    // returning, and an error inside (a cancel) is cleaned up by the transaction's abort.
    unsafe {
        pg_sys::ConditionVariablePrepareToSleep(cv);
        loop {
            let heard = find(&l, &k, false).is_none_or(|mut e| e.get().heard_at >= now);
            let left = NEWS_WAIT_MS - (pg_sys::GetCurrentTimestamp() - now) / 1000;
            if heard || failing() {
                break;
            }
            if left <= 0 || pg_sys::ConditionVariableTimedSleep(cv, left, pg_sys::PG_WAIT_EXTENSION)
            {
                NEWS_GAVE_UP.set(pg_sys::GetCurrentTimestamp());
                break;
            }
        }
        pg_sys::ConditionVariableCancelSleep();
    }
}

/// The standby's worker could (not) ship its last batch. Verifies waiting for news stop
/// waiting when it could not.
pub fn set_ship_failing(db: u32, failing: bool) {
    let l = local();
    // SAFETY: the root is attached; atomics.
    let root = unsafe { &*l.root };
    if let Some(w) = slot_of(root, db) {
        w.ship_failing.store(failing, Ordering::Relaxed);
    }
    if failing {
        // SAFETY: the condition variable lives in the attached root.
        unsafe { pg_sys::ConditionVariableBroadcast((&raw const root.news).cast_mut()) };
    }
}

/// On the primary, first of two steps taking what a standby shipped for one key (`t`): makes
/// the key's entry and reads its quota use from the table if need be — this may raise an
/// error, and adds nothing — and answers with the key's global count as it will be once `t`
/// is added (`fresh`; else as it is). `load_used(period)` reads the key's quota use in a
/// period from the table.
pub fn absorb_prepare(
    t: &Taken,
    fresh: bool,
    resolution_us: i64,
    mut load_used: impl FnMut(i64) -> i64,
) -> Result<entry::Global, Full> {
    let period = t.quota.map(|(p, _)| p);
    with_base(
        t.key,
        period,
        resolution_us,
        || period.map_or(0, &mut load_used),
        |e, usable| {
            entry::absorb(e, t, usable, false);
            // Queued now, so that adding it at commit allocates nothing.
            if fresh {
                enqueue(&local(), e);
            }
            entry::absorb(&mut e.clone(), t, None, fresh)
        },
    )
}

/// The second step, as the transaction that prepared every key of the batch commits: adds
/// each to its entry, for the worker to write. Nothing here reads a table or allocates
/// (nothing can fail halfway): an entry the worker took from the queue meanwhile is queued
/// again by its sweep, and one swept away since it was prepared (not used, nothing to
/// write, within a few milliseconds) loses that key's counts.
pub fn absorb_commit(batch: &[Taken]) {
    let l = local();
    for t in batch {
        let k = EntryKey {
            db: my_db(),
            key: t.key,
        };
        if let Some(mut locked) = find(&l, &k, true) {
            entry::absorb(locked.get(), t, None, true);
        }
    }
}

/// Runs `f` on the key's entry (made if need be), locked, with the key's quota use in the
/// period starting `period` as read from the table when the entry does not hold it yet and
/// the read may serve as base. The read is made with the lock released (it may raise an
/// error). What `f` leaves to write is queued.
fn with_base<R>(
    key: [u8; 16],
    period: Option<i64>,
    resolution_us: i64,
    mut load_used: impl FnMut() -> i64,
    f: impl FnOnce(&mut Entry, Option<i64>) -> R,
) -> Result<R, Full> {
    let l = local();
    let k = EntryKey { db: my_db(), key };
    let mut loaded: Option<(u64, i64)> = None;
    let mut tries = 0;
    loop {
        let mut locked = find_or_make(&l, &k).ok_or(Full)?;
        let e = locked.get();
        let quiet = e.quota.inflight == 0;
        let usable = loaded
            .filter(|(seq, _)| quiet && *seq == e.quota.seq)
            .map(|(_, used)| used);
        if entry::needs_base(e, period) && usable.is_none() && quiet && tries < LOAD_TRIES {
            let seq = e.quota.seq;
            drop(locked);
            tries += 1;
            loaded = Some((seq, load_used()));
            continue;
        }
        let r = f(e, usable);
        queue_if_dirty(&l, e, resolution_us);
        return Ok(r);
    }
}

/// Puts a locked entry with changes to write in the flush worker's queue, once.
fn queue_if_dirty(l: &Local, e: &mut Entry, resolution_us: i64) {
    if e.queued || !entry::dirty(e, resolution_us) {
        return;
    }
    enqueue(l, e);
}

/// Puts a locked entry in the flush worker's queue (if it is not there).
fn enqueue(l: &Local, e: &mut Entry) {
    if e.queued {
        return;
    }
    let mut found = false;
    // SAFETY: the queue is attached; its entries are bare keys, written before release. (The
    // entry's partition lock is held: every path takes an entry's lock before the queue's.)
    unsafe {
        let q = dshash::dshash_find_or_insert(l.queue, (&raw const e.k).cast(), &mut found);
        if !found {
            q.cast::<EntryKey>().write(e.k);
            (*l.root).queued.fetch_add(1, Ordering::Relaxed);
        }
        dshash::dshash_release_lock(l.queue, q);
    }
    // Only once it is in the queue (an error inserting it leaves the entry for the sweep).
    e.queued = true;
}

/// Table reads a verify tries before deciding on the base it has.
const LOAD_TRIES: usize = 3;

/// Counts a verify's outcome (`slot` 0: valid; 1..=12: the errors in SPEC §4 order).
pub fn count_verify(slot: usize) {
    let l = local();
    // SAFETY: the root is attached; an atomic add.
    if let Some(c) = unsafe { &*l.root }.verifies.get(slot) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Verifies since server start by outcome slot (see count_verify).
pub fn verify_counts() -> [u64; 13] {
    let l = local();
    // SAFETY: the root is attached; atomic reads.
    let root = unsafe { &*l.root };
    std::array::from_fn(|i| root.verifies[i].load(Ordering::Relaxed))
}

/// Notes that a verify could not be recorded (no memory): keypal_stats() shows it.
pub fn note_dropped() {
    let l = local();
    // SAFETY: the root is attached.
    unsafe { (*l.root).dropped.fetch_add(1, Ordering::Relaxed) };
}

thread_local! {
    /// When this backend next checks on its database's flush worker (µs).
    static NEXT_WORKER_CHECK: Cell<i64> = const { Cell::new(0) };
}

/// Whether this backend is to start its database's flush worker (none runs and none was
/// asked for lately); checked at most once a second per backend (else Ok(false)). Err: no
/// registry slot is left.
pub fn worker_wanted() -> Result<bool, String> {
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if now < NEXT_WORKER_CHECK.get() {
        return Ok(false);
    }
    worker_wanted_now()
}

/// worker_wanted, unthrottled: for a commit that queued work only a worker does.
pub fn worker_wanted_now() -> Result<bool, String> {
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    NEXT_WORKER_CHECK.set(now + 1_000_000);
    let l = local();
    let db = my_db();
    // SAFETY: the root is attached; its slots are atomics, claimed under its lock.
    let root = unsafe { &*l.root };
    if worker_running(&l, db) {
        return Ok(false);
    }
    // SAFETY: the registry changes under the root's lock; request_worker cannot raise.
    unsafe {
        pg_sys::LWLockAcquire(root_lock(l.root), pg_sys::LWLockMode::LW_EXCLUSIVE);
        let r = request_worker(root, db, now);
        pg_sys::LWLockRelease(root_lock(l.root));
        r
    }
}

/// Under the root lock: whether this backend is to start `db`'s worker (none runs and none
/// was asked for in the last 10 s), claiming a registry slot for it.
fn request_worker(root: &Root, db: u32, now: i64) -> Result<bool, String> {
    let slot = slot_of(root, db)
        .or_else(|| {
            // A free slot, or else one whose worker is gone and was not asked for lately
            // (its database dropped, or its worker stopped): that database asks again when
            // it records something.
            let free = root
                .workers
                .iter()
                .find(|s| s.db.load(Ordering::Relaxed) == 0 && s.pid.load(Ordering::Relaxed) == 0)
                .or_else(|| {
                    root.workers.iter().find(|s| {
                        s.pid.load(Ordering::Relaxed) == 0
                            && now.saturating_sub(s.requested_at.load(Ordering::Relaxed))
                                >= 60_000_000
                    })
                })?;
            free.db.store(db, Ordering::Relaxed);
            free.requested_at.store(i64::MIN, Ordering::Relaxed);
            Some(free)
        })
        .ok_or_else(|| {
            format!("no flush worker slot is left ({MAX_WORKERS} databases have one)")
        })?;
    if slot.pid.load(Ordering::Relaxed) != 0
        || now.saturating_sub(slot.requested_at.load(Ordering::Relaxed)) < 10_000_000
    {
        return Ok(false);
    }
    slot.requested_at.store(now, Ordering::Relaxed);
    Ok(true)
}

/// The worker of `db`, at its start: takes the registry slot (false: another runs) and puts
/// back in pending whatever a predecessor left in flight.
pub fn claim_worker(db: u32) -> bool {
    let l = local();
    // SAFETY: the root is attached; the registry changes under its lock.
    let claimed = unsafe {
        let root = &*l.root;
        pg_sys::LWLockAcquire(root_lock(l.root), pg_sys::LWLockMode::LW_EXCLUSIVE);
        let me = pg_sys::MyProcPid;
        let slot = slot_of(root, db).or_else(|| {
            root.workers
                .iter()
                .find(|s| s.db.load(Ordering::Relaxed) == 0 && s.pid.load(Ordering::Relaxed) == 0)
        });
        let claimed = match slot {
            Some(s) if s.pid.load(Ordering::Relaxed) == 0 => {
                s.db.store(db, Ordering::Relaxed);
                s.pid.store(me, Ordering::Relaxed);
                s.ship_failing.store(false, Ordering::Relaxed);
                true
            }
            _ => false,
        };
        pg_sys::LWLockRelease(root_lock(l.root));
        claimed
    };
    if claimed {
        // What a predecessor took and never confirmed is pending again, and queued (it may
        // have drained the queue before it died).
        for_each_entry(&l, true, |e| {
            if e.k.db == db {
                entry::requeue(e, next_seq(unsafe { &*l.root }));
                e.queued = false;
                queue_if_dirty(&l, e, 0);
            }
            Visit::Keep
        });
    }
    claimed
}

/// The worker of `db`, leaving: frees its registry slot.
pub fn release_worker(db: u32) {
    release_slot(db, false);
}

/// The worker of `db`, leaving for good (no entries left, or keypal not installed there):
/// frees its registry slot for any database.
pub fn retire_worker(db: u32) {
    release_slot(db, true);
}

fn release_slot(db: u32, free: bool) {
    let root = ROOT.load(Ordering::Relaxed);
    if root.is_null() {
        return;
    }
    // SAFETY: the root is attached; the registry changes under its lock.
    unsafe {
        pg_sys::LWLockAcquire(root_lock(root), pg_sys::LWLockMode::LW_EXCLUSIVE);
        for s in (*root).workers.iter() {
            if s.db.load(Ordering::Relaxed) == db
                && s.pid.load(Ordering::Relaxed) == pg_sys::MyProcPid
            {
                s.pid.store(0, Ordering::Relaxed);
                s.requested_at.store(i64::MIN, Ordering::Relaxed);
                if free {
                    s.db.store(0, Ordering::Relaxed);
                }
            }
        }
        pg_sys::LWLockRelease(root_lock(root));
    }
}

enum Visit {
    Keep,
    Delete,
    Stop,
}

/// Visits every item of `table` (each under its partition's lock, exclusive or shared),
/// deleting those `f` says to (when `exclusive`) and counting them off `count`, until `f`
/// says to stop.
fn scan<T>(
    table: *mut DshashTable,
    exclusive: bool,
    count: &AtomicI64,
    mut f: impl FnMut(&mut T) -> Visit,
) {
    let mut status = SeqStatus::default();
    // SAFETY: a sequential scan of an attached table whose items are `T`; `f` is arithmetic
    // and cannot raise an error while a partition lock is held.
    unsafe {
        dshash::dshash_seq_init(&mut status, table, exclusive);
        loop {
            let item = dshash::dshash_seq_next(&mut status).cast::<T>();
            if item.is_null() {
                break;
            }
            match f(&mut *item) {
                Visit::Keep => {}
                Visit::Delete if exclusive => {
                    dshash::dshash_delete_current(&mut status);
                    count.fetch_sub(1, Ordering::Relaxed);
                }
                Visit::Delete => {}
                Visit::Stop => break,
            }
        }
        dshash::dshash_seq_term(&mut status);
    }
}

/// Visits every entry, deleting those `f` says to.
fn for_each_entry(l: &Local, exclusive: bool, f: impl FnMut(&mut Entry) -> Visit) {
    // SAFETY: the root is attached.
    scan(l.table, exclusive, unsafe { &(*l.root).entries }, f);
}

/// What the flush worker needs to know to take a batch.
pub struct Sweep {
    pub db: u32,
    pub now: i64,
    pub resolution_us: i64,
    pub idle_us: i64,
    /// Entries holding a quota count no table will hold are kept: on a standby under
    /// limit_split, or with nowhere to ship its counts.
    pub keep_local_counts: bool,
}

/// The flush worker's batch: up to `max` queued entries of its database, their changes
/// taken (in flight until `confirm`).
pub fn take(s: &Sweep, max: usize) -> Vec<Taken> {
    let l = local();
    // SAFETY: the root is attached.
    let root = unsafe { &*l.root };
    let mut keys = Vec::new();
    // This database's queued keys (other databases' stay for their workers).
    scan::<EntryKey>(l.queue, true, &root.queued, |k| {
        if keys.len() >= max {
            Visit::Stop
        } else if k.db == s.db {
            keys.push(*k);
            Visit::Delete
        } else {
            Visit::Keep
        }
    });
    keys.iter()
        .filter_map(|k| {
            let mut locked = find(&l, k, true)?;
            let e = locked.get();
            e.queued = false;
            entry::take(e, s.resolution_us, next_seq(root))
        })
        .collect()
}

/// The flush worker's pass over every entry, now and then: drops entries that are done
/// (`entry::evictable`) and those of databases that no longer exist (`db_exists`). Returns
/// how many entries of its database remain.
pub fn sweep(s: &Sweep, mut db_exists: impl FnMut(u32) -> bool) -> usize {
    let l = local();
    // Existence of other databases is looked up outside the partition locks.
    let mut others = HashSet::new();
    for_each_entry(&l, false, |e| {
        if e.k.db != s.db {
            others.insert(e.k.db);
        }
        Visit::Keep
    });
    let gone: HashSet<u32> = others.into_iter().filter(|db| !db_exists(*db)).collect();
    let mut remaining = 0;
    for_each_entry(&l, true, |e| {
        if e.k.db != s.db {
            return if gone.contains(&e.k.db) {
                Visit::Delete
            } else {
                Visit::Keep
            };
        }
        if entry::evictable(e, s.now, s.idle_us, s.resolution_us)
            && !(s.keep_local_counts && entry::holds_local_count(e, s.now))
        {
            return Visit::Delete;
        }
        // Left out of the queue (a key missing from the table, a failed queue insert).
        queue_if_dirty(&l, e, s.resolution_us);
        remaining += 1;
        Visit::Keep
    });
    sweep_seen(s.now);
    if !gone.is_empty() {
        drop_queued(&l, |k| gone.contains(&k.db));
    }
    remaining
}

/// Deletes the queued keys `f` picks.
fn drop_queued(l: &Local, f: impl Fn(&EntryKey) -> bool) {
    // SAFETY: the root is attached.
    let queued = unsafe { &(*l.root).queued };
    scan::<EntryKey>(l.queue, true, queued, |k| {
        if f(k) {
            Visit::Delete
        } else {
            Visit::Keep
        }
    });
}

/// keypal is not installed in `db` (any more): its entries and queued keys go.
pub fn purge(db: u32) {
    let l = local();
    for_each_entry(&l, true, |e| {
        if e.k.db == db {
            Visit::Delete
        } else {
            Visit::Keep
        }
    });
    drop_queued(&l, |k| k.db == db);
}

/// A request signature seen: (database, 16 bytes of its digest), until when it counts.
#[repr(C)]
struct Seen {
    k: EntryKey,
    until: i64,
}

/// Signatures remembered at most: an eighth of `keypal.shared_memory`, 64 bytes each.
fn max_seen() -> i64 {
    crate::gucs::SHARED_MEMORY_MB.get().max(1) as i64 * 1024 * 1024 / 8 / 64
}

/// How far ahead of this server's clock a signature may be dated (µs).
pub const SIGNATURE_SKEW_US: i64 = 5_000_000;

/// keypal_verify_signature's replay check, exact across sessions of this server: true the
/// first time a signature (`digest`, dated `signed_at`) is presented, until `until` (µs);
/// false when it was seen before, or is dated no later than the start of this replay memory
/// plus the skew allowed (a server run before this one — or the primary, before a promotion
/// — may have accepted it). Err when the memory for it is used up (then nothing verifies:
/// refusing is the safe answer).
pub fn first_sighting(digest: [u8; 16], signed_at: i64, until: i64) -> Result<bool, String> {
    let l = local();
    // SAFETY: the root is attached.
    let root = unsafe { &*l.root };
    // SAFETY: reads the clock and a shared flag.
    let (now, recovery) = unsafe { (pg_sys::GetCurrentTimestamp(), pg_sys::RecoveryInProgress()) };
    if !recovery && root.made_in_recovery.swap(false, Ordering::Relaxed) {
        root.made_at.store(now, Ordering::Relaxed);
    }
    // (Signatures carry whole seconds: the memory's start counts from its second.)
    let made_at = root.made_at.load(Ordering::Relaxed);
    if signed_at <= made_at - made_at.rem_euclid(1_000_000) + SIGNATURE_SKEW_US {
        return Ok(false);
    }
    let k = EntryKey {
        db: my_db(),
        key: digest,
    };
    // What has expired goes now and then (a minute apart; a second apart when full).
    let full = root.seen_count.load(Ordering::Relaxed) >= max_seen();
    let swept = root.seen_swept_at.load(Ordering::Relaxed);
    if now - swept >= if full { 1_000_000 } else { 60_000_000 }
        && root
            .seen_swept_at
            .compare_exchange(swept, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        sweep_seen(now);
    }
    if root.seen_count.load(Ordering::Relaxed) >= max_seen() {
        return Err(format!(
            "keypal: {} request signatures remembered within their max_age fill the memory \
             for them (an eighth of keypal.shared_memory)",
            max_seen()
        ));
    }
    // SAFETY: the table is attached; the entry stays locked until released below, and
    // nothing between can raise an error.
    unsafe {
        let mut found = false;
        let e =
            dshash::dshash_find_or_insert(l.seen, (&raw const k).cast(), &mut found).cast::<Seen>();
        let first = !found || (*e).until <= now;
        if !found {
            root.seen_count.fetch_add(1, Ordering::Relaxed);
        }
        if first {
            e.write(Seen { k, until });
        }
        dshash::dshash_release_lock(l.seen, e.cast());
        Ok(first)
    }
}

/// Drops the request signatures whose time is over (the flush worker's sweep).
pub fn sweep_seen(now: i64) {
    let l = local();
    // SAFETY: the root is attached.
    scan::<Seen>(l.seen, true, unsafe { &(*l.root).seen_count }, |e| {
        if e.until <= now {
            Visit::Delete
        } else {
            Visit::Keep
        }
    });
}

/// Whether the entries fill `keypal.shared_memory` past nine tenths (the worker then sweeps
/// at every flush).
pub fn nearly_full() -> bool {
    let l = local();
    // SAFETY: the root is attached; an atomic read.
    unsafe { &*l.root }.entries.load(Ordering::Relaxed) * 10 >= max_entries() * 9
}

/// After the flush: each taken part written or not (`outcome`); keys `missing` from the
/// table for longer than `grace_us` have what they counted dropped. What is left to write
/// goes back in the queue.
pub fn confirm(
    s: &Sweep,
    batch: &[Taken],
    outcome: impl Fn(&Taken) -> Outcome,
    missing: &HashSet<[u8; 16]>,
    grace_us: i64,
) {
    let l = local();
    // SAFETY: the root is attached.
    let root = unsafe { &*l.root };
    let mut heard = false;
    for t in batch {
        let k = EntryKey {
            db: s.db,
            key: t.key,
        };
        if let Some(mut locked) = find(&l, &k, true) {
            let e = locked.get();
            let o = outcome(t);
            if o.global.is_some() {
                e.heard_at = e.heard_at.max(s.now);
                heard = true;
            }
            entry::confirm(e, t, &o, next_seq(root));
            if missing.contains(&t.key) {
                // Not queued again at once: the sweep does (every few seconds), so keys that
                // cannot be written do not crowd out the rest.
                if e.missing_since == 0 {
                    e.missing_since = s.now;
                } else if s.now.saturating_sub(e.missing_since) >= grace_us {
                    entry::forget_unwritten(e);
                }
            } else {
                e.missing_since = 0;
                queue_if_dirty(&l, e, s.resolution_us);
            }
        }
    }
    if heard {
        // SAFETY: the condition variable lives in the attached root.
        unsafe { pg_sys::ConditionVariableBroadcast((&raw const root.news).cast_mut()) };
    }
    let me = unsafe { pg_sys::MyProcPid };
    if let Some(w) = slot_of(root, s.db).filter(|w| w.pid.load(Ordering::Relaxed) == me) {
        w.flushed_at.store(s.now, Ordering::Relaxed);
    }
}

/// How many entries of `db` there are.
pub fn entries_of(db: u32) -> usize {
    let l = local();
    let mut n = 0;
    for_each_entry(&l, false, |e| {
        n += usize::from(e.k.db == db);
        Visit::Keep
    });
    n
}

thread_local! {
    /// Keys whose quota use this transaction wrote to the table: marked for reload once it
    /// commits (marked before, a verify elsewhere could reload the pre-commit use and keep it
    /// as its base for good).
    static RELOAD_AT_COMMIT: RefCell<HashSet<[u8; 16]>> = RefCell::new(HashSet::new());
}

/// Makes verify re-read `key`'s quota use from the table once this transaction commits
/// (after keypal_track_usage wrote to it).
pub fn reload_quota_at_commit(key: [u8; 16]) {
    // Attach now, inside the transaction, where an error is harmless: the commit callback
    // only marks entries of an attached table.
    local();
    RELOAD_AT_COMMIT.with(|k| k.borrow_mut().insert(key));
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            let keys = RELOAD_AT_COMMIT.with(|k| std::mem::take(&mut *k.borrow_mut()));
            if !keys.is_empty() && !TABLE.load(Ordering::Relaxed).is_null() {
                let l = local();
                for key in keys {
                    if let Some(mut e) = find(&l, &EntryKey { db: my_db(), key }, true) {
                        e.get().quota.loaded = false;
                    }
                }
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

/// The key's exact use in the period starting `period_start`, or None when shared memory
/// holds nothing of it (the table then has it all). `read_table` reads the key's use from
/// the table under a snapshot taken when it runs. With a loaded base, the entry's total is
/// exact; otherwise (after `keypal_track_usage`, or in the transaction that wrote the table)
/// the table is read as verify does — while nothing is in flight and no flush begins or
/// ends around the read — and what is not yet written is added.
pub fn quota_used(
    key: [u8; 16],
    period_start: i64,
    mut read_table: impl FnMut() -> i64,
) -> Option<i64> {
    // This transaction wrote the key's use to the table (not yet committed, so not yet in
    // any base): only the table, as this transaction sees it, has it.
    let own_write = RELOAD_AT_COMMIT.with(|k| k.borrow().contains(&key));
    let l = local();
    let k = EntryKey { db: my_db(), key };
    let peek = || {
        find(&l, &k, false)
            .map(|mut e| e.get().quota)
            .filter(|q| q.period_start == period_start)
    };
    for _ in 0..500 {
        let q = peek()?;
        if q.loaded && !own_write {
            return Some(q.total());
        }
        if q.inflight != 0 && !worker_running(&l, k.db) {
            // Taken by a worker that is gone: its batch goes back to pending when the next
            // one starts; it is not in the table.
            return Some(
                read_table()
                    .saturating_add(q.inflight)
                    .saturating_add(q.pending),
            );
        }
        if q.inflight == 0 {
            let used = read_table();
            match peek() {
                Some(after) if after.seq == q.seq && after.inflight == 0 => {
                    return Some(used.saturating_add(after.pending));
                }
                None => return Some(used),
                _ => {}
            }
        }
        // A flush is under way: its commit and confirmation take a moment.
        std::thread::sleep(std::time::Duration::from_millis(1));
        pgrx::check_for_interrupts!();
    }
    crate::errors::raise(
        pgrx::PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
        "keypal: the flush worker kept this key's count in flight for 0.5 s; try again".into(),
    )
}

/// Whether a flush worker of `db` runs.
/// Whether `db` has a flush worker running now, as far as a preloaded root says (the
/// launcher's question: it attaches nothing; false without the preload).
pub fn worker_running_for(db: u32) -> bool {
    let root = ROOT.load(Ordering::Relaxed);
    !root.is_null() && running_in(root, db)
}

fn worker_running(l: &Local, db: u32) -> bool {
    running_in(l.root, db)
}

fn running_in(root: *mut Root, db: u32) -> bool {
    // SAFETY: an attached root (or the preloaded one); reads of atomics.
    unsafe { &*root }
        .workers
        .iter()
        .any(|s| s.db.load(Ordering::Relaxed) == db && s.pid.load(Ordering::Relaxed) != 0)
}

/// The key's last admitted verify, if shared memory holds one (µs).
pub fn last_used(key: [u8; 16]) -> Option<i64> {
    let l = local();
    find(&l, &EntryKey { db: my_db(), key }, false)
        .map(|mut e| e.get().last_seen)
        .filter(|&t| t != NEVER)
}

/// Requests per key and hour of this database not yet in keypal.usage.
pub fn unwritten_hours() -> Vec<([u8; 16], i64, i64)> {
    let l = local();
    let db = my_db();
    let mut out = Vec::new();
    for_each_entry(&l, false, |e| {
        if e.k.db == db {
            out.extend(entry::unwritten_hours(e).map(|h| (e.k.key, h.start, h.n)));
        }
        Visit::Keep
    });
    out
}

/// Figures for keypal_stats().
pub struct Stats {
    pub entries: i64,
    pub queued: i64,
    pub max_entries: i64,
    pub dropped: u64,
    pub workers: i64,
    /// Microseconds since this database's worker last flushed (None: it has not).
    pub flush_age_us: Option<i64>,
    /// On a standby: this database's worker could not ship its last batch (None: no worker).
    pub ship_failing: Option<bool>,
}

pub fn stats() -> Stats {
    let l = local();
    // SAFETY: the root is attached; reads of atomics.
    let root = unsafe { &*l.root };
    let db = my_db();
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let mine = slot_of(root, db);
    Stats {
        entries: root.entries.load(Ordering::Relaxed),
        queued: root.queued.load(Ordering::Relaxed),
        max_entries: max_entries(),
        dropped: root.dropped.load(Ordering::Relaxed),
        workers: root
            .workers
            .iter()
            .filter(|s| s.pid.load(Ordering::Relaxed) != 0)
            .count() as i64,
        flush_age_us: mine
            .map(|s| s.flushed_at.load(Ordering::Relaxed))
            .filter(|&t| t > 0)
            .map(|t| now - t),
        ship_failing: mine
            .filter(|s| s.pid.load(Ordering::Relaxed) != 0)
            .map(|s| s.ship_failing.load(Ordering::Relaxed)),
    }
}

/// The pid of this database's flush worker, if one runs.
pub fn worker_pid() -> Option<i32> {
    let l = local();
    let db = my_db();
    // SAFETY: the root is attached; reads of atomics.
    slot_of(unsafe { &*l.root }, db)
        .map(|s| s.pid.load(Ordering::Relaxed))
        .filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_hash_spreads_sequential_ids_and_tells_databases_apart() {
        let mut seen = HashSet::new();
        for i in 0u32..10_000 {
            let mut key = [0u8; 16];
            key[12..].copy_from_slice(&i.to_be_bytes());
            seen.insert(key_hash(&EntryKey { db: 5, key }) & 0xFFFF);
        }
        // 10 000 sequential ids over 65 536 buckets: a good mix leaves few collisions.
        assert!(seen.len() > 9_000, "{} distinct", seen.len());
        let key = [3u8; 16];
        assert_ne!(
            key_hash(&EntryKey { db: 1, key }),
            key_hash(&EntryKey { db: 2, key })
        );
    }

    /// An entry stays under a kilobyte (docs/DESIGN.md states the figure).
    const _: () = assert!(BYTES_PER_ENTRY <= 1024);
}
