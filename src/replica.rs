//! Counts across servers. A standby's flush worker ships what verify counted there — last
//! uses, hours, quota counts, rate-window admissions — to the primary (`Shipper`, over a
//! libpq connection: pq.rs), every flush interval, in numbered batches. On the primary,
//! `keypal.replica_counts` adds each batch to the shared entries (limits/entry.rs `absorb`),
//! whose worker writes it like the primary's own counts, and answers with each key's global
//! count, on which the standby then decides.
//!
//! Nothing is counted twice: the primary records each standby worker's last batch number in
//! the transaction that takes the batch, and a batch sent again (its answer was lost) is
//! answered without being added. A batch not answered stays in flight, and is sent again, as
//! it was, until it is.

use crate::limits::batch;
use crate::limits::entry::{Global, Outcome, Taken};
use crate::limits::shmem;
use crate::pq;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a standby's worker keeps between flushes to ship its counts.
pub struct Shipper {
    /// This worker's name for itself on the primary (random: a new worker's batches count
    /// afresh; of a batch in flight when a worker dies, the rate-window admissions are lost
    /// and the quota counts and hours shipped again, under the next worker's name).
    id: String,
    next: i64,
    /// A batch sent and not answered, with its number: sent again as it is.
    held: Option<(i64, Vec<Taken>)>,
    conn: Option<pq::Conn>,
    /// The connection string `conn` was opened with (a new one is used at once).
    conninfo: String,
    /// Since when the primary has refused its batches (µs; None: it took the last one).
    refused_since: Option<i64>,
    /// When it last warned that shipping failed (µs).
    warned_at: i64,
}

impl Default for Shipper {
    fn default() -> Shipper {
        Shipper {
            id: format!("{:032x}", rand::random::<u128>()),
            next: 1,
            held: None,
            conn: None,
            conninfo: String::new(),
            refused_since: None,
            warned_at: i64::MIN,
        }
    }
}

/// What became of a batch.
#[derive(PartialEq, Eq)]
pub enum Shipped {
    /// The primary took it: each key's global count.
    Answered(HashMap<[u8; 16], Global>),
    /// Nowhere to ship to (no connection string), or the primary refused the batch for good
    /// (a batch it cannot read, or a refusal that lasted give_up_us — a missing grant, say):
    /// the batch is given up, its counts kept in this standby's entries only (until the
    /// next answer for the key replaces them).
    Local,
    /// Not answered: the batch is held, in flight, to be sent again.
    Held,
}

const SHIP: &str = "SELECT keypal.replica_counts($1, $2::pg_catalog.int8, $3)";

impl Shipper {
    /// The batch held from an earlier flush, if any: shipped (or, once promoted, written)
    /// before anything new is taken.
    pub fn held_batch(&self) -> Option<Vec<Taken>> {
        self.held.as_ref().map(|(_, b)| b.clone())
    }

    /// The held batch was written here (the standby was promoted): it will never be shipped.
    pub fn forget_held(&mut self) {
        if self.held.take().is_some() {
            self.conn = None;
        }
    }

    /// Ships `batch` — the held one, under its number, if there is one — (quota counts only
    /// when `with_quota`) to the primary's database `db`. Waits for the answer until
    /// `deadline` at most.
    pub fn ship(
        &mut self,
        batch: Vec<Taken>,
        db: &str,
        with_quota: bool,
        deadline: Instant,
    ) -> Shipped {
        let number = self.held.take().map_or(self.next, |(n, _)| n);
        let Some(conninfo) = conninfo() else {
            // Counted here only; its number is never used again (the primary may have taken
            // a batch under it whose answer was lost).
            self.next = self.next.max(number + 1);
            self.conn = None;
            return Shipped::Local;
        };
        let counts = batch::encode(&batch, with_quota);
        let result = self.send(&conninfo, db, number, &counts, deadline);
        // SAFETY: reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        let shipped = match &result {
            Ok(answer) => {
                self.refused_since = None;
                Shipped::Answered(answer.iter().cloned().collect())
            }
            Err(pq::Failure::Refused { sqlstate, .. }) if !transient(sqlstate) => {
                let since = *self.refused_since.get_or_insert(now);
                if sqlstate.starts_with("22") || now - since >= give_up_us() {
                    Shipped::Local
                } else {
                    Shipped::Held
                }
            }
            Err(_) => Shipped::Held,
        };
        if shipped == Shipped::Held {
            self.held = Some((number, batch));
        } else {
            self.next = self.next.max(number + 1);
        }
        if let Err(e) = result {
            self.conn = None;
            if now.saturating_sub(self.warned_at) >= 60_000_000 {
                self.warned_at = now;
                let what = if shipped == Shipped::Held {
                    "they are kept and sent again"
                } else {
                    "they are counted on this standby only"
                };
                pgrx::warning!(
                    "keypal: could not ship this standby's counts to the primary ({e}); {what}"
                );
            }
        }
        shipped
    }
}

/// Whether the primary's error passes by itself (a cancel, a timeout, a lock, a lack of
/// resources, a conflict, a lost connection, a server read-only for now, or an error libpq
/// made, with no SQLSTATE): the batch is sent again. Any other refusal (a missing grant, a
/// function being replaced) is given up after give_up_us; a batch the primary cannot read
/// (class 22) at once.
fn transient(sqlstate: &str) -> bool {
    sqlstate.is_empty()
        || ["08", "25", "40", "53", "55", "57"]
            .iter()
            .any(|class| sqlstate.starts_with(class))
}

/// How long the primary may refuse batches before they are given up: ten flush intervals,
/// from 2 s to a minute (a GRANT made again, an extension update, pass within it; a batch
/// held longer pins its entries in this standby's memory).
fn give_up_us() -> i64 {
    (i64::from(crate::gucs::FLUSH_INTERVAL_MS.get()) * 10_000).clamp(2_000_000, 60_000_000)
}

impl Shipper {
    fn send(
        &mut self,
        conninfo: &str,
        db: &str,
        number: i64,
        counts: &str,
        deadline: Instant,
    ) -> Result<Vec<([u8; 16], Global)>, pq::Failure> {
        if self.conn.as_ref().is_none_or(|c| !c.ok()) || self.conninfo != conninfo {
            self.conn = None;
            self.conninfo = conninfo.to_string();
            let params = [
                ("dbname", conninfo),
                ("dbname", db),
                ("target_session_attrs", "read-write"),
                ("fallback_application_name", "keypal standby worker"),
            ];
            let conn = pq::Conn::open(&params, deadline)?;
            // Whatever the primary's default: a serializable commit could fail its check
            // after the batch was added (replica_counts refuses to run so).
            conn.query(
                "SET default_transaction_isolation TO 'read committed'",
                &[],
                deadline,
            )?;
            self.conn = Some(conn);
        }
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| "no connection".to_string())?;
        let number = number.to_string();
        let text = conn
            .query(SHIP, &[&self.id, &number, counts], deadline)?
            .ok_or_else(|| "no answer".to_string())?;
        Ok(batch::decode_answer(&text)?)
    }
}

/// How long a standby's worker waits for the primary at each flush.
pub fn ship_deadline() -> Instant {
    let interval = crate::gucs::FLUSH_INTERVAL_MS.get().max(10) as u64;
    Instant::now() + Duration::from_millis(interval.clamp(2_000, 10_000))
}

/// Whether this standby has somewhere to ship its counts.
pub fn configured() -> bool {
    conninfo().is_some()
}

/// The connection string to ship by: keypal.primary_conninfo, else the server's
/// primary_conninfo; None when both are empty.
fn conninfo() -> Option<String> {
    let own = crate::gucs::PRIMARY_CONNINFO
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|c| !c.trim().is_empty());
    own.or_else(|| crate::gucs::current_setting("primary_conninfo"))
        .filter(|c| !c.trim().is_empty())
}

/// What the primary's worker is told of a batch's outcome, per key: shipped with its answer,
/// or (nowhere to ship) counted here only.
pub fn outcome(shipped: &Shipped, t: &Taken) -> Outcome {
    match shipped {
        // (Every key of an answered batch has heard the news, if only that there is none.)
        Shipped::Answered(answer) => {
            Outcome::shipped(t, Some(answer.get(&t.key).cloned().unwrap_or_default()))
        }
        Shipped::Local | Shipped::Held => Outcome::all(true, t),
    }
}

/// On the primary: takes standby `replica`'s batch number `number` (`counts`, limits/batch.rs)
/// into the shared entries and answers with each key's global count. A batch number not
/// above the last one taken from that standby is answered and not added again.
fn take_batch(replica: &str, number: i64, counts: &str) -> String {
    // SAFETY: reads shared recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "keypal.replica_counts: this server is a standby; counts go to the primary".into(),
        );
    }
    if replica.is_empty() || replica.len() > 64 || number < 1 {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "keypal.replica_counts: replica must be 1 to 64 characters and batch at least 1".into(),
        );
    }
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let items: Vec<Taken> = batch::decode(counts)
        .unwrap_or_else(|e| {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("keypal.replica_counts: counts is not a batch of counts: {e}"),
            )
        })
        .into_iter()
        .map(|t| batch::fit(t, now))
        .collect();
    // SAFETY: reads the transaction's isolation level.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_SERIALIZABLE as i32 {
        // (Its commit may fail a serialization check after the batch was added.)
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "keypal.replica_counts: call it in a READ COMMITTED or REPEATABLE READ transaction"
                .into(),
        );
    }
    // SAFETY: reads the transaction's nesting level.
    if unsafe { pg_sys::GetCurrentTransactionNestLevel() } > 1 {
        // (The batch is added when the transaction commits: a subtransaction rolled back
        // would take its number back, not the batch.)
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
            "keypal.replica_counts: call it in a transaction of its own, not in a subtransaction"
                .into(),
        );
    }
    let fresh = record_number(replica, number);
    let catalog = crate::catalog::get();
    let resolution = catalog.last_used_resolution_us;
    // First every key is prepared (what may fail, fails here, with nothing added); the batch
    // is added whole as the transaction commits, with its number (interrupts are held from
    // just after): a batch whose transaction fails — an error, a cancel, a timeout, a lost
    // connection — is not counted at all, and its number stays free.
    let mut answer = Vec::with_capacity(items.len());
    for t in &items {
        let id = pgrx::Uuid::from_bytes(t.key)
            .into_datum()
            .unwrap_or(pg_sys::Datum::from(0));
        let load = |start| crate::limits::enforce::quota_used_at(&catalog, id, start);
        match shmem::absorb_prepare(t, fresh, resolution, load) {
            Ok(global) => answer.push((t.key, global)),
            Err(full) => full.raise("a standby's counts cannot be taken"),
        }
    }
    if fresh && !items.is_empty() {
        crate::worker::ensure();
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PreCommit, move || {
            shmem::absorb_commit(&items)
        });
        // (A prepared transaction would carry the batch past its number.)
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PrePrepare, || {
            crate::errors::raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "keypal.replica_counts cannot be part of a prepared transaction".into(),
            )
        });
    }
    batch::encode_answer(&answer)
}

/// Records `number` as standby `replica`'s last batch: false when it is not above the last
/// one recorded (the batch was taken before). A new standby worker's first batch also drops
/// the numbers of workers not heard from for a week.
fn record_number(replica: &str, number: i64) -> bool {
    const RECORD: &str = "INSERT INTO keypal.replica_batches AS b (replica, batch)
                          VALUES ($1, $2)
                          ON CONFLICT (replica) DO UPDATE
                             SET batch = excluded.batch, at = pg_catalog.now()
                           WHERE b.batch OPERATOR(pg_catalog.<) excluded.batch
                          RETURNING true";
    const PRUNE: &str = "DELETE FROM keypal.replica_batches
                          WHERE at OPERATOR(pg_catalog.<)
                                (pg_catalog.now() OPERATOR(pg_catalog.-) interval '7 days')";
    Spi::connect_mut(|client| {
        let fresh = client
            .update(RECORD, Some(1), &[replica.into(), number.into()])
            .map(|rows| !rows.is_empty())
            .unwrap_or_else(|e| pgrx::error!("keypal.replica_counts: {e}"));
        if fresh && number == 1 {
            let _ = client.update(PRUNE, None, &[]);
        }
        fresh
    })
}

#[pg_schema]
mod keypal {
    use super::*;

    /// On the primary: adds a standby worker's batch of counts to the shared entries (once
    /// per batch number) and answers with each key's global count. Only the role a standby
    /// ships as (keypal.primary_conninfo, else primary_conninfo) should be granted it.
    #[pg_extern(volatile, parallel_unsafe, security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn replica_counts(replica: &str, batch: i64, counts: &str) -> String {
        crate::spi::passing_errors(|| take_batch(replica, batch, counts))
    }
}
