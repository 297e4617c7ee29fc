//! The flush worker's second job: delivering webhooks and running maintenance.
//!
//! Webhooks: deliveries are queued with each event (`keypal.emit_events`, same
//! transaction). The worker claims the due ones (`keypal.claim_deliveries`: FOR UPDATE SKIP
//! LOCKED, a lease, at most `webhook_concurrency` in flight per webhook, none behind a
//! pending one of the same key), POSTs them on its delivery threads (src/delivery.rs), and
//! records every attempt (`keypal.finish_deliveries`). A commit that queued deliveries sets
//! the worker's latch; a claim also runs every flush interval, and when the next retry
//! falls due. A worker gone mid-delivery leaves its leases: the next one releases them at
//! its start, so a delivery may be made twice, never lost (at least once).
//!
//! Maintenance: `keypal.maintenance_step` every `keypal.maintenance_interval` (0: never),
//! batch after batch in transactions of their own, a bounded number per turn of the loop.

use crate::bgtx::guarded;
use crate::delivery::{Done, Job, Pool, MAX_IN_FLIGHT};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::IntoDatum;
use std::time::Duration;

/// While deliveries are in flight, how often the worker looks for their answers at the
/// latest (µs): each answer sets its latch (delivery.rs), this is only a safety net.
const POLL_US: i64 = 50_000;
/// The claim and the record of attempts do not wait for their commit's WAL flush: a crash
/// that loses one only makes a delivery again (a lease lost, or an answer not recorded),
/// which at-least-once allows; nothing is lost that is not made again.
const NO_FLUSH_WAIT: &str = "SELECT pg_catalog.set_config('synchronous_commit', 'off', true),
                                    pg_catalog.set_config('statement_timeout', '60s', true)";
/// Before a worker transaction commits: a commit that waits for a lock (NOTIFY's, when
/// maintenance made events) must not fail on the worker's lock_timeout — outside the
/// guard, that error would end the worker.
const BEFORE_COMMIT: &str = "SELECT pg_catalog.set_config('lock_timeout', '0', true)";
/// How long one turn's maintenance may run before the worker flushes again (µs).
const MAINTENANCE_TURN_US: i64 = 500_000;
/// After a claim that found nothing to hand out although something was due, how long
/// before the next (µs).
const NOTHING_DUE_US: i64 = 100_000;
/// Maintenance batches per turn of the worker's loop (the flush must not wait long).
const STEPS_PER_TURN: usize = 10;
const STEP_ROWS: i32 = 1000;

const CLAIM: &str = "SELECT c.webhook_id, c.event_id, c.attempt, c.url, c.secret, c.body,
                            c.timeout_ms, c.allow_private, c.next_due
                       FROM keypal.claim_deliveries($1, $2, $3) c";
const FINISH: &str = "SELECT keypal.finish_deliveries($1, $2, $3, $4, $5)";
const STEP: &str = "SELECT keypal.maintenance_step($1)";

/// What the worker keeps between turns for webhooks and maintenance.
#[derive(Default)]
pub struct Automation {
    pool: Option<Pool>,
    /// When the earliest delivery not in flight falls due (µs), as of the last claim.
    next_due: Option<i64>,
    last_claim: i64,
    /// Leases of an earlier worker released (done once, at the first turn).
    started: bool,
    /// When maintenance runs next (µs).
    maintenance_at: i64,
    /// Answers not recorded yet (the recording transaction failed): tried again.
    unrecorded: Vec<Done>,
}

fn now_us() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn maintenance_interval_us() -> i64 {
    i64::from(crate::gucs::MAINTENANCE_INTERVAL_MS.get()) * 1000
}

impl Automation {
    fn in_flight(&self) -> usize {
        self.pool.as_ref().map_or(0, Pool::in_flight)
    }

    /// How long the worker may sleep before this has something to do (µs), if it has.
    pub fn wait_us(&self, now: i64) -> Option<i64> {
        // With every thread busy, only an answer makes room: the next due one waits for it.
        let full = self.in_flight() >= MAX_IN_FLIGHT;
        let mut wait = self.next_due.filter(|_| !full).map(|d| d - now);
        if self.in_flight() > 0 {
            wait = Some(wait.map_or(POLL_US, |w| w.min(POLL_US)));
        }
        if maintenance_interval_us() > 0 {
            let m = self.maintenance_at - now;
            wait = Some(wait.map_or(m, |w| w.min(m)));
        }
        wait.map(|w| w.max(0))
    }

    /// Whether the worker must stay: deliveries in flight or due, or maintenance to run.
    pub fn busy(&self) -> bool {
        self.in_flight() > 0 || self.next_due.is_some() || maintenance_interval_us() > 0
    }

    /// One turn: records what deliveries ended and claims due ones (in one transaction),
    /// starts them, runs maintenance when due. `woken`: the latch was set (a commit queued
    /// deliveries, or a delivery thread answered).
    pub fn turn(&mut self, woken: bool, claim_every_us: i64) {
        let mut claim = woken;
        if !self.started {
            self.started = true;
            claim = true;
            let _ = crate::bgtx::run(
                "keypal worker: releasing leases",
                "SELECT keypal.release_leases()",
            );
        }
        let pool = self.pool.get_or_insert_with(Pool::default);
        let answered = pool.finished();
        claim |= !answered.is_empty();
        self.unrecorded.extend(answered);
        let now = now_us();
        let room = MAX_IN_FLIGHT.saturating_sub(pool.in_flight());
        let claim = room > 0
            && (claim
                || self.next_due.is_some_and(|d| d <= now)
                || now - self.last_claim >= claim_every_us);
        if claim || !self.unrecorded.is_empty() {
            let ask = claim.then(|| {
                let (ids, n) = pool.busy();
                (ids, n, room as i32)
            });
            let (recorded, claimed) = exchange(&self.unrecorded, ask);
            if recorded {
                self.unrecorded.clear();
            }
            if claim {
                self.last_claim = now;
                self.start(claimed, now);
            }
        }
        if maintenance_interval_us() > 0 && now >= self.maintenance_at {
            let more = maintain();
            self.maintenance_at = if more {
                now
            } else {
                now + maintenance_interval_us()
            };
        }
    }

    /// Starts what a claim handed out (its transaction committed).
    fn start(&mut self, claimed: Option<Claimed>, now: i64) {
        let Some((jobs, due)) = claimed else {
            self.next_due = None;
            return;
        };
        // Due, yet nothing to hand out (rows held by another transaction a moment): look
        // again shortly rather than at once.
        self.next_due = due.map(|d| {
            if jobs.is_empty() {
                d.max(now + NOTHING_DUE_US)
            } else {
                d
            }
        });
        let pool = self.pool.get_or_insert_with(Pool::default);
        for job in jobs {
            pool.submit(job);
        }
    }
}

/// One worker transaction: records finished attempts (false if that failed: they are kept
/// for the next turn; should the worker stop first, their leases run out and they are made
/// again) and, when asked (busy webhooks, deliveries in flight each, room), claims due
/// deliveries — each part in a subtransaction of its own.
fn exchange(done: &[Done], ask: Option<(Vec<i64>, Vec<i32>, i32)>) -> (bool, Option<Claimed>) {
    BackgroundWorker::transaction(|| {
        if crate::bgtx::pin_search_path().is_err() || Spi::run(NO_FLUSH_WAIT).is_err() {
            return (false, None);
        }
        let recorded = done.is_empty() || record(done);
        let claimed = ask.and_then(|(ids, n, room)| {
            guarded("keypal worker: claiming webhook deliveries", || {
                claim(ids, n, room)
            })
            .flatten()
        });
        let _ = Spi::run(BEFORE_COMMIT);
        (recorded, claimed)
    })
}

fn claim(busy_ids: Vec<i64>, busy_n: Vec<i32>, room: i32) -> Option<Claimed> {
    let args: [pgrx::datum::DatumWithOid; 3] = [busy_ids.into(), busy_n.into(), room.into()];
    Spi::connect(|c| {
        c.select(CLAIM, None, &args).map(|rows| {
            let mut jobs = Vec::new();
            let mut due = None;
            for r in rows {
                let Some(webhook_id) = r.get::<i64>(1).ok().flatten() else {
                    due = r
                        .get::<TimestampWithTimeZone>(9)
                        .ok()
                        .flatten()
                        .and_then(ts_us);
                    continue;
                };
                jobs.push(Job {
                    webhook_id,
                    event_id: r.get::<i64>(2).ok().flatten().unwrap_or_default(),
                    attempt: r.get::<i32>(3).ok().flatten().unwrap_or(1),
                    url: r.get::<String>(4).ok().flatten().unwrap_or_default(),
                    secret: r.get::<String>(5).ok().flatten().unwrap_or_default(),
                    body: r.get::<String>(6).ok().flatten().unwrap_or_default(),
                    timeout: Duration::from_millis(
                        r.get::<i64>(7).ok().flatten().unwrap_or(5000).max(1) as u64,
                    ),
                    allow_private: r.get::<bool>(8).ok().flatten().unwrap_or(false),
                });
            }
            (jobs, due)
        })
    })
    .ok()
}

/// What a claim handed out, and when the next delivery not handed out falls due (µs).
type Claimed = (Vec<Job>, Option<i64>);

fn ts_us(t: TimestampWithTimeZone) -> Option<i64> {
    t.into_datum().map(|d| d.value() as i64)
}

/// Records finished attempts, in a subtransaction of the current transaction; false if
/// that failed.
fn record(done: &[Done]) -> bool {
    let hooks: Vec<i64> = done.iter().map(|d| d.webhook_id).collect();
    let events: Vec<i64> = done.iter().map(|d| d.event_id).collect();
    let attempts: Vec<i32> = done.iter().map(|d| d.attempt).collect();
    let codes: Vec<Option<i32>> = done.iter().map(|d| d.status).collect();
    let errors: Vec<Option<String>> = done.iter().map(|d| d.error.clone()).collect();
    guarded("keypal worker: recording webhook deliveries", || {
        let args: [pgrx::datum::DatumWithOid; 5] = [
            hooks.into(),
            events.into(),
            attempts.into(),
            codes.into(),
            errors.into(),
        ];
        Spi::connect_mut(|c| c.update(FINISH, None, &args).map(|_| ())).ok()
    })
    .flatten()
    .is_some()
}

/// Up to STEPS_PER_TURN maintenance batches (for at most MAINTENANCE_TURN_US), each its own
/// transaction; whether more is left.
fn maintain() -> bool {
    let until = now_us() + MAINTENANCE_TURN_US;
    for _ in 0..STEPS_PER_TURN {
        if now_us() >= until || crate::bgtx::stopping() {
            return true;
        }
        let more = BackgroundWorker::transaction(|| {
            guarded("keypal worker: maintenance", || {
                crate::bgtx::pin_search_path().ok()?;
                let more = Spi::get_one_with_args::<bool>(STEP, &[STEP_ROWS.into()])
                    .ok()
                    .flatten();
                Spi::run(BEFORE_COMMIT).ok()?;
                more
            })
            .flatten()
        });
        if more != Some(true) {
            return false;
        }
    }
    true
}
