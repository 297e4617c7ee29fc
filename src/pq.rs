//! A client connection from the flush worker to another server, through libpq (the library
//! PostgreSQL's own clients use, linked as postgres_fdw links it): connecting and querying
//! without blocking, every wait on the worker's latch and the socket at once, under a
//! deadline — so a primary that does not answer holds the worker up for that long at most,
//! and a server shutdown or a dying postmaster is noticed at once.

use pgrx::pg_sys;
use std::ffi::{c_char, c_int, CStr, CString};
use std::time::Instant;

#[repr(C)]
struct PGconn {
    _opaque: [u8; 0],
}

#[repr(C)]
struct PGresult {
    _opaque: [u8; 0],
}

#[link(name = "pq")]
extern "C" {
    fn PQconnectStartParams(
        keywords: *const *const c_char,
        values: *const *const c_char,
        expand_dbname: c_int,
    ) -> *mut PGconn;
    fn PQconnectPoll(conn: *mut PGconn) -> c_int;
    fn PQstatus(conn: *const PGconn) -> c_int;
    fn PQsocket(conn: *const PGconn) -> c_int;
    fn PQerrorMessage(conn: *const PGconn) -> *const c_char;
    fn PQfinish(conn: *mut PGconn);
    fn PQsetnonblocking(conn: *mut PGconn, arg: c_int) -> c_int;
    fn PQsendQueryParams(
        conn: *mut PGconn,
        command: *const c_char,
        n_params: c_int,
        param_types: *const pg_sys::Oid,
        param_values: *const *const c_char,
        param_lengths: *const c_int,
        param_formats: *const c_int,
        result_format: c_int,
    ) -> c_int;
    fn PQflush(conn: *mut PGconn) -> c_int;
    fn PQconsumeInput(conn: *mut PGconn) -> c_int;
    fn PQisBusy(conn: *mut PGconn) -> c_int;
    fn PQgetResult(conn: *mut PGconn) -> *mut PGresult;
    fn PQresultStatus(res: *const PGresult) -> c_int;
    fn PQresultErrorMessage(res: *const PGresult) -> *const c_char;
    fn PQresultErrorField(res: *const PGresult, field: c_int) -> *const c_char;
    fn PQntuples(res: *const PGresult) -> c_int;
    fn PQgetisnull(res: *const PGresult, row: c_int, col: c_int) -> c_int;
    fn PQgetvalue(res: *const PGresult, row: c_int, col: c_int) -> *const c_char;
    fn PQclear(res: *mut PGresult);
}

const CONNECTION_OK: c_int = 0;
const POLLING_FAILED: c_int = 0;
const POLLING_READING: c_int = 1;
const POLLING_OK: c_int = 3;
const PGRES_COMMAND_OK: c_int = 1;
const PGRES_TUPLES_OK: c_int = 2;

/// Why a query gave no answer.
#[derive(Debug)]
pub enum Failure {
    /// The server answered with an error (its SQLSTATE and message).
    Refused { sqlstate: String, message: String },
    /// No answer: the connection failed, or the deadline passed.
    Lost(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused { sqlstate, message } => write!(f, "{message} (SQLSTATE {sqlstate})"),
            Failure::Lost(why) => f.write_str(why),
        }
    }
}

impl From<String> for Failure {
    fn from(why: String) -> Failure {
        Failure::Lost(why)
    }
}

/// An open connection; closed when dropped.
pub struct Conn {
    raw: *mut PGconn,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: the connection was made by PQconnectStartParams and is finished once; the
        // file descriptor it was counted as is given back.
        unsafe {
            PQfinish(self.raw);
            pg_sys::ReleaseExternalFD();
        }
    }
}

fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libpq's messages are NUL-terminated strings it owns.
    unsafe { CStr::from_ptr(p) }
        .to_string_lossy()
        .trim_end()
        .to_string()
}

impl Conn {
    /// Connects with `params` (keyword, value), the first `dbname` expanded as a connection
    /// string and later ones overriding what it says.
    pub fn open(params: &[(&str, &str)], deadline: Instant) -> Result<Conn, String> {
        let owned: Vec<(CString, CString)> = params
            .iter()
            .map(|(k, v)| Ok((CString::new(*k)?, CString::new(*v)?)))
            .collect::<Result<_, std::ffi::NulError>>()
            .map_err(|_| "a connection setting holds a NUL byte".to_string())?;
        let mut keys: Vec<*const c_char> = owned.iter().map(|(k, _)| k.as_ptr()).collect();
        let mut values: Vec<*const c_char> = owned.iter().map(|(_, v)| v.as_ptr()).collect();
        keys.push(std::ptr::null());
        values.push(std::ptr::null());
        // SAFETY: counts the connection's socket against the server's file limit, as
        // postgres_fdw does, before libpq opens it.
        if !unsafe { pg_sys::AcquireExternalFD() } {
            return Err("no file descriptor left for a connection".into());
        }
        // SAFETY: NULL-terminated arrays of C strings that outlive the call.
        let raw = unsafe { PQconnectStartParams(keys.as_ptr(), values.as_ptr(), 1) };
        if raw.is_null() {
            // SAFETY: the descriptor counted above is not used.
            unsafe { pg_sys::ReleaseExternalFD() };
            return Err("out of memory for a connection".into());
        }
        let conn = Conn { raw };
        if conn.status_bad() {
            return Err(conn.error());
        }
        // libpq's loop: start as if polling had asked to write, then do what each poll asks.
        let mut poll = 2;
        loop {
            match poll {
                POLLING_OK => break,
                POLLING_FAILED => return Err(conn.error()),
                POLLING_READING => conn.wait(pg_sys::WL_SOCKET_READABLE, deadline)?,
                _ => conn.wait(pg_sys::WL_SOCKET_WRITEABLE, deadline)?,
            }
            // SAFETY: a live connection handle.
            poll = unsafe { PQconnectPoll(raw) };
        }
        // SAFETY: a live, connected handle.
        if unsafe { PQsetnonblocking(raw, 1) } != 0 {
            return Err(conn.error());
        }
        Ok(conn)
    }

    fn status_bad(&self) -> bool {
        // CONNECTION_BAD is 1; the others are steps of a connection under way.
        // SAFETY: a live connection handle.
        unsafe { PQstatus(self.raw) == 1 }
    }

    fn error(&self) -> String {
        // SAFETY: a live connection handle.
        text(unsafe { PQerrorMessage(self.raw) })
    }

    /// Waits until the socket can be read (or written, or either), or the deadline passes
    /// (Err). A latch set meanwhile is noted (bgtx::after_wait) and the wait goes on; once
    /// the worker is told to stop, it waits a second more at most. A termination (a recovery
    /// conflict's) is served.
    fn wait(&self, socket_event: u32, deadline: Instant) -> Result<(), String> {
        let mut deadline = deadline;
        loop {
            if crate::bgtx::stopping() {
                deadline = deadline.min(Instant::now() + std::time::Duration::from_secs(1));
            }
            // (Only a termination — a recovery conflict's, DROP DATABASE's — is served here: a
            // cancel would end the worker, which runs no statement to cancel.)
            // SAFETY: reads a flag the signal handlers set.
            if unsafe { (&raw const pg_sys::ProcDiePending).read_volatile() } != 0 {
                pgrx::check_for_interrupts!();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out".into());
            }
            // SAFETY: this process's latch and the connection's socket (asked for anew each
            // time: libpq may change it while connecting).
            let rc = unsafe {
                pg_sys::WaitLatchOrSocket(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET
                        | pg_sys::WL_TIMEOUT
                        | pg_sys::WL_POSTMASTER_DEATH
                        | socket_event) as i32,
                    PQsocket(self.raw),
                    left.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_long,
                    pg_sys::PG_WAIT_EXTENSION,
                )
            };
            crate::bgtx::after_wait(rc);
            if rc & (pg_sys::WL_SOCKET_READABLE | pg_sys::WL_SOCKET_WRITEABLE) as i32 != 0 {
                return Ok(());
            }
        }
    }

    /// Runs `sql` with text parameters; the first row's first value (None: no row, or
    /// NULL). Err says whether the server refused (its error), or why there is no answer.
    pub fn query(
        &self,
        sql: &str,
        params: &[&str],
        deadline: Instant,
    ) -> Result<Option<String>, Failure> {
        let sql = CString::new(sql).map_err(|_| "a query holds a NUL byte".to_string())?;
        let owned: Vec<CString> = params
            .iter()
            .map(|p| CString::new(*p))
            .collect::<Result<_, _>>()
            .map_err(|_| "a parameter holds a NUL byte".to_string())?;
        let values: Vec<*const c_char> = owned.iter().map(|p| p.as_ptr()).collect();
        // SAFETY: the strings outlive the call; NULL types, lengths and formats mean text.
        let sent = unsafe {
            PQsendQueryParams(
                self.raw,
                sql.as_ptr(),
                values.len() as c_int,
                std::ptr::null(),
                values.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            )
        };
        if sent == 0 {
            return Err(self.error().into());
        }
        // SAFETY (each call below): a live connection handle in non-blocking mode.
        loop {
            match unsafe { PQflush(self.raw) } {
                0 => break,
                1 => {
                    // (libpq: wait to write or to read, and read what came.)
                    self.wait(
                        pg_sys::WL_SOCKET_WRITEABLE | pg_sys::WL_SOCKET_READABLE,
                        deadline,
                    )?;
                    if unsafe { PQconsumeInput(self.raw) } == 0 {
                        return Err(self.error().into());
                    }
                }
                _ => return Err(self.error().into()),
            }
        }
        let mut value = None;
        let mut failure = None;
        loop {
            while unsafe { PQisBusy(self.raw) } != 0 {
                self.wait(pg_sys::WL_SOCKET_READABLE, deadline)?;
                if unsafe { PQconsumeInput(self.raw) } == 0 {
                    return Err(self.error().into());
                }
            }
            let res = unsafe { PQgetResult(self.raw) };
            if res.is_null() {
                break;
            }
            // SAFETY: a result libpq handed over, cleared once.
            unsafe {
                let status = PQresultStatus(res);
                if status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK {
                    failure.get_or_insert_with(|| Failure::Refused {
                        sqlstate: text(PQresultErrorField(res, b'C' as c_int)),
                        message: text(PQresultErrorMessage(res)),
                    });
                } else if PQntuples(res) > 0 && PQgetisnull(res, 0, 0) == 0 {
                    value = Some(text(PQgetvalue(res, 0, 0)));
                }
                PQclear(res);
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(value),
        }
    }

    /// Whether the connection is still usable (not broken by an earlier failure).
    pub fn ok(&self) -> bool {
        // SAFETY: a live connection handle.
        unsafe { PQstatus(self.raw) == CONNECTION_OK }
    }
}
