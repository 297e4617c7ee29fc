//! Quotas and limit settings, pure Rust: parsing the JSON settings and deciding.

use super::window::Limit;
use crate::duration;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExceeded {
    Block,
    Warn,
    Throttle,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    pub limit: i64,
    pub period: String,
    pub on_exceeded: OnExceeded,
}

/// What a quota says about a request of `cost` when `used` requests are already counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// A blocking quota refuses it.
    pub blocked: bool,
    /// A throttling quota tightens the rate limit for it.
    pub throttled: bool,
    /// A warning quota is crossed by it (emit `quota.exceeded` once).
    pub warn_crossed: bool,
}

pub fn judge(limit: i64, on_exceeded: OnExceeded, used: i64, cost: i64) -> Judgement {
    // Saturating: a table-side count near i64::MAX (written by keypal_track_usage) must
    // read as over the limit, never wrap to a small number.
    let over = used.saturating_add(cost) > limit;
    Judgement {
        blocked: over && on_exceeded == OnExceeded::Block,
        throttled: over && on_exceeded == OnExceeded::Throttle,
        warn_crossed: on_exceeded == OnExceeded::Warn && used <= limit && over,
    }
}

impl Quota {
    pub fn judge(&self, used: i64, cost: i64) -> Judgement {
        judge(self.limit, self.on_exceeded, used, cost)
    }
}

/// A server's share of `limit` when `servers` share it (keypal_configure(limit_split)):
/// a standby floor(limit / servers), the primary the rest, so the shares add up to the
/// limit exactly. A limit smaller than the number of servers leaves the standbys none.
pub fn share(limit: i64, servers: i64, primary: bool) -> i64 {
    if servers <= 1 {
        return limit;
    }
    let each = limit / servers;
    if primary {
        limit - each * (servers - 1)
    } else {
        each
    }
}

const DAY_US: i64 = 86_400_000_000;

/// `date_trunc(period, ts, 'UTC')` for the quota periods (day, week, month, year), `ts` in
/// PostgreSQL timestamptz microseconds (since 2000-01-01 00:00 UTC); None for other periods.
pub fn period_start_us(period: &str, ts: i64) -> Option<i64> {
    let days = ts.div_euclid(DAY_US);
    let start_day = match period {
        "day" => days,
        // 2000-01-01 was a Saturday; weeks start on Monday.
        "week" => days - (days + 5).rem_euclid(7),
        "month" => {
            let (y, m, _) = civil_from_days(days);
            days_from_civil(y, m, 1)
        }
        "year" => days_from_civil(civil_from_days(days).0, 1, 1),
        _ => return None,
    };
    Some(start_day * DAY_US)
}

/// Days since 2000-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's method).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 10_957 + 719_468; // shift to days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// (year, month, day) → days since 2000-01-01.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468 - 10_957
}

/// `{"requests": n, "window": "1m"}` (already validated when stored); None for JSON null.
pub fn parse_rate_limit(v: &Value) -> Option<Limit> {
    let requests = v.get("requests")?.as_i64()?;
    let span = duration::parse_short(v.get("window")?.as_str()?)?.ok()?;
    let window_us = span.days as i64 * 86_400_000_000 + span.micros;
    (requests > 0 && window_us > 0).then_some(Limit {
        requests,
        window_us,
    })
}

/// `{"limit": n, "period": "...", "on_exceeded": "..."}`; None for JSON null.
pub fn parse_quota(v: &Value) -> Option<Quota> {
    let limit = v.get("limit")?.as_i64()?;
    let period = v
        .get("period")
        .and_then(Value::as_str)
        .unwrap_or("month")
        .to_string();
    let on_exceeded = match v
        .get("on_exceeded")
        .and_then(Value::as_str)
        .unwrap_or("block")
    {
        "warn" => OnExceeded::Warn,
        "throttle" => OnExceeded::Throttle,
        _ => OnExceeded::Block,
    };
    Some(Quota {
        limit,
        period,
        on_exceeded,
    })
}

/// The rate limit in force while a throttling quota is exceeded: a tenth of the key's own
/// limit (at least one request per window), or one request per second without one.
pub fn throttled(rate: Option<Limit>) -> Limit {
    match rate {
        // (A share of nothing, under limit_split, stays nothing.)
        Some(l) => Limit {
            requests: if l.requests == 0 {
                0
            } else {
                (l.requests / 10).max(1)
            },
            window_us: l.window_us,
        },
        None => Limit {
            requests: 1,
            window_us: 1_000_000,
        },
    }
}

/// Picks the rate limit in force: the key's own setting (JSON null = none) if it has one,
/// else its policy's, else its environment's (JSON null = none), else the default.
pub fn effective_rate_limit(
    key: Option<&Value>,
    policy: Option<&Value>,
    environment: Option<&Value>,
    default: Option<&Value>,
) -> Option<Limit> {
    let chosen = key.or(policy).or(environment).or(default)?;
    parse_rate_limit(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn judge_never_wraps() {
        assert!(judge(10, OnExceeded::Block, i64::MAX, 1).blocked);
        assert!(judge(1_000, OnExceeded::Block, i64::MAX - 1, 5).blocked);
        assert!(!judge(i64::MAX, OnExceeded::Block, 0, 5).blocked);
    }

    #[test]
    fn period_starts_match_the_calendar() {
        let at = |y, m, d, h: i64| days_from_civil(y, m, d) * DAY_US + h * 3_600_000_000;
        assert_eq!(civil_from_days(0), (2000, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1999, 12, 31));
        // 2026-11-29 15:00 UTC is a Sunday; a Monday starts its own week; before 2000 too.
        let t = at(2026, 11, 29, 15);
        let cases = [
            ("day", t, at(2026, 11, 29, 0)),
            ("week", t, at(2026, 11, 23, 0)),
            ("month", t, at(2026, 11, 1, 0)),
            ("year", t, at(2026, 1, 1, 0)),
            ("week", at(2026, 11, 30, 0), at(2026, 11, 30, 0)),
            ("week", at(1999, 12, 31, 23), at(1999, 12, 27, 0)),
            ("month", at(2024, 2, 29, 23), at(2024, 2, 1, 0)),
            ("month", at(2024, 3, 1, 0), at(2024, 3, 1, 0)),
        ];
        for (period, ts, start) in cases {
            assert_eq!(period_start_us(period, ts), Some(start), "{period} {ts}");
        }
        assert_eq!(period_start_us("hour", t), None);
    }

    #[test]
    fn parses_limits_and_quotas() {
        assert_eq!(
            parse_rate_limit(&json!({"requests": 100, "window": "1m"})),
            Some(Limit {
                requests: 100,
                window_us: 60_000_000
            })
        );
        assert_eq!(
            parse_rate_limit(&json!({"requests": 5, "window": "1d"}))
                .unwrap()
                .window_us,
            86_400_000_000
        );
        assert_eq!(parse_rate_limit(&json!(null)), None);
        let q = parse_quota(&json!({"limit": 10, "period": "day", "on_exceeded": "warn"})).unwrap();
        assert_eq!(
            (q.limit, q.period.as_str(), q.on_exceeded),
            (10, "day", OnExceeded::Warn)
        );
        assert_eq!(
            parse_quota(&json!({"limit": 3})).unwrap().on_exceeded,
            OnExceeded::Block
        );
    }

    #[test]
    fn precedence_key_policy_env_default() {
        let a = json!({"requests": 1, "window": "1s"});
        let b = json!({"requests": 2, "window": "1s"});
        let none = json!(null);
        assert_eq!(
            effective_rate_limit(Some(&a), Some(&b), None, Some(&b))
                .unwrap()
                .requests,
            1
        );
        assert_eq!(
            effective_rate_limit(None, Some(&b), Some(&a), None)
                .unwrap()
                .requests,
            2
        );
        assert_eq!(
            effective_rate_limit(None, None, Some(&none), Some(&b)),
            None,
            "env null = no limit"
        );
        assert_eq!(
            effective_rate_limit(Some(&none), None, None, Some(&b)),
            None,
            "key null = no limit"
        );
        assert_eq!(
            effective_rate_limit(None, None, None, Some(&b))
                .unwrap()
                .requests,
            2
        );
        assert_eq!(effective_rate_limit(None, None, None, None), None);
    }

    #[test]
    fn judgements() {
        use OnExceeded::*;
        assert_eq!(judge(2, Block, 1, 1), Judgement::default());
        assert!(judge(2, Block, 2, 1).blocked);
        assert!(judge(2, Throttle, 2, 1).throttled && !judge(2, Throttle, 2, 1).blocked);
        assert!(judge(2, Warn, 2, 1).warn_crossed);
        assert!(!judge(2, Warn, 3, 1).warn_crossed, "only when crossing");
    }

    #[test]
    fn throttling_tightens() {
        assert_eq!(
            throttled(Some(Limit {
                requests: 100,
                window_us: 60
            }))
            .requests,
            10
        );
        assert_eq!(
            throttled(Some(Limit {
                requests: 5,
                window_us: 60
            }))
            .requests,
            1
        );
        assert_eq!(
            throttled(None),
            Limit {
                requests: 1,
                window_us: 1_000_000
            }
        );
    }

    #[test]
    fn shares_add_up_to_the_limit() {
        for limit in [0, 1, 2, 5, 10, 99, 100, 1_000_000_007] {
            for n in 1..=7 {
                let total = share(limit, n, true) + (n - 1) * share(limit, n, false);
                assert_eq!(total, limit, "limit {limit}, {n} servers");
                assert!(share(limit, n, false) <= share(limit, n, true));
            }
        }
        assert_eq!(
            share(100, 1, false),
            100,
            "one server: the whole limit, standby or not"
        );
        assert_eq!((share(100, 3, true), share(100, 3, false)), (34, 33));
        assert_eq!((share(2, 3, true), share(2, 3, false)), (2, 0));
    }
}
