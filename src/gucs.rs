//! Every keypal setting that lives in postgresql.conf rather than in keypal.settings:
//! `keypal.salt` (and `keypal.previous_salt`, `keypal.typescript_salt`), `keypal.shared_memory`, `keypal.flush_interval`,
//! `keypal.maintenance_interval` and `keypal.primary_conninfo`.
//!
//! `keypal.salt` is the server secret mixed into every key hash. It is superuser-only
//! (PGC_SUSET, hidden from SHOW for others) and lives in the server's configuration, never
//! in a table, so pg_dump never writes it. Set it with `ALTER SYSTEM SET keypal.salt = '…'`
//! (or in postgresql.conf) and reload; changing it makes every existing key stop verifying.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::cell::RefCell;
use std::ffi::CString;

pub static SALT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The TypeScript keypal's salt, which it appends to a key as it is (not hashed): verify
/// tries `ALG(key || this)` last, so keys imported from it keep their plaintext.
pub static TYPESCRIPT_SALT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The salt before the current one, while keys hashed under it are moved over: verify tries
/// it when the current salt finds nothing. Unset: none; '' : keys made with no salt.
pub static PREVIOUS_SALT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The server secret every key's request-signing secret is derived from (superuser-only,
/// like the salt; never in a table).
pub static SIGNING_SECRET: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The most memory (MB) the shared entries may take (keys in use: limits/shmem.rs).
pub static SHARED_MEMORY_MB: GucSetting<i32> = GucSetting::<i32>::new(1024);

/// How often (ms) the flush worker writes shared memory behind: a crash loses at most about
/// this much of last uses and counts. 5 s: each flush writes one row per quota'd key used
/// since the last, so a longer interval writes a busy key once for more requests; at 1 s,
/// 100 000 busy quota'd keys cost the worker most of a core (docs/DESIGN.md).
pub static FLUSH_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);

/// Where a standby's flush worker ships its counts (a libpq connection string); empty: the
/// standby's own `primary_conninfo`.
pub static PRIMARY_CONNINFO: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// How often (ms) the worker runs keypal_run_maintenance's batches; 0: never (pg_cron's
/// `CALL keypal_run_maintenance()` instead). While it is on, a database's worker stays.
pub static MAINTENANCE_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);

pub fn init() {
    GucRegistry::define_int_guc(
        c"keypal.maintenance_interval",
        c"How often keypal's worker runs maintenance (schedules, quota resets, pruning); 0: never.",
        c"The same work as CALL keypal_run_maintenance(). While it is on, each database's \
          worker stays once started; turn it off to schedule maintenance with pg_cron instead.",
        &MAINTENANCE_INTERVAL_MS,
        0,
        24 * 3600 * 1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"keypal.shared_memory",
        c"The most shared memory keypal's usage entries may take (one per key in use).",
        c"About 500 bytes per key verified recently or with a live rate window. When it is \
          full, a key with a rate limit or quota that has no entry fails verify with SQLSTATE \
          53200; other keys verify without their use being recorded.",
        &SHARED_MEMORY_MB,
        1,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"keypal.flush_interval",
        c"How often (ms) keypal's flush worker writes last uses and counts to tables.",
        c"A crash loses at most this much of them; a clean stop loses none.",
        &FLUSH_INTERVAL_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"keypal.primary_conninfo",
        c"Where a standby's keypal worker ships what verify counted there (superuser only).",
        c"A libpq connection string to the primary; its database is the worker's own. Empty: \
          the standby's primary_conninfo. The role it names needs EXECUTE on \
          keypal.replica_counts(text, bigint, text) in each database that uses keypal.",
        &PRIMARY_CONNINFO,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"keypal.signing_secret",
        c"Server secret each key's request-signing secret is derived from (superuser only).",
        c"signing_secret = 'kps_' || hex(hmac-sha256(this, 'keypal signing secret:' || key id)). \
          Set it with ALTER SYSTEM and reload; changing it changes every key's signing secret.",
        &SIGNING_SECRET,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL | GucFlags::NO_RESET_ALL,
    );
    GucRegistry::define_string_guc(
        c"keypal.previous_salt",
        c"The salt keys were hashed under before keypal.salt changed (superuser only).",
        c"Verify tries it when the current salt finds no key, so a salt can be rotated: set \
          this to the old salt and keypal.salt to the new one. Empty: keys made with no salt.",
        &PREVIOUS_SALT,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL | GucFlags::NO_RESET_ALL,
    );
    GucRegistry::define_string_guc(
        c"keypal.typescript_salt",
        c"The salt the TypeScript keypal was configured with (superuser only).",
        c"It appends its salt to a key as it is: verify tries ALG(key || this) when \
          keypal.salt and keypal.previous_salt find no key, so keys imported from it verify.",
        &TYPESCRIPT_SALT,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL | GucFlags::NO_RESET_ALL,
    );
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

type SuffixCache = RefCell<(Option<CString>, String)>;

thread_local! {
    /// (salt, lower-hex(sha256(salt))): recomputed only when the salt changes; one for
    /// keypal.salt, one for keypal.previous_salt.
    static SUFFIX: SuffixCache = const { RefCell::new((None, String::new())) };
    static PREVIOUS_SUFFIX: SuffixCache = const { RefCell::new((None, String::new())) };
}

fn with_suffix<R>(
    salt: Option<CString>,
    cache: &'static std::thread::LocalKey<SuffixCache>,
    f: impl FnOnce(&str) -> R,
) -> R {
    cache.with(|cell| {
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

/// Calls `f` with the hash suffix `S` for the current salt.
pub fn with_salt_suffix<R>(f: impl FnOnce(&str) -> R) -> R {
    with_suffix(SALT.get(), &SUFFIX, f)
}

/// The suffixes verify tries when the current salt finds nothing, in order: 1, for
/// keypal.previous_salt (when set to a salt other than the current one); 2, keypal.typescript_salt
/// as it is. Calls `f` with suffix `which`, or answers None when that one is not set.
pub fn with_fallback_suffix<R>(which: usize, f: impl FnOnce(&str) -> R) -> Option<R> {
    match which {
        1 => {
            let previous = PREVIOUS_SALT.get()?;
            let current = SALT.get().unwrap_or_default();
            (previous != current).then(|| with_suffix(Some(previous), &PREVIOUS_SUFFIX, f))
        }
        _ => {
            let raw = TYPESCRIPT_SALT.get().filter(|s| !s.is_empty())?;
            Some(f(&raw.to_string_lossy()))
        }
    }
}

/// A setting's current value (current_setting(name, true)): None when it does not exist.
pub fn current_setting(name: &str) -> Option<String> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string; missing_ok, so no error for an unknown name (NULL). The value
    // stays valid until the setting changes; it is copied at once.
    unsafe {
        let v = pgrx::pg_sys::GetConfigOption(name.as_ptr(), true, false);
        (!v.is_null()).then(|| std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned())
    }
}
