//! Import records: checks one record of `keypal_import`'s data and turns it into the
//! columns of a `keypal.keys` row (as a JSON object for `jsonb_populate_record`).
//!
//! Two kinds of record are read:
//! - keypal's own (what `keypal_export` writes): the key's columns in snake_case,
//!   `key_hash` as hex, never a plaintext;
//! - the TypeScript keypal's `{id, keyHash, metadata: {ownerId, scopes, name, expiresAt,
//!   revokedAt, enabled, …}}`. Its ids need not be uuids: one that is not becomes a uuid
//!   derived from it (the same id always gives the same uuid, so re-imports and `rotatedTo`
//!   links agree), and the original is kept in `metadata.imported_id`.
//!
//! Settings go through `options::normalize`, the checks `keypal_create` makes; the state a
//! create never takes (timestamps, revocation, rotation links) is checked here. Every
//! error names the record and field: `data[3].owner_id`. Pure Rust.

use crate::keys::to_hex;
use crate::options::{self, err, Res};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// What a record holds besides the settings `options::normalize` checks: the column, its
/// TypeScript spelling, and its kind.
#[derive(Clone, Copy, PartialEq)]
enum State {
    Timestamp,
    Text,
    Link, // another key's id
}

const STATE: &[(&str, &str, State)] = &[
    ("created_at", "createdAt", State::Timestamp),
    ("updated_at", "updatedAt", State::Timestamp),
    ("last_used_at", "lastUsedAt", State::Timestamp),
    ("revoked_at", "revokedAt", State::Timestamp),
    ("revoke_reason", "revokeReason", State::Text),
    ("revoked_by", "revokedBy", State::Text),
    ("rotated_from", "rotatedFrom", State::Link),
    ("rotated_to", "rotatedTo", State::Link),
];

/// The TypeScript keypal's metadata fields that are keypal settings, spelled as it spells
/// them; any other field is the application's own and stays in `metadata` (a field named
/// like a keypal setting in another case, `Quota` or `environment`, included).
const TS_SETTINGS: &[&str] = &[
    "ownerId",
    "orgId",
    "name",
    "description",
    "scopes",
    "resources",
    "tags",
    "expiresAt",
    "enabled",
    "metadata",
];

/// The TypeScript keypal's own state fields (any other is the application's, kept in
/// `metadata`, even one named like a keypal column).
const TS_STATE: &[&str] = &["createdAt", "lastUsedAt", "revokedAt", "rotatedTo"];

/// Settings a record may not carry: they describe a call, not a key.
const NOT_IN_RECORDS: &[&str] = &["expires_in", "actor"];

/// Timestamps among the settings (checked here: a record's must carry a time zone).
const SETTING_TIMESTAMPS: &[&str] = &["expires_at", "disable_at", "revoke_at"];

/// Which kind of record this was (for the audit log's context).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Source {
    Keypal,
    TypeScript,
}

impl Source {
    /// Its name in keypal_import's context: `keypal` or `typescript`.
    pub fn name(self) -> &'static str {
        match self {
            Source::Keypal => "keypal",
            Source::TypeScript => "typescript",
        }
    }
}

/// `record` of a record's JSON text.
pub fn record_text(text: &str, index: usize) -> Res<(Map<String, Value>, Source)> {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => record(&v, index),
        Err(e) => err(&format!("data[{index}]"), format!("cannot be read: {e}")),
    }
}

/// Checks record `index` of the data and returns its columns.
pub fn record(v: &Value, index: usize) -> Res<(Map<String, Value>, Source)> {
    let at = format!("data[{index}]");
    let Value::Object(obj) = v else {
        return err(&at, "must be a JSON object (a key record)");
    };
    if obj.contains_key("keyHash") {
        typescript(obj, &at).map(|m| (m, Source::TypeScript))
    } else if obj.contains_key("key_hash") {
        keypal(obj, &at).map(|m| (m, Source::Keypal))
    } else {
        err(
            &at,
            "must hold key_hash (a keypal_export record) or keyHash (a TypeScript keypal record)",
        )
    }
}

/// keypal's own record: the columns, snake_case.
fn keypal(obj: &Map<String, Value>, at: &str) -> Res<Map<String, Value>> {
    let mut out = Map::new();
    let id = obj.get("id").unwrap_or(&Value::Null);
    match id.as_str() {
        Some(s) if options::is_uuid(s) => out.insert("id".into(), s.to_ascii_lowercase().into()),
        _ => return err(&format!("{at}.id"), "must be a uuid"),
    };
    hash(
        obj.get("key_hash"),
        obj.get("algorithm"),
        at,
        "key_hash",
        &mut out,
    )?;
    let mut settings = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            "id" | "key_hash" | "algorithm" => {}
            _ => match STATE.iter().find(|(name, _, _)| name == k) {
                Some(&(name, _, kind)) => state(name, kind, v, at, false, &mut out)?,
                None => {
                    settings.insert(k.clone(), v.clone());
                }
            },
        }
    }
    out.extend(self::settings(&Value::Object(settings), at)?);
    Ok(out)
}

/// The TypeScript keypal's record: `{id, keyHash, metadata: {...}}`.
fn typescript(obj: &Map<String, Value>, at: &str) -> Res<Map<String, Value>> {
    if let Some(k) = obj
        .keys()
        .find(|k| !["id", "keyHash", "metadata"].contains(&k.as_str()))
    {
        return err(
            &format!("{at}.{k}"),
            "unknown field (a TypeScript keypal record holds id, keyHash and metadata)",
        );
    }
    let mut out = Map::new();
    let id = match obj.get("id").and_then(Value::as_str) {
        Some(s) if !s.is_empty() && s.len() <= options::MAX_TEXT => s,
        _ => return err(&format!("{at}.id"), "must be a non-empty string"),
    };
    let (uuid, imported) = ts_id(id);
    out.insert("id".into(), uuid.into());
    hash(obj.get("keyHash"), None, at, "keyHash", &mut out)?;
    let Some(Value::Object(meta)) = obj.get("metadata") else {
        return err(
            &format!("{at}.metadata"),
            "must be a JSON object holding at least ownerId",
        );
    };
    let meta_at = format!("{at}.metadata");
    let mut settings = Map::new();
    // Fields neither keypal setting nor state: the application's own, kept in metadata.
    let mut custom = Map::new();
    for (k, v) in meta {
        if let Some(&(name, _, kind)) = STATE
            .iter()
            .find(|(_, c, _)| k == c && TS_STATE.contains(c))
        {
            state(name, kind, v, &meta_at, true, &mut out)?;
        } else if TS_SETTINGS.contains(&k.as_str()) {
            settings.insert(k.clone(), v.clone());
        } else {
            custom.insert(k.clone(), v.clone());
        }
    }
    if imported {
        custom.insert("imported_id".into(), id.into());
    }
    if !custom.is_empty() {
        let mut merged = match settings.remove("metadata") {
            Some(Value::Object(m)) => m,
            Some(Value::Null) | None => Map::new(),
            Some(_) => return err(&format!("{meta_at}.metadata"), "must be a JSON object"),
        };
        merged.extend(custom);
        settings.insert("metadata".into(), Value::Object(merged));
    }
    out.extend(self::settings(&Value::Object(settings), &meta_at)?);
    Ok(out)
}

/// The settings: `keypal_create`'s checks, plus a time zone on every timestamp.
fn settings(v: &Value, at: &str) -> Res<Map<String, Value>> {
    let prefix = format!("{at}.");
    let mut m = options::normalize(v, &prefix, true)?;
    for k in NOT_IN_RECORDS {
        if m.contains_key(*k) {
            let why = if *k == "expires_in" {
                "not in a record: give expires_at"
            } else {
                "unknown field"
            };
            return err(&format!("{prefix}{k}"), why);
        }
    }
    for k in SETTING_TIMESTAMPS {
        if let Some(Value::String(s)) = m.get(*k) {
            check_timestamp(s, &format!("{prefix}{k}"))?;
        }
    }
    // A duration written as an interval ("7 days", as keypal_export writes it) is checked
    // by the SQL layer, which owns interval input; a short one is exact here.
    if let Some(Value::String(s)) = m.get("notify_before") {
        if let Some(Ok(span)) = crate::duration::parse_short(s) {
            let text = format!("{} days {} microseconds", span.days, span.micros);
            m.insert("notify_before".into(), text.into());
        }
    }
    Ok(m)
}

/// One state field into `out`; JSON null means "none".
fn state(
    name: &str,
    kind: State,
    v: &Value,
    at: &str,
    ts: bool,
    out: &mut Map<String, Value>,
) -> Res<()> {
    let arg = || format!("{at}.{name}");
    if v.is_null() {
        return Ok(());
    }
    let Some(s) = v.as_str() else {
        return err(&arg(), "must be a string or null");
    };
    let value = match kind {
        State::Timestamp => {
            if !is_timestamp(s) {
                check_timestamp(s, &arg())?;
            }
            s.to_string()
        }
        State::Text if s.contains('\0') => return err(&arg(), "must not contain a NUL character"),
        State::Text if s.len() <= options::MAX_TEXT => s.to_string(),
        State::Text => {
            return err(
                &arg(),
                format!("must be at most {} bytes", options::MAX_TEXT),
            )
        }
        // The TypeScript keypal's links name its own ids: map them as the ids are mapped.
        State::Link if ts && !s.is_empty() => ts_id(s).0,
        State::Link if options::is_uuid(s) => s.to_ascii_lowercase(),
        State::Link => return err(&arg(), format!("{s:?} is not a uuid")),
    };
    out.insert(name.to_string(), value.into());
    Ok(())
}

/// The key's hash: lower- or upper-case hex of a sha256 (64 digits) or sha512 (128)
/// digest. `algorithm`, when given, must agree.
fn hash(
    v: Option<&Value>,
    algorithm: Option<&Value>,
    at: &str,
    field: &str,
    out: &mut Map<String, Value>,
) -> Res<()> {
    let arg = || format!("{at}.{field}");
    let Some(s) = v.and_then(Value::as_str) else {
        return err(&arg(), "must be the key's hash as hex (sha256 or sha512)");
    };
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return err(&arg(), "must be hex digits");
    }
    let alg = match s.len() {
        64 => "sha256",
        128 => "sha512",
        n => {
            return err(
                &arg(),
                format!("must be 64 (sha256) or 128 (sha512) hex digits, not {n}"),
            )
        }
    };
    match algorithm {
        None | Some(Value::Null) => {}
        Some(Value::String(a)) if a.eq_ignore_ascii_case(alg) => {}
        Some(a) => {
            return err(
                &format!("{at}.algorithm"),
                format!("{a} does not match a {alg} hash of {} hex digits", s.len()),
            )
        }
    }
    out.insert(
        "key_hash".into(),
        format!("\\x{}", s.to_ascii_lowercase()).into(),
    );
    out.insert("algorithm".into(), alg.into());
    Ok(())
}

/// A TypeScript keypal id as a uuid: itself if it is one, else a uuid derived from it
/// (sha256 of a fixed label and the id, stamped as an RFC 9562 version 8 uuid). The
/// second value says whether it was derived.
pub fn ts_id(id: &str) -> (String, bool) {
    if options::is_uuid(id) {
        return (id.to_ascii_lowercase(), false);
    }
    let b: [u8; 16] = Sha256::digest(format!("keypal import id:{id}").as_bytes())[..16]
        .try_into()
        .unwrap_or([0; 16]);
    let h = to_hex(&crate::keys::uuid_stamped(b, 8));
    (
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        ),
        true,
    )
}

/// An ISO 8601 / RFC 3339 time with a zone: `2025-01-15T10:30:00Z`,
/// `2025-01-15 10:30:00.123456+00:00`. A record's times must not depend on the session's
/// TimeZone, and must be what PostgreSQL's input reads.
fn check_timestamp(s: &str, arg: &str) -> Res<()> {
    if is_timestamp(s) {
        Ok(())
    } else {
        err(
            arg,
            format!("{s:?} is not a timestamp with a time zone (e.g. 2025-01-15T10:30:00Z)"),
        )
    }
}

pub fn is_timestamp(s: &str) -> bool {
    if matches!(s, "infinity" | "-infinity") {
        return true; // as keypal_export writes a key that never expires
    }
    // A date before the common era, as PostgreSQL writes it.
    let s = s.strip_suffix(" BC").unwrap_or(s);
    // The year: 4 to 6 digits (PostgreSQL's timestamps reach 294276; the last year is left
    // out, where an offset could carry a time past the end).
    let year_len = s.bytes().take_while(u8::is_ascii_digit).count();
    if !(4..=6).contains(&year_len) {
        return false;
    }
    let (year, rest) = s.split_at(year_len);
    let b = rest.as_bytes();
    let num = |from: usize, to: usize| -> Option<u32> {
        let d = b.get(from..to)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0, |n, c| n * 10 + u32::from(c - b'0')))
    };
    // -MM-DDTHH:MM:SS
    let (Ok(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec)) = (
        year.parse::<u32>(),
        num(1, 3),
        num(4, 6),
        num(7, 9),
        num(10, 12),
        num(13, 15),
    ) else {
        return false;
    };
    if b[0] != b'-'
        || b[3] != b'-'
        || !matches!(b[6], b'T' | b't' | b' ')
        || b[9] != b':'
        || b[12] != b':'
    {
        return false;
    }
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if y == 0
        || y > 294_275
        || !(1..=12).contains(&mo)
        || d == 0
        || d > days[mo as usize - 1]
        || h > 23
        || mi > 59
        || sec > 59
    {
        return false;
    }
    let mut rest = &rest[15..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 9 {
            return false;
        }
        rest = &frac[n..];
    }
    if matches!(rest, "Z" | "z") {
        return true;
    }
    // ±HH, ±HHMM, ±HH:MM or ±HH:MM:SS (a zone's local mean time, as PostgreSQL writes old
    // dates), within what PostgreSQL takes (15:59:59).
    let z = rest.as_bytes();
    let two = |i: usize| {
        z.get(i..i + 2)
            .filter(|d| d.iter().all(u8::is_ascii_digit))
            .map(|d| (d[0] - b'0') * 10 + (d[1] - b'0'))
    };
    let (minutes, seconds) = match z.len() {
        3 => (Some(0), Some(0)),
        5 => (two(3), Some(0)),
        6 if z[3] == b':' => (two(4), Some(0)),
        9 if z[3] == b':' && z[6] == b':' => (two(4), two(7)),
        _ => (None, None),
    };
    matches!(z.first(), Some(b'+' | b'-'))
        && two(1).is_some_and(|hh| hh <= 15)
        && minutes.is_some_and(|mm| mm <= 59)
        && seconds.is_some_and(|ss| ss <= 59)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const H256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn bad(v: Value) -> String {
        record(&v, 3).unwrap_err().arg
    }

    #[test]
    fn keypal_records_keep_every_column() {
        let (m, src) = record(
            &json!({"id": "6F9619FF-8B86-D011-B42D-00C04FC964FF", "key_hash": H256.to_uppercase(),
                    "owner_id": "u", "scopes": ["read"], "revoked_at": "2025-01-15T10:30:00Z",
                    "rotated_to": "6f9619ff-8b86-d011-b42d-00c04fc964aa", "notify_before": "7d",
                    "enabled": false, "created_at": "2024-01-01 00:00:00.5+02"}),
            0,
        )
        .unwrap();
        assert_eq!(src, Source::Keypal);
        assert_eq!(m["id"], "6f9619ff-8b86-d011-b42d-00c04fc964ff");
        assert_eq!(m["key_hash"], format!("\\x{H256}"));
        assert_eq!(m["algorithm"], "sha256");
        assert_eq!(m["enabled"], false);
        assert_eq!(m["notify_before"], "7 days 0 microseconds");
        assert_eq!(m["rotated_to"], "6f9619ff-8b86-d011-b42d-00c04fc964aa");
    }

    #[test]
    fn bad_records_name_index_and_field() {
        let id = "6f9619ff-8b86-d011-b42d-00c04fc964ff";
        assert_eq!(bad(json!([])), "data[3]");
        assert_eq!(bad(json!({"id": id})), "data[3]");
        assert_eq!(
            bad(json!({"id": "x", "key_hash": H256, "owner_id": "u"})),
            "data[3].id"
        );
        assert_eq!(
            bad(json!({"id": id, "key_hash": "abc", "owner_id": "u"})),
            "data[3].key_hash"
        );
        assert_eq!(
            bad(json!({"id": id, "key_hash": H256, "algorithm": "sha512", "owner_id": "u"})),
            "data[3].algorithm"
        );
        assert_eq!(bad(json!({"id": id, "key_hash": H256})), "data[3].owner_id");
        assert_eq!(
            bad(json!({"id": id, "key_hash": H256, "owner_id": "u", "scopes": "x"})),
            "data[3].scopes"
        );
        assert_eq!(
            bad(json!({"id": id, "key_hash": H256, "owner_id": "u", "expires_in": "1d"})),
            "data[3].expires_in"
        );
        assert_eq!(
            bad(json!({"id": id, "key_hash": H256, "owner_id": "u", "actor": "me"})),
            "data[3].actor"
        );
        assert_eq!(
            bad(json!({"id": id, "key_hash": H256, "owner_id": "u", "revoked_at": "yesterday"})),
            "data[3].revoked_at"
        );
        assert_eq!(
            bad(json!({"id": id, "key_hash": H256, "owner_id": "u", "expires_at": "2025-01-15"})),
            "data[3].expires_at"
        );
        assert_eq!(
            bad(json!({"id": id, "key_hash": H256, "owner_id": "u", "rotated_from": "k1"})),
            "data[3].rotated_from"
        );
        assert_eq!(
            bad(json!({"id": id, "key_hash": H256, "owner_id": "u", "bogus": 1})),
            "data[3].bogus"
        );
        assert_eq!(bad(json!({"id": "k", "keyHash": H256})), "data[3].metadata");
        assert_eq!(
            bad(json!({"id": "k", "keyHash": H256, "metadata": {}})),
            "data[3].metadata.owner_id"
        );
        assert_eq!(
            bad(json!({"id": "", "keyHash": H256, "metadata": {"ownerId": "u"}})),
            "data[3].id"
        );
        assert_eq!(
            bad(json!({"id": "k", "keyHash": H256, "extra": 1, "metadata": {"ownerId": "u"}})),
            "data[3].extra"
        );
        assert_eq!(
            bad(
                json!({"id": "k", "keyHash": H256, "metadata": {"ownerId": "u", "expiresAt": "soon"}})
            ),
            "data[3].metadata.expires_at"
        );
    }

    #[test]
    fn typescript_records_map_ids_and_keep_custom_metadata() {
        let (m, src) = record(
            &json!({"id": "key_abc", "keyHash": H256.repeat(2), "metadata": {
                "ownerId": "user_1", "scopes": ["read"], "expiresAt": null, "enabled": true,
                "revokedAt": "2025-01-15T10:30:00.000Z", "rotatedTo": "key_def", "plan": "pro"}}),
            0,
        )
        .unwrap();
        assert_eq!(src, Source::TypeScript);
        assert_eq!(m["algorithm"], "sha512");
        assert_eq!(m["id"], ts_id("key_abc").0);
        assert_eq!(m["rotated_to"], ts_id("key_def").0);
        assert_eq!(m["owner_id"], "user_1");
        assert_eq!(
            m["metadata"],
            json!({"plan": "pro", "imported_id": "key_abc"})
        );
        assert!(!m.contains_key("expires_at") || m["expires_at"].is_null());
        assert!(options::is_uuid(&ts_id("key_abc").0));
        assert_eq!(ts_id("key_abc"), ts_id("key_abc"));
        assert_ne!(ts_id("key_abc").0, ts_id("key_abd").0);
        assert_eq!(&ts_id("key_abc").0[14..15], "8");
    }

    #[test]
    fn unreadable_records_name_the_record() {
        assert_eq!(record_text("{\"x\": 1e400}", 2).unwrap_err().arg, "data[2]");
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert_eq!(record_text(&deep, 0).unwrap_err().arg, "data[0]");
    }

    #[test]
    fn typescript_fields_not_its_own_stay_metadata() {
        let (m, _) = record(
            &json!({"id": "k", "keyHash": H256, "metadata": {
                "ownerId": "u", "environment": "prod", "Quota": 5, "policy": "x", "parentId": "p",
                "revoked_at": "2025-01-01T00:00:00Z"}}),
            0,
        )
        .unwrap();
        assert!(!m.contains_key("env") && !m.contains_key("quota") && !m.contains_key("policy"));
        assert!(!m.contains_key("revoked_at"));
        assert_eq!(
            m["metadata"],
            json!({"environment": "prod", "Quota": 5, "policy": "x", "parentId": "p",
                   "revoked_at": "2025-01-01T00:00:00Z", "imported_id": "k"})
        );
    }

    #[test]
    fn timestamps_need_a_zone() {
        for ok in [
            "2025-01-15T10:30:00Z",
            "2024-02-29 23:59:59.123456+00:00",
            "2025-01-15T10:30:00-0530",
            "2025-01-15t10:30:00+05",
            "10000-01-01T00:00:00+00:00",
            "1970-01-01T00:00:00-00:44:30",
            "0044-03-15T12:00:00+00:00 BC",
            "2025-01-15T10:30:00+15:59",
            "infinity",
            "-infinity",
        ] {
            assert!(is_timestamp(ok), "{ok}");
        }
        for no in [
            "2025-01-15",
            "2025-01-15T10:30:00",
            "2023-02-29T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-01-15T24:00:00Z",
            "2025-01-15T10:30:00.Z",
            "2025-01-15T10:30:00+5",
            "",
            "2025-01-15T10:30:00Z ",
            "2025-01-15T10:30:00+16",
            "2025-01-15T10:30:00+05:60",
            "2025-01-15T10:30:00+99",
            "294277-01-01T00:00:00Z",
            "294276-12-31T23:00:00-05:00",
            "1970-01-01T00:00:00-00:44:60",
            "025-01-15T10:30:00Z",
            "Infinity",
        ] {
            assert!(!is_timestamp(no), "{no}");
        }
    }
}
