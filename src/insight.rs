//! `keypal_analyze`: a deterministic report on one key from its settings and its usage,
//! pure Rust. The SQL layer gathers the facts (sql/api.sql, keypal_analyze); this decides.
//!
//! Score: start at 100 and subtract, each with a recommendation:
//! never expires −25; expires more than a year out −10; admin or `*` scope −20 (−10 more if
//! the key, older than 30 days, saw no traffic in them); no IP allow list −15; no rate limit
//! −10; not used for 90 days (a key older than that) −10. Clamped to 0–100.
//! Usage pattern over the last 30 days: `unused` (no requests); `bursty` (the busiest hour
//! holds over 10× the mean of the other active hours and over a quarter of all requests);
//! `business_hours`
//! (80 % or more between 08:00 and 18:00 UTC); `steady` (traffic on 20 or more of the 30 days);
//! else `occasional`.

use serde_json::{json, Map, Value};

/// The facts about a key (see keypal_analyze for how they are gathered).
#[derive(Default)]
pub struct Facts {
    pub env: Option<String>,
    pub scopes: Vec<String>,
    pub expires_in_days: Option<f64>,
    pub has_ip_rule: bool,
    pub has_rate_limit: bool,
    pub days_since_last_use: Option<f64>,
    /// Days since the key was created (no advice about N days of disuse before it is N days old).
    pub age_days: f64,
    /// Requests per hour of day (UTC), last 30 days.
    pub by_hour: [i64; 24],
    /// Days (of the last 30) with any traffic.
    pub active_days: i64,
    /// Hourly buckets with traffic, and the busiest one, last 30 days.
    pub active_hours: i64,
    pub busiest_hour: i64,
    /// (endpoint, requests), busiest first.
    pub endpoints: Vec<(String, i64)>,
}

pub fn analyze(f: &Facts) -> Value {
    let total: i64 = f.by_hour.iter().sum();
    let admin = f.scopes.iter().any(|s| s == "admin" || s == "*");
    let mut score: i64 = 100;
    let mut recs: Vec<String> = Vec::new();
    let mut deduct = |points: i64, rec: &str| {
        score -= points;
        recs.push(rec.to_string());
    };
    match f.expires_in_days {
        None => deduct(25, "Set an expiry: this key never expires."),
        Some(d) if d > 365.0 => deduct(10, "Shorten the expiry: it is more than a year away."),
        _ => {}
    }
    if admin {
        deduct(20, "Narrow the scopes: admin or * grants everything.");
        if total == 0 && f.age_days > 30.0 {
            deduct(10, "Revoke or narrow it: an admin key unused for 30 days.");
        }
    }
    if !f.has_ip_rule {
        deduct(15, "Add an IP allow list.");
    }
    if !f.has_rate_limit {
        deduct(10, "Set a rate limit.");
    }
    if f.age_days > 90.0 && f.days_since_last_use.is_none_or(|d| d > 90.0) {
        deduct(10, "Consider revoking it: not used for 90 days.");
    }
    let mut report = Map::new();
    report.insert("suggested_name".into(), Value::from(suggested_name(f)));
    report.insert("usage_pattern".into(), Value::from(pattern(f, total)));
    report.insert("security_score".into(), Value::from(score.clamp(0, 100)));
    report.insert("recommendations".into(), json!(recs));
    report.insert("total_requests_30d".into(), Value::from(total));
    report.insert("peak_hours".into(), json!(peak_hours(f)));
    report.insert(
        "top_endpoints".into(),
        json!(f
            .endpoints
            .iter()
            .take(3)
            .map(|(e, _)| e)
            .collect::<Vec<_>>()),
    );
    Value::Object(report)
}

fn pattern(f: &Facts, total: i64) -> &'static str {
    if total == 0 {
        return "unused";
    }
    let others = (total - f.busiest_hour) as f64 / (f.active_hours - 1).max(1) as f64;
    if f.active_hours > 1 && f.busiest_hour as f64 > 10.0 * others && f.busiest_hour * 4 > total {
        return "bursty";
    }
    let business: i64 = f.by_hour[8..18].iter().sum();
    if business * 10 >= total * 8 {
        return "business_hours";
    }
    if f.active_days >= 20 {
        return "steady";
    }
    "occasional"
}

/// Up to three hours of day (UTC) with the most requests, busiest first.
fn peak_hours(f: &Facts) -> Vec<usize> {
    let mut hours: Vec<usize> = (0..24).filter(|&h| f.by_hour[h] > 0).collect();
    hours.sort_by(|&a, &b| f.by_hour[b].cmp(&f.by_hour[a]).then(a.cmp(&b)));
    hours.truncate(3);
    hours
}

fn suggested_name(f: &Facts) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(env) = &f.env {
        parts.push(env.clone());
    }
    let mut scopes = f.scopes.clone();
    scopes.sort();
    if scopes.iter().any(|s| s == "admin" || s == "*") {
        parts.push("admin".into());
    } else if scopes == ["read"] {
        parts.push("read-only".into());
    } else if !scopes.is_empty() {
        parts.push(scopes.join("-"));
    }
    if let Some(segment) = f
        .endpoints
        .first()
        .and_then(|(e, _)| e.split('/').find(|s| !s.is_empty() && *s != "api"))
    {
        parts.push(segment.to_string());
    }
    parts.push("key".into());
    parts
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Facts from the JSON object keypal_analyze builds (missing fields count as empty).
pub fn facts_from_json(v: &Value) -> Facts {
    let f64_of = |k: &str| v.get(k).and_then(Value::as_f64);
    let i64_of = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
    let mut by_hour = [0i64; 24];
    for (h, n) in v
        .get("by_hour")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .take(24)
    {
        by_hour[h] = n.as_i64().unwrap_or(0);
    }
    Facts {
        env: v.get("env").and_then(Value::as_str).map(str::to_string),
        scopes: v
            .get("scopes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        expires_in_days: f64_of("expires_in_days"),
        has_ip_rule: v
            .get("has_ip_rule")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        has_rate_limit: v
            .get("has_rate_limit")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        days_since_last_use: f64_of("days_since_last_use"),
        // (unknown: as an old key, whose advice is all given)
        age_days: f64_of("age_days").unwrap_or(f64::MAX),
        by_hour,
        active_days: i64_of("active_days"),
        active_hours: i64_of("active_hours"),
        busiest_hour: i64_of("busiest_hour"),
        endpoints: v
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e.get(0)?.as_str()?.to_string(), e.get(1)?.as_i64()?)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> Facts {
        Facts {
            expires_in_days: Some(30.0),
            has_ip_rule: true,
            has_rate_limit: true,
            days_since_last_use: Some(1.0),
            ..Default::default()
        }
    }

    #[test]
    fn a_careful_key_scores_100() {
        let mut f = quiet();
        f.scopes = vec!["read".into()];
        f.by_hour[10] = 5;
        f.active_hours = 1;
        f.busiest_hour = 5;
        let r = analyze(&f);
        assert_eq!(r["security_score"], 100);
        assert_eq!(r["recommendations"], json!([]));
    }

    #[test]
    fn risks_are_deducted_and_explained() {
        let f = Facts {
            scopes: vec!["admin".into()],
            age_days: 120.0,
            ..Default::default()
        };
        let r = analyze(&f);
        // never expires 25, admin 20, unused admin 10, no ip 15, no rate limit 10, stale 10
        assert_eq!(r["security_score"], 10);
        assert_eq!(r["recommendations"].as_array().unwrap().len(), 6);
        assert_eq!(r["usage_pattern"], "unused");
    }

    #[test]
    fn no_advice_about_disuse_longer_than_the_key_has_lived() {
        let young = |age_days| Facts {
            scopes: vec!["admin".into()],
            age_days,
            ..Default::default()
        };
        let recs = |f: &Facts| analyze(f)["recommendations"].to_string();
        assert!(!recs(&young(0.001)).contains("unused for 30 days"));
        assert!(!recs(&young(0.001)).contains("not used for 90 days"));
        assert!(recs(&young(45.0)).contains("unused for 30 days"));
        assert!(!recs(&young(45.0)).contains("not used for 90 days"));
        assert!(recs(&young(91.0)).contains("not used for 90 days"));
    }

    #[test]
    fn patterns() {
        // (requests by hour of day, active hours, busiest hour, active days) → pattern
        let business: Vec<(usize, i64)> = (9..17).map(|h| (h, 100)).collect();
        let steady: Vec<(usize, i64)> = (0..24).map(|h| (h, 10)).collect();
        type Case<'a> = (&'a [(usize, i64)], i64, i64, i64, &'a str);
        let cases: [Case; 4] = [
            (&business, 8 * 20, 10, 20, "business_hours"),
            (&steady, 24 * 25, 2, 25, "steady"),
            (&[(3, 1000), (20, 10)], 6, 1000, 3, "bursty"),
            (&[(20, 10), (2, 10)], 4, 5, 2, "occasional"),
        ];
        for (by_hour, active_hours, busiest_hour, active_days, pattern) in cases {
            let mut f = quiet();
            by_hour.iter().for_each(|&(h, n)| f.by_hour[h] = n);
            f.active_hours = active_hours;
            f.busiest_hour = busiest_hour;
            f.active_days = active_days;
            assert_eq!(analyze(&f)["usage_pattern"], pattern);
        }
    }

    #[test]
    fn peak_hours_and_names() {
        let mut f = quiet();
        f.by_hour[9] = 5;
        f.by_hour[14] = 50;
        f.by_hour[15] = 50;
        f.by_hour[1] = 1;
        f.env = Some("live".into());
        f.scopes = vec!["read".into()];
        f.endpoints = vec![("/api/generate".into(), 40), ("/v1/x".into(), 3)];
        let r = analyze(&f);
        assert_eq!(r["peak_hours"], json!([14, 15, 9]));
        assert_eq!(r["suggested_name"], "live-read-only-generate-key");
        assert_eq!(r["top_endpoints"], json!(["/api/generate", "/v1/x"]));
        f.scopes = vec!["write".into(), "deploy".into()];
        f.endpoints.clear();
        f.env = None;
        assert_eq!(analyze(&f)["suggested_name"], "deploy-write-key");
    }
}
