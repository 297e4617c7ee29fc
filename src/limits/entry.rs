//! One key's verify-side state, as kept in shared memory: the arithmetic, pure Rust.
//!
//! An entry holds what verify records for one key of one database — when it was last used,
//! its requests per hour, its rate window and its quota count — until the flush worker has
//! written it to the tables (`take`, then `confirm`). Nothing here is transactional: a count
//! made is made, whatever becomes of the caller's transaction.
//!
//! Quota use is `base` (what the table holds, as read or since confirmed written) plus
//! `inflight` (taken by the worker for the flush under way) plus `pending` (counted since).
//! `seq` changes whenever the worker takes or confirms counts, and a re-created entry gets a
//! new one: a table read is used as `base` only if no flush of the key began or ended while
//! it ran and nothing was in flight (so the read saw exactly the counts in `base`).
//!
//! Across servers (a primary and its streaming standbys): a standby's worker ships what its
//! entries counted to the primary (`take`, then `confirm` with the primary's answer), where
//! `absorb` adds it to the primary's entry, whose worker writes it. The answer is the key's
//! global count — quota use and rate-window buckets — which the standby decides on, plus what
//! it counted since: `others` holds, per bucket, what the other servers admitted as last
//! heard (on the primary: what standbys shipped).

use super::quota::{self, OnExceeded};
use super::window::{Decision, Limit, Window, BUCKETS};

/// "No time": a timestamp that is not there.
pub const NEVER: i64 = i64::MIN;

/// What an entry is found by: a key of a database (two databases may hold the same key
/// ids — a restored copy does — and each counts its own).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryKey {
    pub db: u32,
    pub key: [u8; 16],
}

/// Requests counted in the hour starting at `start` (UTC, timestamptz microseconds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hour {
    pub start: i64,
    pub n: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct QuotaCount {
    pub loaded: bool,
    pub period_start: i64,
    pub base: i64,
    pub pending: i64,
    pub inflight: i64,
    pub seq: u64,
}

impl QuotaCount {
    pub fn total(&self) -> i64 {
        self.base
            .saturating_add(self.inflight)
            .saturating_add(self.pending)
    }
}

#[repr(C)]
#[derive(Clone)]
pub struct Entry {
    pub k: EntryKey,
    /// The newest admitted verify (NEVER: none yet).
    pub last_seen: i64,
    /// `last_used_at` as the table holds it, as far as this entry knows (NEVER: null).
    pub last_written: i64,
    /// The `last_used_at` being written by the flush under way (NEVER: none).
    pub last_used_inflight: i64,
    pub hours: [Hour; 2],
    pub hours_inflight: [Hour; 2],
    pub window_us: i64,
    pub window: Window,
    pub quota: QuotaCount,
    /// A warning quota was crossed: the use that crossed it, for the `quota.exceeded` event
    /// (0: none).
    pub warn_used: i64,
    pub warn_inflight: i64,
    /// Since when the flush worker has not found the key in the table (0: found).
    pub missing_since: i64,
    /// In the flush worker's queue (shmem.rs): set with the first change to write, cleared
    /// when the worker takes the entry's changes.
    pub queued: bool,
    /// What other servers admitted in the buckets of `window`, as last heard.
    pub others: Window,
    /// On a standby: its own admissions not yet shipped to the primary; whether a batch
    /// with some is under way (the batch holds them: a worker that dies with it loses them).
    pub unshipped: Window,
    pub shipping: bool,
    /// On a standby: a limited verify since the last batch (the next one fetches the key's
    /// global count, even with nothing to ship).
    pub fetch: bool,
    /// On a standby: when the flush that last brought the key's global count began (NEVER:
    /// not yet).
    pub heard_at: i64,
}

impl Entry {
    /// A new entry for `k`: its last use as written is not known until the worker's first
    /// write of it reports what the table holds.
    pub fn new(k: EntryKey, seq: u64) -> Entry {
        Entry {
            k,
            last_seen: NEVER,
            last_written: NEVER,
            last_used_inflight: NEVER,
            hours: [Hour::default(); 2],
            hours_inflight: [Hour::default(); 2],
            window_us: 0,
            window: Window::default(),
            quota: QuotaCount {
                seq,
                ..QuotaCount::default()
            },
            warn_used: 0,
            warn_inflight: 0,
            missing_since: 0,
            queued: false,
            others: Window::default(),
            unshipped: Window::default(),
            shipping: false,
            fetch: false,
            heard_at: NEVER,
        }
    }
}

/// Where a verify is decided: on a standby that ships its counts (`replica`), and whether
/// limits are global (every server's admissions count against them) rather than split into
/// per-server shares (keypal_configure(limit_split => n)).
/// `stale_us`: how old a standby's global count may be before a verify asks for news.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scope {
    pub replica: bool,
    pub global: bool,
    pub stale_us: i64,
}

/// Whether a standby must hear the key's global count before deciding: it has limits that
/// count across servers and has not heard it within `stale_us`.
pub fn wants_news(e: &Entry, ask: &Ask, scope: Scope, now: i64) -> bool {
    scope.replica
        && scope.global
        && scope.stale_us > 0
        && (ask.rate.is_some() || ask.quota.is_some())
        && (e.heard_at == NEVER || now.saturating_sub(e.heard_at) > scope.stale_us)
}

/// What verify asks of the limits for one request.
pub struct Ask {
    pub rate: Option<Limit>,
    pub quota: Option<QuotaAsk>,
    pub cost: i64,
}

pub struct QuotaAsk {
    pub limit: i64,
    /// Start of the current quota period (timestamptz microseconds).
    pub period_start: i64,
    pub on_exceeded: OnExceeded,
}

#[derive(Default, Debug)]
pub struct Answer {
    pub rate: Option<Decision>,
    /// Quota use before this request, and what the quota says about it.
    pub quota_used: Option<i64>,
    pub quota: quota::Judgement,
}

impl Answer {
    /// Whether the request was admitted (and so counted).
    pub fn admitted(&self) -> bool {
        self.rate.is_none_or(|d| d.allowed) && !self.quota.blocked
    }
}

/// Whether the entry must read the key's use in the quota period starting `period_start`
/// from the table before counting in it.
pub fn needs_base(e: &Entry, period_start: Option<i64>) -> bool {
    period_start.is_some_and(|p| !(e.quota.loaded && e.quota.period_start >= p))
}

/// Marks the entry for its worker to fetch the key's global count (its window of the length
/// asked, its quota use in the period asked), even before its first verify is decided.
pub fn ask_news(e: &mut Entry, ask: &Ask) {
    if let Some(limit) = ask.rate.filter(|l| l.window_us != e.window_us) {
        reset_windows(e, limit.window_us);
    }
    if let Some(q) = &ask.quota {
        use_period(e, q.period_start, None);
    }
    e.fetch = true;
}

/// Moves the entry's quota to the period starting `period_start` when that is newer (periods
/// only move forward), starting from `loaded` (the table's count) or zero; or takes `loaded`
/// as base after a direct write to the table (counts not yet flushed stay).
fn use_period(e: &mut Entry, period_start: i64, loaded: Option<i64>) {
    if e.quota.period_start < period_start {
        // Counts of the old period not yet written are dropped from the quota (its use is
        // about to restart anyway; the hours keep them); one in flight is written to its own
        // period, not added to this one.
        e.quota = QuotaCount {
            loaded: loaded.is_some(),
            period_start,
            base: loaded.unwrap_or(0),
            seq: e.quota.seq,
            ..QuotaCount::default()
        };
    } else if let Some(base) =
        loaded.filter(|_| !e.quota.loaded && e.quota.period_start == period_start)
    {
        e.quota.base = base;
        e.quota.loaded = true;
    }
}

/// Forgets every window count (the key's rate window changed length).
fn reset_windows(e: &mut Entry, window_us: i64) {
    e.window = Window::default();
    e.others = Window::default();
    e.unshipped = Window::default();
    e.window_us = window_us;
}

/// Decides a request against the key's rate limit and quota and, when both admit it,
/// counts it (window, quota, hour, last use). `loaded` is the key's quota use as just read
/// from the table, when that read may serve as base.
pub fn decide(e: &mut Entry, ask: &Ask, loaded: Option<i64>, now: i64, scope: Scope) -> Answer {
    let mut answer = Answer::default();
    let mut rate = ask.rate;
    if let Some(q) = &ask.quota {
        // Periods only move forward: a transaction begun before a period's turn (its
        // `now()` decides the period asked about) counts in the newer one.
        use_period(e, q.period_start, loaded);
        let used = e.quota.total();
        let judged = quota::judge(q.limit, q.on_exceeded, used, ask.cost);
        answer.quota_used = Some(used);
        answer.quota = judged;
        if judged.throttled {
            rate = Some(quota::throttled(rate));
        }
        if judged.warn_crossed {
            e.warn_used = used.saturating_add(ask.cost);
        }
    }
    if let Some(limit) = rate {
        if e.window_us != limit.window_us {
            reset_windows(e, limit.window_us);
        }
        let record = !answer.quota.blocked;
        let d = if scope.global {
            e.window
                .admit_beside(&e.others, now, limit, ask.cost, record)
        } else {
            e.window.admit(now, limit, ask.cost, record)
        };
        if scope.replica && scope.global && d.allowed && record {
            e.unshipped.record(now, limit, ask.cost);
        }
        answer.rate = Some(d);
    }
    if scope.replica && scope.global && (rate.is_some() || ask.quota.is_some()) {
        e.fetch = true;
    }
    if answer.admitted() {
        if ask.quota.is_some() {
            // Per-hour requests are kept for keys with a quota (their row is written anyway).
            e.quota.pending = e.quota.pending.saturating_add(ask.cost);
            add_hour(&mut e.hours, hour_start(now), ask.cost);
        }
        e.last_seen = e.last_seen.max(now);
    } else if answer.quota.warn_crossed {
        e.warn_used = 0;
    }
    answer
}

/// Start of the UTC hour holding `ts` (timestamptz microseconds).
pub fn hour_start(ts: i64) -> i64 {
    ts.div_euclid(3_600_000_000) * 3_600_000_000
}

/// Adds `n` requests in the hour starting at `start`. Two hours are kept apart (the flush
/// worker writes every few seconds, so at most two are ever unwritten); were a third to
/// come, the oldest is folded into the next.
fn add_hour(hours: &mut [Hour; 2], start: i64, n: i64) {
    if n <= 0 {
        return;
    }
    if let Some(h) = hours.iter_mut().find(|h| h.n > 0 && h.start == start) {
        h.n = h.n.saturating_add(n);
        return;
    }
    if let Some(h) = hours.iter_mut().find(|h| h.n == 0) {
        *h = Hour { start, n };
        return;
    }
    hours.sort_by_key(|h| h.start);
    hours[1].n = hours[1].n.saturating_add(hours[0].n);
    hours[0] = Hour { start, n };
    hours.sort_by_key(|h| h.start);
}

/// Whether the entry has something for the flush worker to write (not in flight already).
pub fn dirty(e: &Entry, resolution_us: i64) -> bool {
    (e.last_used_inflight == NEVER && last_use_unwritten(e, resolution_us))
        || e.hours.iter().any(|h| h.n > 0)
        || e.quota.pending > 0
        || e.warn_used > 0
        || e.fetch
        || !e.unshipped.is_empty()
}

/// What the flush worker took from one entry to write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub key: [u8; 16],
    pub last_used: Option<i64>,
    pub hours: Vec<Hour>,
    /// (period start, requests) of the quota.
    pub quota: Option<(i64, i64)>,
    /// The use that crossed a warning quota.
    pub warn: Option<i64>,
    /// A standby's admissions to ship: the window's length and (bucket, count) pairs (maybe
    /// none: the batch then only fetches the key's global window).
    pub window: Option<(i64, Vec<(i64, i64)>)>,
}

impl Taken {
    fn is_empty(&self) -> bool {
        self.last_used.is_none()
            && self.hours.is_empty()
            && self.quota.is_none()
            && self.warn.is_none()
            && self.window.is_none()
    }
}

/// A key's count over every server, as the primary holds it: its quota period and use, its
/// rate window's length and buckets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Global {
    pub quota: Option<(i64, i64)>,
    pub window: Option<(i64, Vec<(i64, i64)>)>,
}

/// Moves what is to be written to the tables into flight: the last use (when the table's is
/// `resolution_us` or more older), the hours' requests, the quota count, a warning event.
/// None when there is nothing to write. `seq` is a new sequence number.
pub fn take(e: &mut Entry, resolution_us: i64, seq: u64) -> Option<Taken> {
    let mut t = Taken {
        key: e.k.key,
        ..Taken::default()
    };
    if e.last_used_inflight == NEVER && last_use_unwritten(e, resolution_us) {
        e.last_used_inflight = e.last_seen;
        t.last_used = Some(e.last_seen);
    }
    if e.hours_inflight.iter().all(|h| h.n == 0) && e.hours.iter().any(|h| h.n > 0) {
        e.hours_inflight = std::mem::take(&mut e.hours);
        t.hours = e
            .hours_inflight
            .iter()
            .copied()
            .filter(|h| h.n > 0)
            .collect();
    }
    // (A standby asking for news ships its quota count even when it is 0: the answer is the
    // key's global use.)
    if e.quota.inflight == 0 && (e.quota.pending > 0 || (e.fetch && e.quota.period_start > 0)) {
        e.quota.inflight = e.quota.pending;
        e.quota.pending = 0;
        e.quota.seq = seq;
        t.quota = Some((e.quota.period_start, e.quota.inflight));
    }
    if e.warn_inflight == 0 && e.warn_used > 0 {
        e.warn_inflight = std::mem::take(&mut e.warn_used);
        t.warn = Some(e.warn_inflight);
    }
    if !e.shipping && ((e.fetch && e.window_us > 0) || !e.unshipped.is_empty()) {
        e.shipping = true;
        t.window = Some((e.window_us, std::mem::take(&mut e.unshipped).buckets()));
    }
    if !e.shipping || t.window.is_some() {
        e.fetch = false;
    }
    (!t.is_empty()).then_some(t)
}

/// Whether the entry's last use is to be written: newer than the table's by at least the
/// resolution (or the table has none).
fn last_use_unwritten(e: &Entry, resolution_us: i64) -> bool {
    e.last_seen > e.last_written
        && (e.last_written == NEVER || e.last_seen.saturating_sub(e.last_written) >= resolution_us)
}

/// What became of a taken batch: each part written, or not (kept for the next flush).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The key's last use as the table holds it after the flush (None: not written).
    pub last_used: Option<i64>,
    pub quota: bool,
    pub warn: bool,
    /// The hours (their starts) whose requests were not written.
    pub hours_unwritten: Vec<i64>,
    /// The window's admissions were shipped.
    pub window: bool,
    /// The primary's answer to a shipped batch.
    pub global: Option<Global>,
}

impl Outcome {
    /// Everything written, or nothing.
    pub fn all(written: bool, t: &Taken) -> Outcome {
        Outcome {
            last_used: if written { t.last_used } else { None },
            quota: written,
            warn: written,
            hours_unwritten: if written {
                Vec::new()
            } else {
                t.hours.iter().map(|h| h.start).collect()
            },
            window: written,
            global: None,
        }
    }

    /// A batch the primary took, with its answer for the key.
    pub fn shipped(t: &Taken, global: Option<Global>) -> Outcome {
        Outcome {
            global,
            ..Outcome::all(true, t)
        }
    }
}

/// After the flush transaction: written parts leave flight (the quota's into `base`), the
/// others go back to pending. `seq` is a new sequence number.
pub fn confirm(e: &mut Entry, t: &Taken, o: &Outcome, seq: u64) {
    if t.last_used.is_some() {
        if let Some(stored) = o.last_used {
            e.last_written = e.last_written.max(stored);
        }
        e.last_used_inflight = NEVER;
    }
    if !t.hours.is_empty() {
        for h in std::mem::take(&mut e.hours_inflight) {
            if h.n > 0 && o.hours_unwritten.contains(&h.start) {
                add_hour(&mut e.hours, h.start, h.n);
            }
        }
    }
    let global = o.global.as_ref();
    if let Some((period, _)) = t.quota {
        if o.quota {
            // Written to its own period: part of this period's base only if it is the same.
            // Shipped: the primary's count for the period, which holds it, becomes the base.
            if period == e.quota.period_start {
                e.quota.base = match global.and_then(|g| g.quota) {
                    Some((p, total)) if p == period => {
                        e.quota.loaded = true;
                        total
                    }
                    _ => e.quota.base.saturating_add(e.quota.inflight),
                };
            }
        } else {
            e.quota.pending = e.quota.pending.saturating_add(e.quota.inflight);
        }
        e.quota.inflight = 0;
        e.quota.seq = seq;
    }
    if t.warn.is_some() {
        let w = std::mem::take(&mut e.warn_inflight);
        if !o.warn && e.warn_used == 0 {
            e.warn_used = w;
        }
    }
    if let Some((us, sent)) = &t.window {
        e.shipping = false;
        if !o.window {
            for &(idx, n) in sent.iter().filter(|_| *us == e.window_us) {
                e.unshipped.add_at(idx, n);
            }
            e.fetch = true;
        } else if let Some((_, buckets)) = global
            .and_then(|g| g.window.as_ref())
            .filter(|(us, _)| *us == e.window_us)
        {
            // The global count holds this server's shipped admissions: the rest is the
            // others'.
            let mut others = Window::default();
            for &(idx, n) in buckets {
                let own = e.window.count_at(idx) - e.unshipped.count_at(idx);
                others.add_at(idx, n.saturating_sub(own).max(0));
            }
            e.others = others;
        }
    }
}

/// On the primary: adds what a standby shipped for this key (`t`) to its entry — its last use,
/// hours, quota count (in the entry's period; `loaded` as in `decide`), a warning crossed and
/// its admissions, among the others' — unless `fresh` is false (a batch taken before: then
/// only the answer is made). Answers with the key's global count.
pub fn absorb(e: &mut Entry, t: &Taken, loaded: Option<i64>, fresh: bool) -> Global {
    if fresh {
        if let Some(at) = t.last_used {
            e.last_seen = e.last_seen.max(at);
        }
        for h in &t.hours {
            add_hour(&mut e.hours, h.start, h.n);
        }
        if let Some(w) = t.warn.filter(|_| e.warn_used == 0 && e.warn_inflight == 0) {
            e.warn_used = w;
        }
    }
    let quota = t.quota.map(|(period, n)| {
        use_period(e, period, loaded);
        if fresh && period == e.quota.period_start {
            e.quota.pending = e.quota.pending.saturating_add(n);
        }
        (e.quota.period_start, e.quota.total())
    });
    let window = t.window.as_ref().and_then(|(us, buckets)| {
        if e.window_us == 0 {
            reset_windows(e, *us);
        }
        // A window of another length: the limit changed and the standby has not replayed
        // the change yet; its buckets do not fit.
        if e.window_us != *us {
            return None;
        }
        if fresh {
            for &(idx, n) in buckets {
                e.others.add_at(idx, n);
            }
        }
        let mut all = e.window.clone();
        for (idx, n) in e.others.buckets() {
            all.add_at(idx, n);
        }
        Some((*us, all.buckets()))
    });
    Global { quota, window }
}

/// A new worker found counts in flight (its predecessor died mid-flush): pending again.
pub fn requeue(e: &mut Entry, seq: u64) {
    let t = Taken {
        last_used: (e.last_used_inflight != NEVER).then_some(e.last_used_inflight),
        hours: e
            .hours_inflight
            .iter()
            .copied()
            .filter(|h| h.n > 0)
            .collect(),
        quota: (e.quota.inflight > 0).then_some((e.quota.period_start, e.quota.inflight)),
        warn: (e.warn_inflight > 0).then_some(e.warn_inflight),
        window: e.shipping.then(|| (e.window_us, Vec::new())),
        key: e.k.key,
    };
    if !t.is_empty() {
        let o = Outcome::all(false, &t);
        confirm(e, &t, &o, seq);
    }
}

/// The key is gone from the table (deleted, or its creating transaction never committed):
/// what it counted can never be written. Dropped, so it pins nothing.
pub fn forget_unwritten(e: &mut Entry) {
    e.last_written = e.last_written.max(e.last_seen);
    e.hours = [Hour::default(); 2];
    e.quota.pending = 0;
    e.warn_used = 0;
}

/// Whether the entry may be dropped at `now`: nothing left to write or in flight, its rate
/// window is over, and it was not used for `idle_us`. (A dropped key's next verify starts a
/// new entry from the tables, which then hold everything it had.)
pub fn evictable(e: &Entry, now: i64, idle_us: i64, resolution_us: i64) -> bool {
    let w = (e.window_us + BUCKETS as i64 - 1) / BUCKETS as i64;
    let head = e.window.head.max(e.others.head);
    let window_over = w <= 0 || now.div_euclid(w).saturating_sub(head) > BUCKETS as i64 + 1;
    let idle = e.last_seen == NEVER || now.saturating_sub(e.last_seen) >= idle_us;
    window_over
        && idle
        && !e.queued
        && !last_use_unwritten(e, resolution_us)
        && e.last_used_inflight == NEVER
        && e.hours.iter().chain(&e.hours_inflight).all(|h| h.n == 0)
        && e.quota.pending == 0
        && e.quota.inflight == 0
        && e.warn_used == 0
        && e.warn_inflight == 0
        && !e.fetch
        && e.unshipped.is_empty()
        && !e.shipping
}

/// Whether `e` holds a quota count no table will ever hold: on a standby, whose counts are
/// never written, a count in the current period lives only here (under limit_split it is the
/// whole of that server's count). Such an entry is kept (for at most a year from its period's
/// start, the longest period), or its next verify would start the count afresh.
pub fn holds_local_count(e: &Entry, now: i64) -> bool {
    const YEAR_US: i64 = 366 * 86_400_000_000;
    e.quota.loaded && e.quota.total() > 0 && now.saturating_sub(e.quota.period_start) < YEAR_US
}

/// Requests of `e` per hour not yet in the table (pending or in flight).
pub fn unwritten_hours(e: &Entry) -> impl Iterator<Item = Hour> + '_ {
    e.hours
        .iter()
        .chain(&e.hours_inflight)
        .copied()
        .filter(|h| h.n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: EntryKey = EntryKey {
        db: 5,
        key: [7; 16],
    };
    const HOUR: i64 = 3_600_000_000;
    const T: i64 = 1_000 * HOUR;

    fn quota_ask(period_start: i64, limit: i64, cost: i64) -> Ask {
        Ask {
            rate: None,
            quota: Some(QuotaAsk {
                limit,
                period_start,
                on_exceeded: OnExceeded::Block,
            }),
            cost,
        }
    }

    fn plain(cost: i64) -> Ask {
        Ask {
            rate: None,
            quota: None,
            cost,
        }
    }

    fn all(t: &Taken) -> Outcome {
        Outcome::all(true, t)
    }

    fn none(t: &Taken) -> Outcome {
        Outcome::all(false, t)
    }

    #[test]
    fn decide_counts_on_the_base_it_is_given_and_keeps_unflushed_counts() {
        let mut e = Entry::new(K, 1);
        // First use: the table said 100.
        let a = decide(
            &mut e,
            &quota_ask(10, 1000, 1),
            Some(100),
            T,
            Scope::default(),
        );
        assert_eq!((a.quota_used, e.quota.total()), (Some(100), 101));
        let t = take(&mut e, 0, 2).unwrap();
        assert_eq!(t.quota, Some((10, 1)));
        e.quota.loaded = false; // a direct table write marks it for reload
                                // No usable table read (a flush was under way): the base stays, the count goes on.
        let a = decide(&mut e, &quota_ask(10, 1000, 2), None, T, Scope::default());
        assert_eq!((a.quota_used, e.quota.total()), (Some(101), 103));
        confirm(&mut e, &t, &all(&t), 3);
        assert_eq!(e.quota.total(), 103);
        // A usable read (the table now says 150): pending counts stay on top of it.
        let a = decide(
            &mut e,
            &quota_ask(10, 1000, 1),
            Some(150),
            T,
            Scope::default(),
        );
        assert_eq!((a.quota_used, e.quota.total()), (Some(152), 153));
        // A blocking quota refuses without counting anything.
        let before = e.hours;
        let a = decide(&mut e, &quota_ask(10, 1000, 900), None, T, Scope::default());
        assert!(a.quota.blocked && !a.admitted());
        assert_eq!((e.quota.total(), e.hours), (153, before));
    }

    #[test]
    fn a_failed_flush_gives_everything_back_and_a_written_one_keeps_nothing() {
        let mut e = Entry::new(K, 1);
        for _ in 0..3 {
            decide(
                &mut e,
                &quota_ask(10, 1000, 1),
                Some(0),
                T + 5,
                Scope::default(),
            );
        }
        let t = take(&mut e, 60_000_000, 2).unwrap();
        assert_eq!(t.last_used, Some(T + 5));
        assert_eq!(t.hours, vec![Hour { start: T, n: 3 }]);
        assert_eq!(t.quota, Some((10, 3)));
        assert!(take(&mut e, 0, 3).is_none(), "nothing new to take");
        decide(
            &mut e,
            &quota_ask(10, 1000, 1),
            None,
            T + 6,
            Scope::default(),
        );
        confirm(&mut e, &t, &none(&t), 4);
        assert_eq!(e.quota.pending, 4);
        assert_eq!(e.hours[0], Hour { start: T, n: 4 });
        assert_eq!(e.last_written, NEVER);
        let t = take(&mut e, 60_000_000, 5).unwrap();
        assert_eq!(t.last_used, Some(T + 6));
        confirm(&mut e, &t, &all(&t), 6);
        assert_eq!(
            (e.quota.base, e.quota.pending, e.last_written),
            (4, 0, T + 6)
        );
        assert!(unwritten_hours(&e).next().is_none());
        // Written within the resolution: nothing to write until it has passed.
        decide(&mut e, &plain(1), None, T + 10, Scope::default());
        assert_eq!(take(&mut e, 60_000_000, 7), None);
        assert!(take(&mut e, 1, 8).is_some_and(|t| t.last_used == Some(T + 10)));
    }

    #[test]
    fn dirty_means_something_to_write() {
        let mut e = Entry::new(K, 1);
        assert!(!dirty(&e, 0));
        decide(&mut e, &plain(1), None, T, Scope::default());
        assert!(dirty(&e, 60_000_000), "a first use");
        let t = take(&mut e, 60_000_000, 2).unwrap();
        assert!(!dirty(&e, 60_000_000), "in flight");
        confirm(&mut e, &t, &all(&t), 3);
        decide(&mut e, &plain(1), None, T + 1, Scope::default());
        assert!(!dirty(&e, 60_000_000), "within the resolution");
        decide(
            &mut e,
            &quota_ask(10, 100, 1),
            Some(0),
            T + 2,
            Scope::default(),
        );
        assert!(dirty(&e, 60_000_000), "a quota count");
        // A partly failed flush leaves the rest dirty.
        let t = take(&mut e, 60_000_000, 4).unwrap();
        let mut o = all(&t);
        o.hours_unwritten = vec![hour_start(T)];
        confirm(&mut e, &t, &o, 5);
        assert!(dirty(&e, 60_000_000) && e.quota.pending == 0);
        assert_eq!(unwritten_hours(&e).map(|h| h.n).sum::<i64>(), 1);
    }

    #[test]
    fn a_quota_period_only_moves_forward() {
        let mut e = Entry::new(K, 1);
        decide(
            &mut e,
            &quota_ask(20, 100, 3),
            Some(10),
            T,
            Scope::default(),
        );
        // A transaction begun before the turn asks about period 10: counted in period 20.
        let a = decide(
            &mut e,
            &quota_ask(10, 100, 1),
            Some(99),
            T,
            Scope::default(),
        );
        assert_eq!((a.quota_used, e.quota.period_start), (Some(13), 20));
        assert!(!needs_base(&e, Some(10)));
        assert_eq!(e.quota.total(), 14);
    }

    #[test]
    fn hours_stay_apart_and_a_third_folds_into_the_next() {
        let mut h = [Hour::default(); 2];
        add_hour(&mut h, HOUR, 2);
        add_hour(&mut h, 2 * HOUR, 3);
        add_hour(&mut h, HOUR, 1);
        assert_eq!(
            h,
            [
                Hour { start: HOUR, n: 3 },
                Hour {
                    start: 2 * HOUR,
                    n: 3
                }
            ]
        );
        add_hour(&mut h, 3 * HOUR, 1);
        let total: i64 = h.iter().map(|x| x.n).sum();
        assert_eq!(total, 7, "no request lost");
        assert!(h.iter().any(|x| x.start == 3 * HOUR && x.n == 1));
    }

    #[test]
    fn eviction_waits_for_writes_windows_and_idleness() {
        let mut e = Entry::new(K, 1);
        let rate = Ask {
            rate: Some(Limit {
                requests: 10,
                window_us: 60_000_000,
            }),
            quota: None,
            cost: 1,
        };
        assert!(decide(&mut e, &rate, None, T, Scope::default()).admitted());
        let idle = 10_000_000;
        assert!(!evictable(&e, T + 100_000_000, idle, 0), "unwritten use");
        let t = take(&mut e, 0, 2).unwrap();
        assert!(!evictable(&e, T + 100_000_000, idle, 0), "in flight");
        confirm(&mut e, &t, &all(&t), 3);
        assert!(!evictable(&e, T + 30_000_000, idle, 0), "window still live");
        assert!(evictable(&e, T + 100_000_000, idle, 0));
        let mut e = Entry::new(K, 1);
        decide(&mut e, &plain(1), None, T, Scope::default());
        let t = take(&mut e, 0, 2).unwrap();
        confirm(&mut e, &t, &all(&t), 3);
        assert!(!evictable(&e, T + 1, idle, 0), "used just now");
        assert!(evictable(&e, T + idle, idle, 0));
    }

    #[test]
    fn a_standby_keeps_a_quota_count_for_its_period() {
        let mut e = Entry::new(K, 1);
        assert!(!holds_local_count(&e, T), "no quota");
        decide(
            &mut e,
            &quota_ask(10, 1000, 2),
            Some(0),
            T,
            Scope::default(),
        );
        let t = take(&mut e, 0, 2).unwrap();
        confirm(&mut e, &t, &all(&t), 3);
        assert!(
            evictable(&e, T + HOUR, 1, 0),
            "written, as a standby's worker calls it"
        );
        assert!(
            holds_local_count(&e, T + HOUR),
            "yet the count is only here"
        );
        assert!(
            !holds_local_count(&e, T + 367 * 24 * HOUR),
            "not past a year"
        );
    }

    #[test]
    fn a_gone_key_pins_nothing_and_a_requeue_keeps_everything() {
        let mut e = Entry::new(K, 1);
        decide(
            &mut e,
            &quota_ask(10, 1000, 2),
            Some(0),
            T,
            Scope::default(),
        );
        let _ = take(&mut e, 0, 2).unwrap();
        requeue(&mut e, 3);
        assert_eq!((e.quota.pending, e.quota.inflight), (2, 0));
        assert_eq!(unwritten_hours(&e).map(|h| h.n).sum::<i64>(), 2);
        forget_unwritten(&mut e);
        assert!(evictable(&e, T + HOUR, 1, 0));
    }

    #[test]
    fn a_standby_ships_its_counts_and_decides_on_the_global_ones() {
        let ask = |cost| Ask {
            rate: Some(Limit {
                requests: 10,
                window_us: 60_000_000,
            }),
            quota: Some(QuotaAsk {
                limit: 100,
                period_start: 10,
                on_exceeded: OnExceeded::Block,
            }),
            cost,
        };
        let standby = Scope {
            replica: true,
            global: true,
            ..Scope::default()
        };
        let primary = Scope {
            replica: false,
            global: true,
            ..Scope::default()
        };
        let (mut p, mut s) = (Entry::new(K, 1), Entry::new(K, 1));
        for _ in 0..4 {
            assert!(decide(&mut p, &ask(1), Some(0), T, primary).admitted());
        }
        for _ in 0..3 {
            assert!(decide(&mut s, &ask(1), Some(0), T, standby).admitted());
        }
        let tp = take(&mut p, 0, 2).unwrap();
        assert!(tp.window.is_none(), "a primary ships nothing");
        confirm(&mut p, &tp, &Outcome::all(true, &tp), 3);
        let t = take(&mut s, 0, 2).unwrap();
        let shipped: i64 = t.window.as_ref().unwrap().1.iter().map(|b| b.1).sum();
        assert_eq!((shipped, t.quota), (3, Some((10, 3))));
        // One more on the standby while the batch is under way.
        assert!(decide(&mut s, &ask(1), None, T, standby).admitted());
        let g = absorb(&mut p, &t, None, true);
        assert_eq!(g.quota, Some((10, 7)));
        assert_eq!(
            absorb(&mut p, &t, None, false),
            g,
            "a batch sent again adds nothing"
        );
        confirm(&mut s, &t, &Outcome::shipped(&t, Some(g)), 3);
        // The standby: 7 everywhere + its 1 not shipped yet = 8; two more, then refused.
        assert_eq!(s.quota.total(), 8);
        assert!(decide(&mut s, &ask(1), None, T, standby).admitted());
        assert!(decide(&mut s, &ask(1), None, T, standby).admitted());
        let d = decide(&mut s, &ask(1), None, T, standby);
        assert!(!d.admitted() && d.rate.unwrap().remaining == 0);
        // The primary: its 4 + the 3 shipped; three more, then refused.
        for _ in 0..3 {
            assert!(decide(&mut p, &ask(1), None, T, primary).admitted());
        }
        assert!(!decide(&mut p, &ask(1), None, T, primary).admitted());
        // Its worker writes the standby's 3 with its own 3 since its last flush.
        let tp = take(&mut p, 0, 4).unwrap();
        assert_eq!(tp.quota, Some((10, 6)));
        assert_eq!(tp.hours.iter().map(|h| h.n).sum::<i64>(), 6);
        // Split limits: each server its own window, nothing of the others'.
        let mut alone = Entry::new(K, 1);
        alone.others.add_at(T.div_euclid(3_000_000), 9);
        let split = Scope {
            replica: true,
            global: false,
            ..Scope::default()
        };
        assert!(decide(&mut alone, &ask(5), Some(0), T, split).admitted());
        assert!(alone.unshipped.is_empty() && !alone.fetch);
    }

    #[test]
    fn a_standby_asks_for_news_it_has_not_heard_lately() {
        let ask = Ask {
            rate: Some(Limit {
                requests: 10,
                window_us: 60_000_000,
            }),
            quota: Some(QuotaAsk {
                limit: 100,
                period_start: 10,
                on_exceeded: OnExceeded::Block,
            }),
            cost: 1,
        };
        let scope = Scope {
            replica: true,
            global: true,
            stale_us: 1_000_000,
        };
        let mut e = Entry::new(K, 1);
        assert!(wants_news(&e, &ask, scope, T), "never heard");
        assert!(!wants_news(
            &e,
            &ask,
            Scope {
                replica: false,
                ..scope
            },
            T
        ));
        assert!(!wants_news(
            &e,
            &ask,
            Scope {
                global: false,
                ..scope
            },
            T
        ));
        ask_news(&mut e, &ask);
        // Before any verify was decided, the batch asks for the window and the quota use.
        let t = take(&mut e, 0, 2).unwrap();
        assert_eq!(t.window, Some((60_000_000, vec![])));
        assert_eq!(t.quota, Some((10, 0)));
        let g = Global {
            quota: Some((10, 42)),
            window: Some((60_000_000, vec![(T.div_euclid(3_000_000), 9)])),
        };
        confirm(&mut e, &t, &Outcome::shipped(&t, Some(g)), 3);
        e.heard_at = T;
        assert!(!wants_news(&e, &ask, scope, T + 1_000_000));
        assert!(
            wants_news(&e, &ask, scope, T + 1_000_001),
            "heard too long ago"
        );
        let a = decide(&mut e, &ask, None, T, scope);
        assert_eq!(a.quota_used, Some(42), "the primary's count");
        assert_eq!(a.rate.unwrap().remaining, 0, "9 elsewhere + this one");
        assert!(!decide(&mut e, &ask, None, T, scope).admitted());
    }

    #[test]
    fn a_batch_not_taken_is_shipped_again_and_pins_its_entry() {
        let ask = Ask {
            rate: Some(Limit {
                requests: 10,
                window_us: 60_000_000,
            }),
            quota: None,
            cost: 2,
        };
        let standby = Scope {
            replica: true,
            global: true,
            ..Scope::default()
        };
        let mut s = Entry::new(K, 1);
        assert!(decide(&mut s, &ask, None, T, standby).admitted());
        let t = take(&mut s, 0, 2).unwrap();
        assert!(
            take(&mut s, 0, 3).is_none_or(|t| t.window.is_none()),
            "one batch of a key at a time"
        );
        assert!(!evictable(&s, T + 3_600_000_000, 1, 0), "counts in flight");
        confirm(&mut s, &t, &Outcome::all(false, &t), 4);
        assert_eq!(s.unshipped.buckets().iter().map(|b| b.1).sum::<i64>(), 2);
        assert!(dirty(&s, i64::MAX) && !evictable(&s, T + 3_600_000_000, 1, 0));
        let t = take(&mut s, i64::MAX, 5).unwrap();
        assert_eq!(
            t.window
                .as_ref()
                .unwrap()
                .1
                .iter()
                .map(|b| b.1)
                .sum::<i64>(),
            2
        );
        // Answered with nothing of the window (the primary's limit differs): own counts
        // only; the entry can go once its window is over.
        confirm(&mut s, &t, &Outcome::shipped(&t, None), 6);
        assert!(s.others.is_empty() && !s.shipping);
        assert!(evictable(&s, T + 3_600_000_000, 1, 0));
    }

    #[test]
    fn a_warning_quota_crossed_is_taken_once() {
        let mut e = Entry::new(K, 1);
        let warn = |cost| Ask {
            rate: None,
            quota: Some(QuotaAsk {
                limit: 2,
                period_start: 10,
                on_exceeded: OnExceeded::Warn,
            }),
            cost,
        };
        decide(&mut e, &warn(2), Some(0), T, Scope::default());
        assert_eq!(e.warn_used, 0);
        assert!(decide(&mut e, &warn(1), None, T, Scope::default()).admitted());
        assert_eq!(e.warn_used, 3);
        let t = take(&mut e, 0, 2).unwrap();
        assert_eq!(t.warn, Some(3));
        confirm(&mut e, &t, &all(&t), 3);
        decide(&mut e, &warn(1), None, T, Scope::default());
        assert_eq!(e.warn_used, 0, "crossed once");
    }
}
