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
/// The untranslated format of that message (elog's message_id), whatever lc_messages says.
const UUID_SYNTAX_ID: &[u8] = b"invalid input syntax for type %s: \"%s\"";

/// Whether `value` could be a mistyped uuid (hex digits, dashes, braces) rather than a key.
fn uuid_like(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'{' || b == b'}')
}

/// Whether `text` calls (names) a keypal function, without allocating.
fn names_keypal(text: &[u8]) -> bool {
    text.windows(7).any(|w| w.eq_ignore_ascii_case(b"keypal_"))
}

/// What the error becomes, if it is one to change: (message, hint). `message` is the
/// (possibly translated) message, `statements` what the error came from (the client's
/// statement, and the query a PL/pgSQL or SPI call ran). Pure.
pub fn rewrite(message: &str, statements: &[&[u8]]) -> Option<(String, String)> {
    if !statements.iter().any(|s| names_keypal(s)) {
        return None;
    }
    let hint =
        "this looks like an API key, not a key's id: pass the id (a uuid) that keypal_create \
                returned, or that keypal_verify(key).key_id answers"
            .to_string();
    match message
        .strip_prefix(UUID_SYNTAX)
        .and_then(|m| m.strip_suffix('"'))
    {
        Some(value) if value.chars().count() < 16 || uuid_like(value) => None,
        Some(value) => {
            let shown: String = value.chars().take(4).collect();
            Some((
                format!(
                    "{UUID_SYNTAX}{shown}...\" (the rest left out of this message and the log)"
                ),
                hint,
            ))
        }
        // Translated: the value cannot be told apart; leave it all out.
        None => Some((
            "invalid input syntax for type uuid (the value left out of this message and the log)"
                .into(),
            hint,
        )),
    }
}

unsafe extern "C-unwind" fn hook(edata: *mut pg_sys::ErrorData) {
    // Nothing here may unwind into PostgreSQL's error reporting: a failure only means the
    // error is reported as it was.
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: PostgreSQL passes the error being reported; its strings are NUL-terminated
        // or NULL; its assoc_context is where its data lives.
        unsafe { rewrite_error(edata) }
    });
    // SAFETY: the hook PostgreSQL had before keypal's, called as PostgreSQL would.
    unsafe {
        if let Some(previous) = PREVIOUS {
            previous(edata);
        }
    }
}

unsafe fn rewrite_error(edata: *mut pg_sys::ErrorData) {
    // SAFETY: see hook.
    unsafe {
        let Some(e) = edata.as_mut() else { return };
        if e.sqlerrcode != pgrx::PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION as i32
            || e.elevel < pgrx::PgLogLevel::ERROR as i32
            || e.message.is_null()
            || e.message_id.is_null()
            || CStr::from_ptr(e.message_id).to_bytes() != UUID_SYNTAX_ID
        {
            return;
        }
        let bytes = |p: *const std::ffi::c_char| {
            if p.is_null() {
                &[][..]
            } else {
                CStr::from_ptr(p).to_bytes()
            }
        };
        let statement = bytes(pg_sys::debug_query_string);
        let internal = bytes(e.internalquery);
        let message = CStr::from_ptr(e.message).to_string_lossy();
        let Some((message, hint)) = rewrite(&message, &[statement, internal]) else {
            return;
        };
        let (Ok(m), Ok(h)) = (CString::new(message), CString::new(hint)) else {
            return;
        };
        let context = if e.assoc_context.is_null() {
            pg_sys::ErrorContext
        } else {
            e.assoc_context
        };
        let copy = |c: &CString| {
            let n = c.as_bytes_with_nul().len();
            let p = pg_sys::MemoryContextAllocExtended(context, n, pg_sys::MCXT_ALLOC_NO_OOM as i32)
                as *mut std::ffi::c_char;
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(c.as_ptr(), p, n);
            }
            p
        };
        let new_message = copy(&m);
        if new_message.is_null() {
            return;
        }
        e.message = new_message;
        if e.hint.is_null() {
            e.hint = copy(&h);
        }
        // Nor the statement, the query PL/pgSQL ran, or a context naming a parameter's value.
        e.hide_stmt = true;
        e.hide_ctx = true;
        e.internalquery = std::ptr::null_mut();
        e.internalpos = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_passed_to_keypal_as_ids() {
        let msg = "invalid input syntax for type uuid: \"sk_live_abcdefghijklmnopqrstuvwxyz0123\"";
        let call: &[u8] = b"SELECT keypal_revoke('sk_live_abcdefghijklmnopqrstuvwxyz0123')";
        let (m, h) = rewrite(msg, &[call, b""]).unwrap();
        assert!(m.starts_with("invalid input syntax for type uuid: \"sk_l...\""));
        assert!(!m.contains("abcdefgh"));
        assert!(h.contains("not a key's id"));
        assert!(
            rewrite(
                msg,
                &[
                    b"DO $$ BEGIN PERFORM 1; END $$",
                    b"SELECT KEYPAL_REVOKE($1)"
                ]
            )
            .is_some(),
            "a PL/pgSQL query"
        );
        assert_eq!(
            rewrite(msg, &[b"SELECT 'x'::uuid", b""]),
            None,
            "no keypal function called"
        );
        let short = "invalid input syntax for type uuid: \"abc\"";
        assert_eq!(
            rewrite(short, &[b"SELECT keypal_get('abc')"]),
            None,
            "too short to be a key"
        );
        let typo = "invalid input syntax for type uuid: \"6f9619ff-8b86-d011-b42d-00c04fc964f\"";
        assert_eq!(
            rewrite(typo, &[b"SELECT keypal_get('...')"]),
            None,
            "a mistyped uuid: no key to hide"
        );
        let de = "ungültige Eingabesyntax für Typ uuid: »sk_live_abcdefghijklmnopqrstuvwxyz0123«";
        assert!(
            !rewrite(de, &[call]).unwrap().0.contains("sk_live"),
            "translated: the value left out"
        );
    }
}
