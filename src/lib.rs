//! keypal: API-key management inside PostgreSQL.
//!
//! Pure logic (key format, hashing, durations, scopes, IP rules, options) lives in plain
//! modules with plain tests; the pgrx layer (api, verify, spi, identity, gucs) stays thin;
//! tables, triggers and the management functions are SQL in sql/.

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

/// `pg_finfo_<name>` for a hand-written C function of the version-1 calling convention
/// (PG_FUNCTION_INFO_V1), for the few declared in the SQL files rather than by pgrx.
macro_rules! finfo_v1 {
    ($finfo:ident) => {
        #[no_mangle]
        pub extern "C-unwind" fn $finfo() -> &'static pgrx::pg_sys::Pg_finfo_record {
            const V1: pgrx::pg_sys::Pg_finfo_record =
                pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}

/// `&'static CStr` of a statement built by concat! from literals (and macros giving them).
macro_rules! sql {
    ($($part:expr),+ $(,)?) => {
        match std::ffi::CStr::from_bytes_with_nul(concat!($($part),+, "\0").as_bytes()) {
            Ok(sql) => sql,
            Err(_) => panic!("a NUL inside the statement"),
        }
    };
}

pub mod api;
pub mod audit;
pub mod automation;
pub mod bgtx;
pub mod catalog;
pub mod create;
pub mod delivery;
pub mod duration;
pub mod errors;
pub mod events;
pub mod gucs;
pub mod identity;
pub mod import;
pub mod import_row;
pub mod insight;
pub mod keys;
pub mod launcher;
pub mod limits;
pub mod net;
pub mod options;
pub mod pq;
pub mod redact;
pub mod replica;
pub mod scan;
pub mod scoped;
pub mod scopes;
pub mod signature;
pub mod spi;
pub mod verify;
pub mod worker;

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/automation.sql", name = "automation");
extension_sql_file!("../sql/transfer.sql", name = "transfer");
extension_sql_file!("../sql/api.sql", name = "api", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    identity::init();
    catalog::init();
    limits::shmem::init();
    launcher::init();
    redact::init();
    limits::shmem::init_backend();
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

#[cfg(test)]
mod proptests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
