//! PostgreSQL's dynamic shared hash table (lib/dshash.h), which pgrx does not bind: a hash
//! table in a DSA area that grows with its entries, split into partitions each guarded by
//! its own LWLock. A found entry is returned locked (shared or exclusive) until released.

use pgrx::pg_sys::{dsa_area, dsa_pointer};
use std::ffi::c_void;

#[repr(C)]
pub struct DshashTable {
    _private: [u8; 0],
}

pub type CompareFn =
    unsafe extern "C-unwind" fn(*const c_void, *const c_void, usize, *mut c_void) -> i32;
pub type HashFn = unsafe extern "C-unwind" fn(*const c_void, usize, *mut c_void) -> u32;

/// `dshash_parameters` as PostgreSQL 15 lays it out.
#[repr(C)]
pub struct Parameters {
    pub key_size: usize,
    pub entry_size: usize,
    pub compare_function: CompareFn,
    pub hash_function: HashFn,
    pub tranche_id: i32,
}

/// `dshash_seq_status` as PostgreSQL 15 lays it out (the caller owns its storage).
#[repr(C)]
pub struct SeqStatus {
    hash_table: *mut DshashTable,
    curbucket: i32,
    nbuckets: i32,
    curitem: *mut c_void,
    pnextitem: dsa_pointer,
    curpartition: i32,
    exclusive: bool,
}

impl Default for SeqStatus {
    fn default() -> SeqStatus {
        SeqStatus {
            hash_table: std::ptr::null_mut(),
            curbucket: 0,
            nbuckets: 0,
            curitem: std::ptr::null_mut(),
            pnextitem: 0,
            curpartition: 0,
            exclusive: false,
        }
    }
}

mod raw {
    use super::{DshashTable, Parameters, SeqStatus};
    use pgrx::pg_sys::{dsa_area, dsa_pointer};
    use std::ffi::c_void;

    unsafe extern "C-unwind" {
        pub fn dshash_create(
            area: *mut dsa_area,
            params: *const Parameters,
            arg: *mut c_void,
        ) -> *mut DshashTable;
        pub fn dshash_attach(
            area: *mut dsa_area,
            params: *const Parameters,
            handle: dsa_pointer,
            arg: *mut c_void,
        ) -> *mut DshashTable;
        pub fn dshash_get_hash_table_handle(table: *mut DshashTable) -> dsa_pointer;
        pub fn dshash_find(
            table: *mut DshashTable,
            key: *const c_void,
            exclusive: bool,
        ) -> *mut c_void;
        pub fn dshash_find_or_insert(
            table: *mut DshashTable,
            key: *const c_void,
            found: *mut bool,
        ) -> *mut c_void;
        pub fn dshash_release_lock(table: *mut DshashTable, entry: *mut c_void);
        pub fn dshash_seq_init(status: *mut SeqStatus, table: *mut DshashTable, exclusive: bool);
        pub fn dshash_seq_next(status: *mut SeqStatus) -> *mut c_void;
        pub fn dshash_seq_term(status: *mut SeqStatus);
        pub fn dshash_delete_current(status: *mut SeqStatus);
    }
}

/// Each call goes through pgrx's guard: a PostgreSQL error inside (out of memory for a
/// segment) becomes a Rust panic that unwinds to the calling function's boundary, where it
/// is raised again as the same error.
macro_rules! guarded {
    ($(pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)*) => {
        $(
            /// # Safety
            /// As PostgreSQL's function of the same name.
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: forwarded to PostgreSQL under the caller's guarantees.
                unsafe { pgrx::pg_sys::ffi::pg_guard_ffi_boundary(|| raw::$name($($arg),*)) }
            }
        )*
    };
}

guarded! {
    pub fn dshash_create(area: *mut dsa_area, params: *const Parameters, arg: *mut c_void) -> *mut DshashTable;
    pub fn dshash_attach(area: *mut dsa_area, params: *const Parameters, handle: dsa_pointer, arg: *mut c_void) -> *mut DshashTable;
    pub fn dshash_get_hash_table_handle(table: *mut DshashTable) -> dsa_pointer;
    pub fn dshash_find(table: *mut DshashTable, key: *const c_void, exclusive: bool) -> *mut c_void;
    pub fn dshash_find_or_insert(table: *mut DshashTable, key: *const c_void, found: *mut bool) -> *mut c_void;
    pub fn dshash_release_lock(table: *mut DshashTable, entry: *mut c_void);
    pub fn dshash_seq_init(status: *mut SeqStatus, table: *mut DshashTable, exclusive: bool);
    pub fn dshash_seq_next(status: *mut SeqStatus) -> *mut c_void;
    pub fn dshash_seq_term(status: *mut SeqStatus);
    pub fn dshash_delete_current(status: *mut SeqStatus);
}
