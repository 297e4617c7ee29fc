//! Property tests of every pure parser: whatever the input, no panic; whatever is
//! accepted round-trips (parsing what was accepted, or its canonical form, gives it back).
//!
//! 2 000 cases per property in the normal test run; `PROPTEST_CASES=100000 cargo test
//! proptests` for a long run.

use crate::limits::quota;
use crate::{duration, keys, net, options, scopes};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    ProptestConfig::with_cases(cases)
}

/// Strings near the grammar (digits, units, ASCII noise, multibyte letters) and any text.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{0,25}[smhdwySMHDWYé日 x]{0,2}",
        "[ -~]{0,40}",
        "[0-9a-fA-F:./]{0,45}",
        any::<String>(),
    ]
}

/// JSON values of every shape, with keys drawn from the option names and noise.
fn json_value() -> impl Strategy<Value = Value> {
    let names: Vec<&'static str> = vec![
        "owner_id",
        "ownerId",
        "scopes",
        "resources",
        "tags",
        "metadata",
        "expires_in",
        "expiresAt",
        "env",
        "rate_limit",
        "quota",
        "allowed_ips",
        "blocked_regions",
        "requests",
        "window",
        "limit",
        "period",
        "on_exceeded",
        "signing",
        "name",
        "project:1",
        "x",
    ];
    let key = prop_oneof![
        proptest::sample::select(names).prop_map(str::to_string),
        "[a-z:*]{0,8}"
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e20f64..1e20).prop_map(|f| json!(f)),
        texty().prop_map(Value::from),
        proptest::sample::select(vec![
            "1m",
            "day",
            "block",
            "warn",
            "read",
            "10.0.0.0/8",
            "de"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn durations(s in texty()) {
        if let Some(Ok(span)) = duration::parse_short(&s) {
            let canonical = if span.days > 0 {
                format!("{}d", span.days)
            } else {
                format!("{}s", span.micros / 1_000_000)
            };
            prop_assert_eq!(duration::parse_short(&canonical), Some(Ok(span)));
        }
    }

    #[test]
    fn networks(s in texty()) {
        if let Ok(n) = net::parse_net(&s) {
            prop_assert_eq!(net::parse_net(&n.to_string()), Ok(n));
        }
        let _ = net::valid_region(&s);
        let _ = net::region_in(&s, &["DE", "fr"]);
    }

    #[test]
    fn scopes_and_resources(s in texty(), v in json_value(), resource in texty()) {
        if scopes::valid_scope(&s) {
            prop_assert!(scopes::holds(&[s.as_str()], None, &s, None));
        }
        let _ = scopes::holds(&["read"], Some(&v), &s, Some(&resource));
        if scopes::check_resources(&v).is_ok() {
            let again: Value = serde_json::from_str(&v.to_string()).unwrap();
            prop_assert!(scopes::check_resources(&again).is_ok());
        }
    }

    #[test]
    fn headers(v in json_value(), token in "[ -~]{1,60}") {
        let _ = keys::key_from_headers(&v);
        if let Some(k) = keys::key_from_headers(&json!({"Authorization": format!("Bearer {token}")})) {
            prop_assert_eq!(keys::key_from_headers(&json!({"x-api-key": k.clone()})), Some(k));
        }
    }

    #[test]
    fn key_format(spec in "[ -~]{0,12}", length in 1i32..300, raw in texty()) {
        let _ = keys::strip_bearer(&raw);
        let _ = keys::matches_format(&raw, &["sk_".into()], 32, b"abc", true);
        if let Ok(alphabet) = keys::expand_alphabet(&spec) {
            let text = String::from_utf8(alphabet.clone()).unwrap();
            // The expanded characters, written out, are an alphabet spec for themselves
            // (a '-' placed last stands for itself).
            let mut written: String = text.chars().filter(|c| *c != '-').collect();
            if text.contains('-') {
                written.push('-');
            }
            let again = keys::expand_alphabet(&written).unwrap();
            let mut a = alphabet.clone();
            let mut b = again;
            a.sort_unstable();
            b.sort_unstable();
            prop_assert_eq!(a, b);
            if keys::check_length(length).is_ok()
                && keys::check_entropy(length, alphabet.len()).is_ok()
            {
                let key = keys::generate("sk_", length as usize, &alphabet);
                prop_assert!(keys::matches_format(&key, &["sk_".into()], length as usize, &alphabet, false));
            }
        }
    }

    #[test]
    fn option_objects(v in json_value(), owner in any::<bool>()) {
        if let Ok(m) = options::normalize(&v, "", owner) {
            let once = Value::Object(m);
            let twice = options::normalize(&once, "", owner).map(Value::Object);
            prop_assert_eq!(twice, Ok(once));
        }
    }

    #[test]
    fn limit_objects(v in json_value(), requests in any::<i64>(), window in texty()) {
        let rate = json!({"requests": requests, "window": window});
        for candidate in [&v, &rate] {
            if let Ok(ok) = options::rate_limit(candidate, "rate_limit") {
                prop_assert_eq!(options::rate_limit(&ok, "rate_limit"), Ok(ok.clone()));
                prop_assert!(quota::parse_rate_limit(&ok).is_some());
            }
            if let Ok(ok) = options::quota(candidate, "quota") {
                prop_assert_eq!(options::quota(&ok, "quota"), Ok(ok.clone()));
                let q = quota::parse_quota(&ok).unwrap();
                prop_assert!(q.limit > 0 && q.limit <= options::MAX_COUNT);
            }
        }
    }
}
