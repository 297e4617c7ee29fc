//! Every keypal setting that lives in postgresql.conf rather than in keypal.settings:
//! `keypal.salt` and `keypal.rate_limit_slots`.
//!
//! `keypal.salt` is the server secret mixed into every key hash. It is superuser-only
//! (PGC_SUSET, hidden from SHOW for others) and lives in the server's configuration, never
//! in a table, so pg_dump never writes it. Set it with `ALTER SYSTEM SET keypal.salt = '…'`
//! (or in postgresql.conf) and reload; changing it makes every existing key stop verifying.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::cell::RefCell;
use std::ffi::CString;

pub static SALT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// How many keys the shared-memory rate limiter tracks at once (needs a restart).
pub static RATE_LIMIT_SLOTS: GucSetting<i32> = GucSetting::<i32>::new(16384);

pub fn init() {
    // Preloaded, the table is sized at server start; otherwise the dynamic segment is sized
    // when the first verify after server start creates it.
    // SAFETY: reads a backend-global flag.
    let preloading = unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress };
    define_rate_limit_slots(if preloading {
        GucContext::Postmaster
    } else {
        GucContext::Sighup
    });
    GucRegistry::define_string_guc(
        c"keypal.salt",
        c"Server secret mixed into every API-key hash (superuser only).",
        c"hash = ALG(key || lower-hex(sha256(salt))). Set it with ALTER SYSTEM and reload; \
          changing it invalidates every existing key. Never stored in a table.",
        &SALT,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL | GucFlags::NO_RESET_ALL,
    );
}

fn define_rate_limit_slots(context: GucContext) {
    GucRegistry::define_int_guc(
        c"keypal.rate_limit_slots",
        c"Keys the shared-memory rate limiter tracks at once (about 200 bytes each).",
        c"Sizes the preloaded table (at server start) or the dynamic segment (at the first \
          verify after server start). A key whose window is still live and finds no free \
          slot is rate-limited through the keypal.rate_state table instead.",
        &RATE_LIMIT_SLOTS,
        64,
        16 * 1024 * 1024,
        context,
        GucFlags::default(),
    );
}

thread_local! {
    /// (salt, lower-hex(sha256(salt))): recomputed only when the salt changes.
    static SUFFIX: RefCell<(Option<CString>, String)> = const { RefCell::new((None, String::new())) };
}

/// Calls `f` with the hash suffix `S` for the current salt.
pub fn with_salt_suffix<R>(f: impl FnOnce(&str) -> R) -> R {
    let salt = SALT.get();
    SUFFIX.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != salt {
            let text = salt
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            *cached = (salt, crate::keys::salt_suffix(&text));
        }
        f(&cached.1)
    })
}
