//! A plaintext API key passed where a key's id (a uuid) is expected — `keypal_revoke('sk_…')`
//! — fails in PostgreSQL's uuid input before any keypal code runs, and the error would carry
//! the key into the server log (its message, and the statement). keypal's `emit_log_hook`
//! turns that error into one that says what to pass instead and leaves the key out: the
//! value is cut to its first characters and the statement is not logged.
//!
//! It acts only on 22P02 "invalid input syntax for type uuid" raised by a statement that
//! calls a keypal function, for a value long enough to be a key; it is in place in every
//! backend that has loaded keypal (all of them with `shared_preload_libraries = 'keypal'`).

use pgrx::pg_sys;
use std::ffi::{CStr, CString};

static mut PREVIOUS: pg_sys::emit_log_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once per backend, before any error this hook could see.
    unsafe {
        PREVIOUS = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(hook);
    }
}

const UUID_SYNTAX: &str = "invalid input syntax for type uuid: \"";

/// What the error becomes, if it is one to change: (message, hint). Pure.
pub fn rewrite(sqlstate: &str, message: &str, statement: &str) -> Option<(String, String)> {
    if sqlstate != "22P02" || !statement.to_ascii_lowercase().contains("keypal_") {
        return None;
    }
    let value = message.strip_prefix(UUID_SYNTAX)?.strip_suffix('"')?;
    if value.chars().count() < 16 {
        return None;
    }
    let shown: String = value.chars().take(4).collect();
    Some((
        format!("{UUID_SYNTAX}{shown}…\" (the rest left out of this message and the log)"),
        "this looks like an API key, not a key's id: pass the id (a uuid) that keypal_create \
         returned, or that keypal_verify(key).key_id answers"
            .into(),
    ))
}

fn sqlstate_of(code: i32) -> String {
    (0..5)
        .map(|i| char::from(((code >> (6 * i)) & 0x3F) as u8 + b'0'))
        .collect()
}

unsafe extern "C-unwind" fn hook(edata: *mut pg_sys::ErrorData) {
    // SAFETY: PostgreSQL passes the error being reported; its strings are NUL-terminated or
    // NULL, and ErrorContext is the context error data lives in.
    unsafe {
        if let Some(e) = edata.as_mut() {
            if e.elevel >= pgrx::PgLogLevel::ERROR as i32
                && !e.message.is_null()
                && !pg_sys::debug_query_string.is_null()
            {
                let message = CStr::from_ptr(e.message).to_string_lossy();
                let statement = CStr::from_ptr(pg_sys::debug_query_string).to_string_lossy();
                if let Some((message, hint)) =
                    rewrite(&sqlstate_of(e.sqlerrcode), &message, &statement)
                {
                    if let (Ok(m), Ok(h)) = (CString::new(message), CString::new(hint)) {
                        e.message = pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, m.as_ptr());
                        if e.hint.is_null() {
                            e.hint = pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, h.as_ptr());
                        }
                        e.hide_stmt = true;
                    }
                }
            }
        }
        if let Some(previous) = PREVIOUS {
            previous(edata);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_passed_to_keypal_as_ids() {
        let msg = "invalid input syntax for type uuid: \"sk_live_abcdefghijklmnopqrstuvwxyz0123\"";
        let (m, h) = rewrite(
            "22P02",
            msg,
            "SELECT keypal_revoke('sk_live_abcdefghijklmnopqrstuvwxyz0123')",
        )
        .unwrap();
        assert!(m.starts_with("invalid input syntax for type uuid: \"sk_l…\""));
        assert!(!m.contains("abcdefgh"));
        assert!(h.contains("not a key's id"));
        assert_eq!(
            rewrite("22P02", msg, "SELECT 'x'::uuid"),
            None,
            "no keypal function called"
        );
        assert_eq!(
            rewrite("22023", msg, "SELECT keypal_revoke('…')"),
            None,
            "another error"
        );
        let short = "invalid input syntax for type uuid: \"abc\"";
        assert_eq!(
            rewrite("22P02", short, "SELECT keypal_get('abc')"),
            None,
            "too short to be a key"
        );
        assert_eq!(
            sqlstate_of(pgrx::PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION as i32),
            "22P02"
        );
    }
}
