//! The SPI plumbing under the verify hot path: statements prepared once per backend and
//! kept (SPI_keepplan), executed with bound parameters, read column by column.
//!
//! This is plain C SPI rather than pgrx's `Spi` wrapper so the hot path allocates nothing
//! it does not need: parameters go in as datums, results come out as datums.

use crate::errors::raise;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A statement prepared on first use and kept for the life of the backend. The plan cache
/// re-plans it after DDL (e.g. DROP/CREATE EXTENSION), since it keeps the query text.
pub struct Stmt {
    sql: &'static CStr,
    types: &'static [pg_sys::Oid],
    /// Always the one generic plan (no custom plans for particular arguments).
    generic: bool,
    plan: AtomicPtr<pg_sys::_SPI_plan>,
}

impl Stmt {
    pub const fn new(sql: &'static CStr, types: &'static [pg_sys::Oid]) -> Stmt {
        Stmt {
            sql,
            types,
            generic: false,
            plan: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// A statement always run by its generic plan: for one whose plan does not depend on
    /// its arguments, where a custom plan for a large one would be compiled by JIT.
    pub const fn generic(sql: &'static CStr, types: &'static [pg_sys::Oid]) -> Stmt {
        Stmt {
            sql,
            types,
            generic: true,
            plan: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    fn plan(&self) -> pg_sys::SPIPlanPtr {
        let p = self.plan.load(Ordering::Relaxed);
        if !p.is_null() {
            return p;
        }
        // SAFETY: called inside an SPI connection (Connection::with), with argument types
        // matching the statement's parameters.
        unsafe {
            let p = pg_sys::SPI_prepare_cursor(
                self.sql.as_ptr(),
                self.types.len() as i32,
                self.types.as_ptr().cast_mut(),
                if self.generic {
                    pg_sys::CURSOR_OPT_GENERIC_PLAN as i32
                } else {
                    0
                },
            );
            if p.is_null() || pg_sys::SPI_keepplan(p) != 0 {
                raise(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    "keypal: could not prepare a statement".into(),
                );
            }
            self.plan.store(p, Ordering::Relaxed);
            p
        }
    }

    /// Executes with `args` (None = NULL); returns the number of rows processed.
    /// `read_only` statements run under the caller's snapshot and never write.
    pub fn exec(
        &self,
        _conn: &Connection,
        args: &[Option<pg_sys::Datum>],
        read_only: bool,
        limit: i64,
    ) -> u64 {
        debug_assert_eq!(args.len(), self.types.len());
        let mut values: Vec<pg_sys::Datum> = args
            .iter()
            .map(|a| a.unwrap_or(pg_sys::Datum::from(0usize)))
            .collect();
        let nulls: Vec<std::ffi::c_char> = args
            .iter()
            .map(|a| if a.is_some() { b' ' } else { b'n' } as std::ffi::c_char)
            .collect();
        // SAFETY: the plan was prepared with exactly these argument types; values and nulls
        // have one entry per parameter and outlive the call. SPI leaves its own call-long
        // context current after preparing and executing: the caller's (a chunk's, reset
        // after it: create.rs) is made current again, so that what the caller allocates
        // next is freed with it. (The result's tuple table is in SPI's context either way.)
        unsafe {
            let caller = pg_sys::CurrentMemoryContext;
            let plan = self.plan();
            let rc = pg_sys::SPI_execute_plan(
                plan,
                values.as_mut_ptr(),
                nulls.as_ptr(),
                read_only,
                limit,
            );
            pg_sys::MemoryContextSwitchTo(caller);
            if rc < 0 {
                raise(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    format!("keypal: SPI_execute_plan failed: {rc}"),
                );
            }
            pg_sys::SPI_processed
        }
    }
}

/// Runs `f` (SPI work that may raise an error in PostgreSQL code, e.g. a helper refusing an
/// argument) and passes such an error on with its SQLSTATE, message, detail and hint. (pgrx
/// would otherwise add the Rust backtrace to its DETAIL when the server runs with
/// RUST_BACKTRACE set.) What is not passed on: its CONTEXT, the names of the objects it
/// names (schema, table, column, constraint) and its source location — fine for keypal's
/// own helpers' refusals, which say everything in the message; not for errors a caller must
/// tell apart by constraint name. FATAL and PANIC never reach here (they do not return).
/// A cancel or a timeout stays the ERROR it was, with its SQLSTATE.
pub fn passing_errors<R>(f: impl FnOnce() -> R) -> R {
    use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
    // (Unwind safety: an error ends the transaction; nothing of f's state is used after.)
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .catch_others(|e| match e {
            CaughtError::PostgresError(r) => {
                let mut fresh =
                    ErrorReport::new(r.sql_error_code(), r.message().to_owned(), "keypal");
                if let Some(d) = r.detail() {
                    fresh = fresh.set_detail(d.to_owned());
                }
                if let Some(h) = r.hint() {
                    fresh = fresh.set_hint(h.to_owned());
                }
                fresh.report(pgrx::PgLogLevel::ERROR);
                unreachable!("ERROR does not return")
            }
            other => other.rethrow(),
        })
        .execute()
}

/// A column's values as a parameter: for a statement over arrays (`one` false) the array;
/// for its one-row twin (`one` true: a statement from values, cheaper to start) the value.
///
/// An array's elements are each made in a memory context that is reset after it, and only
/// their copies are kept: converting a value can leave garbage behind in the current
/// context (jsonb_in's parser state, about 3.7 KB a value), which the SPI connection's
/// context would keep to its end — 10 GB for a million specs in one call, before this.
pub fn column<T>(values: Vec<Option<T>>, one: bool) -> Option<pg_sys::Datum>
where
    T: pgrx::IntoDatum,
{
    use pgrx::IntoDatum;
    if one {
        // (one value's garbage is freed with the connection, at the end of the call)
        return values.into_iter().next().flatten().into_datum();
    }
    let elem = T::type_oid();
    let mut scratch = pgrx::PgMemoryContexts::new("keypal column");
    // SAFETY: the array builder lives in a context of its own under the current one (freed
    // by makeArrayResult) and copies each element as it is added; an element is made in
    // scratch and added before scratch is reset.
    unsafe {
        let state = pg_sys::initArrayResult(elem, pg_sys::CurrentMemoryContext, true);
        for v in values {
            let d = scratch.switch_to(|_| v.into_datum());
            pg_sys::accumArrayResult(
                state,
                d.unwrap_or(pg_sys::Datum::from(0usize)),
                d.is_none(),
                elem,
                pg_sys::CurrentMemoryContext,
            );
            scratch.reset();
        }
        Some(pg_sys::makeArrayResult(state, pg_sys::CurrentMemoryContext))
    }
}

/// An open SPI connection, finished when dropped (but not while an error unwinds: the
/// transaction's abort cleans SPI up then).
pub struct Connection(());

impl Connection {
    /// Runs `f` inside an SPI connection. What `f` returns must not point into SPI memory
    /// (it is freed when the connection finishes).
    pub fn with<R>(f: impl FnOnce(&Connection) -> R) -> R {
        // SAFETY: SPI_connect is paired with SPI_finish in Drop.
        if unsafe { pg_sys::SPI_connect() } != pg_sys::SPI_OK_CONNECT as i32 {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "keypal: SPI_connect failed".into(),
            );
        }
        let conn = Connection(());
        f(&conn)
    }

    /// Column `col` (1-based) of result row `row` of the last statement, or None for NULL.
    pub fn get(&self, row: usize, col: i32) -> Option<pg_sys::Datum> {
        // SAFETY: reads the tuple table of the last statement run on this connection;
        // callers pass row < SPI_processed and a column the statement returns.
        unsafe {
            let tt = pg_sys::SPI_tuptable;
            let tuple = *(*tt).vals.add(row);
            let mut is_null = false;
            let d = pg_sys::SPI_getbinval(tuple, (*tt).tupdesc, col, &mut is_null);
            (!is_null).then_some(d)
        }
    }

    pub fn get_bool(&self, row: usize, col: i32) -> bool {
        self.get(row, col).is_some_and(|d| d.value() != 0)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: paired with the SPI_connect in open().
            unsafe {
                pg_sys::SPI_finish();
            }
        }
    }
}
