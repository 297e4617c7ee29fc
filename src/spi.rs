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
    plan: AtomicPtr<pg_sys::_SPI_plan>,
}

impl Stmt {
    pub const fn new(sql: &'static CStr, types: &'static [pg_sys::Oid]) -> Stmt {
        Stmt {
            sql,
            types,
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
            let p = pg_sys::SPI_prepare(
                self.sql.as_ptr(),
                self.types.len() as i32,
                self.types.as_ptr().cast_mut(),
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
        // have one entry per parameter and outlive the call.
        unsafe {
            let rc = pg_sys::SPI_execute_plan(
                self.plan(),
                values.as_mut_ptr(),
                nulls.as_ptr(),
                read_only,
                limit,
            );
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
