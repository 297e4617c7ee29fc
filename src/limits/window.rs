//! Sliding-window rate limiting on sub-window buckets, pure Rust.
//!
//! A window of length W is cut into `BUCKETS` buckets of width w = W / BUCKETS. A request at
//! time t is admitted only if the requests counted in every bucket that intersects
//! [t - W, t] — `BUCKETS + 1` of them, the oldest only partly inside — plus its cost stay
//! within the limit. Counting the oldest bucket whole over-estimates, never under-estimates,
//! so no window of length W (aligned or not) ever holds more than `requests` admissions: no
//! 2× burst at a window edge. The price is that up to one bucket's worth (1/BUCKETS of the
//! limit, at most) may be refused early.

pub const BUCKETS: usize = 20;
const SLOTS: usize = BUCKETS + 1;

/// A limit: `requests` per `window_us` microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub requests: i64,
    pub window_us: i64,
}

impl Limit {
    fn bucket_us(self) -> i64 {
        (self.window_us + BUCKETS as i64 - 1) / BUCKETS as i64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests still admissible right now (after this one, if it was admitted).
    pub remaining: i64,
    /// When refused: how long until this request would be admitted.
    pub retry_after_ms: i64,
}

/// The counts of one key: `head` is the absolute index (time / bucket width) of the newest
/// bucket; `counts[i % SLOTS]` holds bucket i for i in head-BUCKETS..=head.
#[derive(Clone, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Window {
    pub head: i64,
    pub counts: [i64; SLOTS],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            head: i64::MIN,
            counts: [0; SLOTS],
        }
    }
}

impl Window {
    /// Moves the window to `now`, forgetting buckets that fell out of it.
    fn advance(&mut self, idx: i64) {
        if self.head == i64::MIN || idx.saturating_sub(self.head) >= SLOTS as i64 {
            self.counts = [0; SLOTS];
        } else if idx > self.head {
            for i in (self.head + 1)..=idx {
                self.counts[i.rem_euclid(SLOTS as i64) as usize] = 0;
            }
        }
        self.head = self.head.max(idx);
    }

    fn total(&self) -> i64 {
        self.counts.iter().fold(0i64, |a, c| a.saturating_add(*c))
    }

    /// Decides a request of `cost` at `now_us`, counting it when `record` and admitted.
    pub fn admit(&mut self, now_us: i64, limit: Limit, cost: i64, record: bool) -> Decision {
        let w = limit.bucket_us();
        let idx = now_us.div_euclid(w);
        self.advance(idx);
        let used = self.total();
        if used.saturating_add(cost) <= limit.requests {
            if record {
                self.counts[self.head.rem_euclid(SLOTS as i64) as usize] += cost;
            }
            let remaining = limit.requests - used - if record { cost } else { 0 };
            return Decision {
                allowed: true,
                remaining: remaining.max(0),
                retry_after_ms: 0,
            };
        }
        Decision {
            allowed: false,
            remaining: (limit.requests - used).max(0),
            retry_after_ms: self.retry_after(now_us, limit, cost),
        }
    }

    /// Decides as `admit` does, with `others` — what other servers counted in the same
    /// buckets, as last heard — added to this window's own counts; a request admitted is
    /// counted here only.
    pub fn admit_beside(
        &mut self,
        others: &Window,
        now_us: i64,
        limit: Limit,
        cost: i64,
        record: bool,
    ) -> Decision {
        if others.is_empty() {
            return self.admit(now_us, limit, cost, record);
        }
        let mut all = self.clone();
        for (idx, n) in others.buckets() {
            all.add_at(idx, n);
        }
        let mut d = all.admit(now_us, limit, cost, false);
        if d.allowed && record {
            self.record(now_us, limit, cost);
            d.remaining = (d.remaining - cost).max(0);
        }
        d
    }

    /// Counts `cost` at `now_us`, whatever the limit.
    pub fn record(&mut self, now_us: i64, limit: Limit, cost: i64) {
        self.advance(now_us.div_euclid(limit.bucket_us()));
        let slot = self.head.rem_euclid(SLOTS as i64) as usize;
        self.counts[slot] = self.counts[slot].saturating_add(cost);
    }

    /// Whether no bucket holds a count.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|c| *c == 0)
    }

    /// What bucket `idx` holds (0 for a bucket the window no longer or not yet reaches).
    pub fn count_at(&self, idx: i64) -> i64 {
        if self.head == i64::MIN
            || idx > self.head
            || self.head.saturating_sub(idx) > BUCKETS as i64
        {
            return 0;
        }
        self.counts[idx.rem_euclid(SLOTS as i64) as usize]
    }

    /// Adds `n` to bucket `idx`, moving the window forward to it when it is newer; a bucket
    /// already out of the window is dropped.
    pub fn add_at(&mut self, idx: i64, n: i64) {
        if n == 0 {
            return;
        }
        if self.head == i64::MIN || idx > self.head {
            self.advance(idx);
        }
        if self.head.saturating_sub(idx) <= BUCKETS as i64 {
            let slot = idx.rem_euclid(SLOTS as i64) as usize;
            self.counts[slot] = self.counts[slot].saturating_add(n);
        }
    }

    /// The buckets holding a count, oldest first: (absolute index, count).
    pub fn buckets(&self) -> Vec<(i64, i64)> {
        if self.head == i64::MIN {
            return Vec::new();
        }
        (self.head.saturating_sub(BUCKETS as i64)..=self.head)
            .map(|i| (i, self.count_at(i)))
            .filter(|(_, n)| *n != 0)
            .collect()
    }

    /// How long until enough old buckets leave the window for `cost` to fit.
    fn retry_after(&self, now_us: i64, limit: Limit, cost: i64) -> i64 {
        let w = limit.bucket_us();
        let mut used = self.total();
        for k in 0..SLOTS as i64 {
            // At the start of bucket head+1+k, bucket head-BUCKETS+k leaves the window.
            let leaving = self.head - BUCKETS as i64 + k;
            used -= self.counts[leaving.rem_euclid(SLOTS as i64) as usize];
            if used.saturating_add(cost) <= limit.requests {
                let at = (self.head + 1 + k) * w;
                return ((at - now_us) + 999) / 1000;
            }
        }
        (limit.window_us + 999) / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;
    const L: Limit = Limit {
        requests: 10,
        window_us: 60 * SEC,
    };

    #[test]
    fn a_burst_up_to_the_limit_then_refusal() {
        let mut w = Window::default();
        for i in 0..10 {
            let d = w.admit(100 * SEC, L, 1, true);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 9 - i);
        }
        let d = w.admit(100 * SEC, L, 1, true);
        assert!(!d.allowed);
        assert!(
            d.retry_after_ms > 0 && d.retry_after_ms <= 63_000,
            "{}",
            d.retry_after_ms
        );
        // After the retry delay, the request fits.
        let later = 100 * SEC + d.retry_after_ms * 1000;
        assert!(w.clone().admit(later, L, 1, true).allowed);
        assert!(!w.clone().admit(later - 1000, L, 1, true).allowed);
    }

    #[test]
    fn no_double_burst_at_a_window_edge() {
        let mut w = Window::default();
        // 10 requests just before a minute boundary, then a flood just after it.
        for _ in 0..10 {
            assert!(w.admit(60 * SEC - 1, L, 1, true).allowed);
        }
        assert!(!w.admit(60 * SEC + 1, L, 1, true).allowed);
        assert!(!w.admit(100 * SEC, L, 1, true).allowed);
    }

    #[test]
    fn never_more_than_the_limit_in_any_window() {
        // Pseudo-random arrivals; check every window of length W with a sliding log.
        let mut w = Window::default();
        let mut admitted: Vec<i64> = Vec::new();
        let mut t = 0i64;
        let mut seed = 12345u64;
        for _ in 0..20_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            t += (seed >> 33) as i64 % (2 * SEC);
            if w.admit(t, L, 1, true).allowed {
                admitted.push(t);
            }
        }
        let mut lo = 0;
        for hi in 0..admitted.len() {
            while admitted[hi] - admitted[lo] >= L.window_us {
                lo += 1;
            }
            assert!(hi - lo < 10, "{} admitted within one window", hi - lo + 1);
        }
        // And the limiter is not needlessly strict: at least 85 % of the ideal throughput.
        let ideal = (t / L.window_us + 1) * 10;
        assert!(
            admitted.len() as i64 * 100 >= ideal * 85,
            "{} of {ideal}",
            admitted.len()
        );
    }

    #[test]
    fn peeking_does_not_count() {
        let mut w = Window::default();
        for _ in 0..20 {
            assert!(w.admit(5 * SEC, L, 1, false).allowed);
        }
        assert_eq!(w.admit(5 * SEC, L, 1, true).remaining, 9);
    }

    #[test]
    fn other_servers_counts_share_the_limit_and_age_out_with_their_buckets() {
        let mut mine = Window::default();
        let mut others = Window::default();
        let now = 100 * SEC;
        let idx = now.div_euclid(L.bucket_us());
        others.add_at(idx - 2, 4);
        others.add_at(idx, 3);
        assert_eq!(others.buckets(), vec![(idx - 2, 4), (idx, 3)]);
        for i in 0..3 {
            let d = mine.admit_beside(&others, now, L, 1, true);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 2 - i);
        }
        assert!(!mine.admit_beside(&others, now, L, 1, true).allowed);
        assert_eq!(
            mine.buckets(),
            vec![(idx, 3)],
            "only its own counts are kept here"
        );
        // Once the others' buckets leave the window, their counts no longer take a share.
        let later = now + L.window_us + 3 * L.bucket_us();
        assert!(mine.admit_beside(&others, later, L, 7, true).allowed);
        // A bucket older than the window is dropped; a newer one moves the window on.
        let mut w = Window::default();
        w.add_at(50, 2);
        w.add_at(50 - BUCKETS as i64 - 1, 9);
        w.add_at(50 + SLOTS as i64, 1);
        assert_eq!(w.buckets(), vec![(50 + SLOTS as i64, 1)]);
        assert_eq!((w.count_at(50), w.count_at(99_999)), (0, 0));
    }

    #[test]
    fn cost_counts() {
        let mut w = Window::default();
        assert!(w.admit(0, L, 7, true).allowed);
        assert!(!w.admit(0, L, 4, true).allowed);
        assert!(w.admit(0, L, 3, true).allowed);
        assert!(!w.admit(0, L, 11, false).allowed);
    }
}
