//! Key options: the one description of a key's settings shared by `keypal_create`,
//! `keypal_create_many`, templates, rotation overrides and `keypal_update`.
//!
//! Pure Rust: takes a JSON object (snake_case, or the TypeScript keypal's camelCase),
//! checks every field's type and value, and returns it normalised to snake_case.
//! Durations are checked here but turned into timestamps by the SQL layer (it owns `now()`).

use crate::{duration, net, scopes};
use serde_json::{Map, Value};

pub const MAX_LIST: usize = 1000;
pub const MAX_TEXT: usize = 1024;
pub const MAX_JSON_BYTES: usize = 65_536;
/// The largest count a limit may name (rate-limit requests, quota limit): far beyond any
/// real limit, and far enough below i64::MAX that sums of counts and costs cannot wrap.
pub const MAX_COUNT: i64 = 1_000_000_000_000_000;

/// Why an option was refused: the argument it names, the reason, and whether it is a
/// duration (SQLSTATE 22007) rather than another bad value (22023).
#[derive(Debug, PartialEq)]
pub struct OptionError {
    pub arg: String,
    pub why: String,
    pub is_duration: bool,
}

pub(crate) type Res<T> = Result<T, OptionError>;

pub(crate) fn err<T>(arg: &str, why: impl Into<String>) -> Res<T> {
    Err(OptionError {
        arg: arg.into(),
        why: why.into(),
        is_duration: false,
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Text,         // non-empty string
    OptionalText, // string, may be empty
    Uuid,
    Timestamp, // string, parsed by SQL
    Duration,
    Scopes,
    Tags,
    Object, // metadata
    Resources,
    RateLimit,
    Quota,
    Ips,
    Regions,
    Bool,
}

/// Every option: its snake_case name, its camelCase alias, its kind, and whether
/// JSON `null` is a value (it clears the setting) rather than "not given".
const OPTIONS: &[(&str, &str, Kind, bool)] = &[
    ("owner_id", "ownerId", Kind::Text, false),
    ("name", "name", Kind::OptionalText, true),
    ("description", "description", Kind::OptionalText, true),
    ("scopes", "scopes", Kind::Scopes, false),
    ("resources", "resources", Kind::Resources, false),
    ("tags", "tags", Kind::Tags, false),
    ("metadata", "metadata", Kind::Object, false),
    ("expires_in", "expiresIn", Kind::Duration, false),
    ("expires_at", "expiresAt", Kind::Timestamp, true),
    ("env", "environment", Kind::Text, false),
    ("org_id", "orgId", Kind::Text, true),
    ("parent_id", "parentId", Kind::Uuid, false),
    ("policy", "policy", Kind::Text, false),
    ("rate_limit", "rateLimit", Kind::RateLimit, true),
    ("quota", "quota", Kind::Quota, true),
    ("allowed_ips", "allowedIPs", Kind::Ips, false),
    ("blocked_ips", "blockedIPs", Kind::Ips, false),
    ("allowed_regions", "allowedRegions", Kind::Regions, false),
    ("blocked_regions", "blockedRegions", Kind::Regions, false),
    ("disable_at", "disableAt", Kind::Timestamp, true),
    ("revoke_at", "revokeAt", Kind::Timestamp, true),
    ("notify_before", "notifyBefore", Kind::Duration, true),
    ("signing", "signing", Kind::Bool, false),
    ("actor", "actor", Kind::Text, false),
    ("enabled", "enabled", Kind::Bool, false),
];

fn find(k: &str) -> Option<&'static (&'static str, &'static str, Kind, bool)> {
    OPTIONS
        .iter()
        .find(|(s, c, _, _)| k == *s || k.eq_ignore_ascii_case(c))
}

/// Checks and normalises `opts`. `prefix` names where the object came from in messages
/// (`specs[2].`); `required_owner` is false for updates and overrides.
pub fn normalize(opts: &Value, prefix: &str, required_owner: bool) -> Res<Map<String, Value>> {
    let obj = match opts {
        Value::Object(o) => o,
        Value::Null if !required_owner => return Ok(Map::new()),
        _ => return err(prefix.trim_end_matches('.'), "must be a JSON object"),
    };
    let mut out = Map::new();
    for (k, v) in obj {
        let Some(&(name, _, kind, nullable)) = find(k) else {
            return err(&format!("{prefix}{k}"), "unknown option");
        };
        // (the argument's name is spelled out only for an error: most values are fine)
        let arg = || format!("{prefix}{name}");
        if out.contains_key(name) {
            return err(&arg(), "given twice");
        }
        let value = if v.is_null() {
            if !nullable {
                continue;
            }
            Value::Null
        } else {
            match check(kind, v, "") {
                Ok(value) => value,
                Err(_) => check(kind, v, &arg())?,
            }
        };
        out.insert(name.to_string(), value);
    }
    if required_owner && !out.contains_key("owner_id") {
        return err(&format!("{prefix}owner_id"), "is required");
    }
    if out.contains_key("expires_in") && out.get("expires_at").is_some_and(|v| !v.is_null()) {
        return err(
            &format!("{prefix}expires_in"),
            "give expires_in or expires_at, not both",
        );
    }
    Ok(out)
}

fn check(kind: Kind, v: &Value, arg: &str) -> Res<Value> {
    match kind {
        Kind::Text => text(v, arg, false).map(Value::from),
        Kind::OptionalText => text(v, arg, true).map(Value::from),
        Kind::Uuid => {
            let s = text(v, arg, false)?;
            if !is_uuid(s) {
                return err(arg, format!("{s:?} is not a uuid"));
            }
            Ok(Value::from(s))
        }
        Kind::Timestamp => text(v, arg, false).map(Value::from),
        Kind::Duration => {
            let s = text(v, arg, false).map_err(|e| OptionError {
                is_duration: true,
                ..e
            })?;
            if let Some(Err(why)) = duration::parse_short(s) {
                return Err(OptionError {
                    arg: arg.into(),
                    why,
                    is_duration: true,
                });
            }
            Ok(Value::from(s))
        }
        Kind::Scopes => string_list(v, arg, scopes::valid_scope, "a scope"),
        Kind::Tags => string_list(
            v,
            arg,
            |s| !s.is_empty() && s.len() <= 128,
            "a tag of 1-128 characters",
        ),
        Kind::Object => {
            if !v.is_object() {
                return err(arg, "must be a JSON object");
            }
            json_size(v, arg)?;
            Ok(v.clone())
        }
        Kind::Resources => {
            scopes::check_resources(v).or_else(|why| err(arg, why))?;
            json_size(v, arg)?;
            Ok(v.clone())
        }
        Kind::RateLimit => rate_limit(v, arg),
        Kind::Quota => quota(v, arg),
        Kind::Ips => {
            let list = string_list(
                v,
                arg,
                |s| net::parse_net(s).is_ok(),
                "an IP address or CIDR block",
            )?;
            Ok(list)
        }
        Kind::Regions => {
            let list = string_list(
                v,
                arg,
                net::valid_region,
                "an ISO 3166-1 alpha-2 country code",
            )?;
            let upper = list.as_array().into_iter().flatten();
            Ok(upper
                .filter_map(|s| s.as_str())
                .map(|s| Value::from(s.to_ascii_uppercase()))
                .collect())
        }
        Kind::Bool => v
            .as_bool()
            .map(Value::from)
            .ok_or(())
            .or_else(|_| err(arg, "must be true or false")),
    }
}

fn text<'a>(v: &'a Value, arg: &str, may_be_empty: bool) -> Res<&'a str> {
    let s = v
        .as_str()
        .ok_or(())
        .or_else(|_| err(arg, "must be a string"))?;
    if !may_be_empty && s.trim().is_empty() {
        return err(arg, "must not be empty");
    }
    if s.contains('\0') {
        return err(arg, "must not contain a NUL character");
    }
    if s.len() > MAX_TEXT {
        return err(arg, format!("must be at most {MAX_TEXT} bytes"));
    }
    Ok(s)
}

fn json_size(v: &Value, arg: &str) -> Res<()> {
    if v.to_string().len() > MAX_JSON_BYTES {
        return err(
            arg,
            format!("must be at most {MAX_JSON_BYTES} bytes of JSON"),
        );
    }
    Ok(())
}

/// A JSON array of distinct strings each passing `ok`, order kept, duplicates dropped.
fn string_list(v: &Value, arg: &str, ok: impl Fn(&str) -> bool, what: &str) -> Res<Value> {
    let arr = v
        .as_array()
        .ok_or(())
        .or_else(|_| err(arg, "must be an array of strings"))?;
    if arr.len() > MAX_LIST {
        return err(
            arg,
            format!("must hold at most {MAX_LIST} entries, got {}", arr.len()),
        );
    }
    let mut out: Vec<Value> = Vec::with_capacity(arr.len());
    for item in arr {
        let s = item
            .as_str()
            .ok_or(())
            .or_else(|_| err(arg, format!("{item} is not a string")))?;
        if !ok(s) || s.contains('\0') {
            return err(arg, format!("{s:?} is not {what}"));
        }
        if !out.iter().any(|o| o == item) {
            out.push(item.clone());
        }
    }
    Ok(Value::Array(out))
}

/// `{"requests": n > 0, "window": duration}`.
pub fn rate_limit(v: &Value, arg: &str) -> Res<Value> {
    let obj = v.as_object().ok_or(()).or_else(|_| {
        err(
            arg,
            "must be an object like {\"requests\": 100, \"window\": \"1m\"}",
        )
    })?;
    if let Some(k) = obj
        .keys()
        .find(|k| !["requests", "window"].contains(&k.as_str()))
    {
        return err(
            arg,
            format!("unknown field {k:?} (a rate limit has requests and window)"),
        );
    }
    positive_int(obj.get("requests"), &format!("{arg}.requests"))?;
    let Some(window) = obj.get("window").filter(|w| !w.is_null()) else {
        return err(&format!("{arg}.window"), "is required");
    };
    match window.as_str().map(duration::parse_short) {
        Some(Some(Ok(_))) => Ok(v.clone()),
        Some(Some(Err(why))) => Err(OptionError {
            arg: format!("{arg}.window"),
            why,
            is_duration: true,
        }),
        _ => Err(OptionError {
            arg: format!("{arg}.window"),
            why: "must be a duration such as \"30s\", \"1m\", \"1h\" or \"1d\"".into(),
            is_duration: true,
        }),
    }
}

/// `{"limit": n > 0, "period": day|week|month|year, "on_exceeded": block|warn|throttle}`.
pub fn quota(v: &Value, arg: &str) -> Res<Value> {
    let obj = v.as_object().ok_or(()).or_else(|_| {
        err(
            arg,
            "must be an object like {\"limit\": 10000, \"period\": \"month\"}",
        )
    })?;
    let mut out = Map::new();
    for (k, val) in obj {
        match k.as_str() {
            "limit" => {
                positive_int(Some(val), &format!("{arg}.limit"))?;
                out.insert("limit".into(), val.clone());
            }
            "period" => {
                let p = val
                    .as_str()
                    .filter(|p| ["day", "week", "month", "year"].contains(p));
                let p = p.ok_or(()).or_else(|_| {
                    err(&format!("{arg}.period"), "must be day, week, month or year")
                })?;
                out.insert("period".into(), Value::from(p));
            }
            "on_exceeded" | "onExceeded" => {
                let p = val
                    .as_str()
                    .filter(|p| ["block", "warn", "throttle"].contains(p));
                let p = p.ok_or(()).or_else(|_| {
                    err(
                        &format!("{arg}.on_exceeded"),
                        "must be block, warn or throttle",
                    )
                })?;
                out.insert("on_exceeded".into(), Value::from(p));
            }
            other => {
                return err(
                    arg,
                    format!("unknown field {other:?} (a quota has limit, period and on_exceeded)"),
                )
            }
        }
    }
    if !out.contains_key("limit") {
        return err(&format!("{arg}.limit"), "is required");
    }
    out.entry("period").or_insert_with(|| Value::from("month"));
    out.entry("on_exceeded")
        .or_insert_with(|| Value::from("block"));
    Ok(Value::Object(out))
}

fn positive_int(v: Option<&Value>, arg: &str) -> Res<i64> {
    match v.and_then(Value::as_i64) {
        Some(n) if n > 0 && n <= MAX_COUNT => Ok(n),
        Some(n) if n > 0 => err(arg, format!("must be at most {MAX_COUNT}")),
        _ => err(arg, "must be a positive integer"),
    }
}

pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_character_is_refused_in_text_and_lists() {
        // (SQL text and jsonb cannot hold one; a caller in Rust could)
        let o = json!({"owner_id": "o", "name": "a\u{0}b"});
        assert_eq!(normalize(&o, "", true).unwrap_err().arg, "name");
        let o = json!({"owner_id": "o", "tags": ["a\u{0}b"]});
        assert_eq!(normalize(&o, "", true).unwrap_err().arg, "tags");
    }
    use serde_json::json;

    fn bad(v: Value) -> OptionError {
        normalize(&v, "", true).unwrap_err()
    }

    #[test]
    fn camel_case_is_normalised() {
        let o = normalize(
            &json!({"ownerId": "u1", "expiresIn": "30d", "allowedIPs": ["10.0.0.0/8"]}),
            "",
            true,
        )
        .unwrap();
        assert_eq!(o["owner_id"], "u1");
        assert_eq!(o["expires_in"], "30d");
        assert_eq!(o["allowed_ips"], json!(["10.0.0.0/8"]));
    }

    #[test]
    fn owner_is_required_for_create_only() {
        assert_eq!(bad(json!({"name": "x"})).arg, "owner_id");
        assert!(normalize(&json!({"name": "x"}), "", false).is_ok());
        assert_eq!(bad(json!({"owner_id": ""})).why, "must not be empty");
        assert_eq!(bad(json!({"owner_id": 5})).why, "must be a string");
    }

    #[test]
    fn wrong_types_name_the_argument() {
        assert_eq!(
            bad(json!({"owner_id": "u", "scopes": "read"})).arg,
            "scopes"
        );
        assert_eq!(bad(json!({"owner_id": "u", "scopes": [1]})).arg, "scopes");
        assert_eq!(
            bad(json!({"owner_id": "u", "metadata": []})).arg,
            "metadata"
        );
        assert_eq!(
            bad(json!({"owner_id": "u", "allowed_ips": ["999.1.1.1"]})).arg,
            "allowed_ips"
        );
        assert_eq!(
            bad(json!({"owner_id": "u", "allowed_regions": ["Germany"]})).arg,
            "allowed_regions"
        );
        assert_eq!(
            bad(json!({"owner_id": "u", "parent_id": "nope"})).arg,
            "parent_id"
        );
        assert_eq!(
            bad(json!({"owner_id": "u", "signing": "yes"})).arg,
            "signing"
        );
        assert_eq!(bad(json!({"owner_id": "u", "colour": "red"})).arg, "colour");
        assert_eq!(
            normalize(&json!({"scopes": 1}), "specs[2].", false)
                .unwrap_err()
                .arg,
            "specs[2].scopes"
        );
    }

    #[test]
    fn huge_arrays_are_refused() {
        let many: Vec<String> = (0..1001).map(|i| format!("s{i}")).collect();
        assert!(bad(json!({"owner_id": "u", "scopes": many}))
            .why
            .contains("at most"));
    }

    #[test]
    fn durations_are_22007() {
        let e = bad(json!({"owner_id": "u", "rate_limit": {"requests": 5, "window": "soon"}}));
        assert!(e.is_duration);
        assert_eq!(e.arg, "rate_limit.window");
        let e = bad(json!({"owner_id": "u", "expires_in": "99999999999d"}));
        assert!(e.is_duration);
        assert!(
            !bad(json!({"owner_id": "u", "rate_limit": {"requests": 0, "window": "1m"}}))
                .is_duration
        );
        // A missing field is not a malformed duration.
        let e = bad(json!({"owner_id": "u", "rate_limit": {"requests": 5}}));
        assert!(!e.is_duration);
        assert_eq!(e.arg, "rate_limit.window");
    }

    #[test]
    fn counts_are_capped() {
        let e = bad(json!({"owner_id": "u", "quota": {"limit": i64::MAX}}));
        assert_eq!(e.arg, "quota.limit");
        assert!(e.why.contains("at most"));
        let e = bad(
            json!({"owner_id": "u", "rate_limit": {"requests": MAX_COUNT + 1, "window": "1s"}}),
        );
        assert_eq!(e.arg, "rate_limit.requests");
        assert!(normalize(
            &json!({"owner_id": "u", "quota": {"limit": MAX_COUNT}}),
            "",
            true
        )
        .is_ok());
    }

    #[test]
    fn quota_gets_defaults() {
        let o = normalize(&json!({"owner_id": "u", "quota": {"limit": 10}}), "", true).unwrap();
        assert_eq!(
            o["quota"],
            json!({"limit": 10, "period": "month", "on_exceeded": "block"})
        );
        assert_eq!(
            bad(json!({"owner_id": "u", "quota": {"limit": 10, "period": "hour"}})).arg,
            "quota.period"
        );
    }

    #[test]
    fn nulls_clear_only_clearable_settings() {
        let o = normalize(&json!({"rate_limit": null, "scopes": null}), "", false).unwrap();
        assert_eq!(o.get("rate_limit"), Some(&Value::Null));
        assert!(o.get("scopes").is_none());
    }

    #[test]
    fn lists_are_deduplicated_and_regions_upper_cased() {
        let o = normalize(
            &json!({"owner_id": "u", "scopes": ["a", "a", "b"], "blocked_regions": ["de"]}),
            "",
            true,
        )
        .unwrap();
        assert_eq!(o["scopes"], json!(["a", "b"]));
        assert_eq!(o["blocked_regions"], json!(["DE"]));
    }

    #[test]
    fn expiry_given_twice() {
        assert_eq!(
            bad(json!({"owner_id": "u", "expires_in": "1d", "expires_at": "2030-01-01"})).arg,
            "expires_in"
        );
    }

    #[test]
    fn uuids() {
        assert!(is_uuid("7f1c2a34-0b1e-4c5d-9e8f-0123456789ab"));
        assert!(!is_uuid("7f1c2a34-0b1e-4c5d-9e8f-0123456789a"));
    }
}
