//! What a standby ships to the primary and what the primary answers, as JSON text, pure Rust.
//!
//! A batch is an array of one object per key: `k` the key id (32 hex digits), `l` its last
//! use, `h` its hours (`[start, requests]`), `q` its quota period and count, `w` the use
//! that crossed a warning quota, `r` its rate window (`[length, [[bucket, requests], …]]`);
//! times are timestamptz microseconds. The answer is an array of `{k, q, r}`: the key's
//! global quota use and window buckets, for the keys whose batch entry had `q` or `r`.

use super::entry::{Global, Hour, Taken};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Default)]
struct Item {
    k: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    h: Vec<(i64, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    q: Option<(i64, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    w: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<(i64, Vec<(i64, i64)>)>,
}

fn hex(key: &[u8; 16]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<[u8; 16], String> {
    let bad = || format!("not a key id: {s:?}");
    if s.len() != 32 || !s.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}

/// The batch as shipped; quota counts left out unless `with_quota` (under limit_split each
/// server keeps its own).
pub fn encode(batch: &[Taken], with_quota: bool) -> String {
    let items: Vec<Item> = batch
        .iter()
        .map(|t| Item {
            k: hex(&t.key),
            l: t.last_used,
            h: t.hours.iter().map(|h| (h.start, h.n)).collect(),
            q: t.quota.filter(|_| with_quota),
            w: t.warn.filter(|_| with_quota),
            r: t.window.clone(),
        })
        .collect();
    serde_json::to_string(&items).unwrap_or_else(|_| "[]".into())
}

/// A shipped batch, as the primary reads it. Counts must be positive, windows positive in
/// length; an error names what is wrong.
pub fn decode(text: &str) -> Result<Vec<Taken>, String> {
    let items: Vec<Item> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    items
        .into_iter()
        .map(|i| {
            let key = unhex(&i.k)?;
            // (A quota count may be 0: a standby asking for the key's global use.)
            let counts =
                i.h.iter()
                    .map(|h| h.1)
                    .chain(i.w)
                    .chain(i.r.iter().flat_map(|r| r.1.iter().map(|b| b.1)));
            if counts.into_iter().any(|n| n <= 0)
                || i.q.is_some_and(|q| q.1 < 0)
                || i.r.as_ref().is_some_and(|r| r.0 <= 0)
            {
                return Err(format!("a count that is not positive for key {}", i.k));
            }
            Ok(Taken {
                key,
                last_used: i.l,
                hours: i.h.iter().map(|&(start, n)| Hour { start, n }).collect(),
                quota: i.q,
                warn: i.w,
                window: i.r,
            })
        })
        .collect()
}

/// The primary's answer: each key's global count.
pub fn encode_answer(answer: &[([u8; 16], Global)]) -> String {
    let items: Vec<Item> = answer
        .iter()
        .filter(|(_, g)| g.quota.is_some() || g.window.is_some())
        .map(|(k, g)| Item {
            k: hex(k),
            q: g.quota,
            r: g.window.clone(),
            ..Item::default()
        })
        .collect();
    serde_json::to_string(&items).unwrap_or_else(|_| "[]".into())
}

/// The answer, as the standby reads it.
pub fn decode_answer(text: &str) -> Result<Vec<([u8; 16], Global)>, String> {
    let items: Vec<Item> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    items
        .into_iter()
        .map(|i| {
            Ok((
                unhex(&i.k)?,
                Global {
                    quota: i.q,
                    window: i.r,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken() -> Taken {
        Taken {
            key: [0xab; 16],
            last_used: Some(77),
            hours: vec![Hour { start: 3600, n: 4 }],
            quota: Some((10, 4)),
            warn: Some(9),
            window: Some((60_000_000, vec![(5, 1), (7, 3)])),
        }
    }

    #[test]
    fn a_batch_and_its_answer_round_trip() {
        let t = taken();
        assert_eq!(
            decode(&encode(std::slice::from_ref(&t), true)).unwrap(),
            vec![t.clone()]
        );
        let local = decode(&encode(std::slice::from_ref(&t), false)).unwrap();
        assert_eq!((local[0].quota, local[0].warn), (None, None));
        assert_eq!(local[0].hours, t.hours);
        let answer = vec![
            (
                [1; 16],
                Global {
                    quota: Some((10, 40)),
                    window: Some((60_000_000, vec![(7, 9)])),
                },
            ),
            ([2; 16], Global::default()),
        ];
        assert_eq!(
            decode_answer(&encode_answer(&answer)).unwrap(),
            answer[..1].to_vec()
        );
    }

    #[test]
    fn a_bad_batch_is_refused_with_a_reason() {
        for (text, says) in [
            ("{}", "invalid type"),
            (r#"[{"k":"zz"}]"#, "not a key id"),
            (
                r#"[{"k":"abababababababababababababababab","q":[1,-1]}]"#,
                "not positive",
            ),
            (
                r#"[{"k":"abababababababababababababababab","r":[0,[]]}]"#,
                "not positive",
            ),
            (
                r#"[{"k":"abababababababababababababababab","h":[[1,-3]]}]"#,
                "not positive",
            ),
        ] {
            let e = decode(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        assert_eq!(decode("[]").unwrap(), vec![]);
        let asking = decode(r#"[{"k":"abababababababababababababababab","q":[1,0]}]"#);
        assert_eq!(
            asking.unwrap()[0].quota,
            Some((1, 0)),
            "a quota count of 0 asks for news"
        );
    }
}
