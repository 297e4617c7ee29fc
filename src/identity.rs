//! The identity `keypal_authenticate` establishes for the current transaction.
//!
//! It lives in backend memory, not in a GUC, so `SET`/`set_config` cannot forge it, and a
//! transaction callback forgets it at commit or abort, so it never leaks into the next
//! transaction. A savepoint rolled back forgets an identity set inside it.

use pgrx::pg_sys;
use serde_json::Value;
use std::cell::RefCell;

#[derive(Clone, Debug)]
pub struct Identity {
    pub key_id: pgrx::Uuid,
    pub owner_id: String,
    pub org_id: Option<String>,
    pub scopes: Vec<String>,
    pub resources: Option<Value>,
    /// The subtransaction that set it: rolling that back forgets the identity.
    subxact: pg_sys::SubTransactionId,
}

thread_local! {
    static CURRENT: RefCell<Option<Identity>> = const { RefCell::new(None) };
}

pub fn set(
    key_id: pgrx::Uuid,
    owner_id: String,
    org_id: Option<String>,
    scopes: Vec<String>,
    resources: Option<Value>,
) {
    // SAFETY: reads the current subtransaction id.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    CURRENT.with(|c| {
        *c.borrow_mut() = Some(Identity {
            key_id,
            owner_id,
            org_id,
            scopes,
            resources,
            subxact,
        })
    });
}

pub fn with<R>(f: impl FnOnce(Option<&Identity>) -> R) -> R {
    CURRENT.with(|c| f(c.borrow().as_ref()))
}

fn clear() {
    CURRENT.with(|c| *c.borrow_mut() = None);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(_event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    // Every transaction end (commit, abort, prepare, and their pre- events) forgets it.
    clear();
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    CURRENT.with(|c| {
        let mut cur = c.borrow_mut();
        let Some(id) = cur.as_mut() else { return };
        if id.subxact != my_subid {
            return;
        }
        match event {
            pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => *cur = None,
            pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => id.subxact = parent_subid,
            _ => {}
        }
    });
}

pub fn init() {
    // SAFETY: registers backend-lifetime callbacks once, from _PG_init.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}
