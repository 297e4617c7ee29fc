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
    let over = used + cost > limit;
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
        Some(l) => Limit {
            requests: (l.requests / 10).max(1),
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
}
