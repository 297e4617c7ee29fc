//! What a standby ships to the primary and what the primary answers, as JSON text, pure Rust.
//!
//! A batch is an array of one object per key: `k` the key id (32 hex digits), `l` its last
//! use, `h` its hours (`[start, requests]`), `q` its quota period and count, `w` the use
//! that crossed a warning quota, `r` its rate window (`[length, [[bucket, requests], …]]`);
//! times are timestamptz microseconds. The answer is an array of `{k, q, r}`: the key's
//! global quota use and window buckets, for the keys whose batch entry had `q` or `r`.

use super::entry::{hour_start, Global, Hour, Taken};
use super::window::BUCKETS;
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

/// Keys a batch holds at most (a standby's worker takes up to 10 000 entries per flush).
pub const MAX_ITEMS: usize = 10_000;
/// The largest count an item may carry: 2^53 (a quota or limit is at most 10^15, a cost at
/// most 2^31: no server counts this much of one key between two batches).
const MAX_COUNT: i64 = 1 << 53;
/// Rate windows from a millisecond to the longest duration keypal takes.
const WINDOW_US: std::ops::RangeInclusive<i64> = 1_000..=crate::duration::MAX_DAYS * DAY_US;
const DAY_US: i64 = 86_400_000_000;
/// How far ahead of the primary's clock a standby's may run: a quota period or an hour
/// begun that much after the primary's now is taken.
const SKEW_US: i64 = 300_000_000;

/// A shipped batch, as the primary reads it: at most MAX_ITEMS keys, each once; counts
/// positive (a quota count may be 0) and at most MAX_COUNT, windows a millisecond to the
/// longest duration long; an error names what is wrong.
pub fn decode(text: &str) -> Result<Vec<Taken>, String> {
    let items: Vec<Item> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if items.len() > MAX_ITEMS {
        return Err(format!("{} keys, at most {MAX_ITEMS} a batch", items.len()));
    }
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .map(|i| {
            let key = unhex(&i.k)?;
            if !seen.insert(key) {
                return Err(format!("key {} appears twice", i.k));
            }
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
            let all = i.h.iter().map(|h| h.1).chain(i.q.map(|q| q.1)).chain(i.w);
            if all
                .chain(i.r.iter().flat_map(|r| r.1.iter().map(|b| b.1)))
                .any(|n| n > MAX_COUNT)
            {
                return Err(format!("a count over {MAX_COUNT} for key {}", i.k));
            }
            if i.r.as_ref().is_some_and(|r| !WINDOW_US.contains(&r.0)) {
                return Err(format!("a rate window out of range for key {}", i.k));
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

/// What of `t` the primary takes, judged by its own clock (`now`): a last use is taken as
/// now at the latest, a window's newer buckets as its current one; an hour or a quota period
/// begun more than SKEW_US after now is not taken, nor an hour not on the hour or older than
/// a week, a period older than a year, a bucket already out of the window. (A standby's
/// clock may differ a little; a batch from one whose clock is far off loses what does not
/// fit, rather than moving the primary's windows and periods where its own verify would
/// never find them.)
pub fn fit(mut t: Taken, now: i64) -> Taken {
    t.last_used = t.last_used.map(|l| l.min(now));
    let latest_hour = hour_start(now + SKEW_US);
    t.hours.retain(|h| {
        h.start.rem_euclid(3_600_000_000) == 0
            && (latest_hour - 7 * DAY_US..=latest_hour).contains(&h.start)
    });
    if t.quota
        .is_some_and(|(p, _)| !(now - 366 * DAY_US..=now + SKEW_US).contains(&p))
    {
        t.quota = None;
        t.warn = None;
    }
    if let Some((us, buckets)) = &mut t.window {
        let width = (*us + BUCKETS as i64 - 1) / BUCKETS as i64;
        let current = now.div_euclid(width);
        for b in buckets.iter_mut() {
            b.0 = b.0.min(current);
        }
        buckets.retain(|b| b.0 >= current - BUCKETS as i64);
    }
    t
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
    fn the_primary_takes_only_what_fits_its_clock() {
        let now = 1_000 * 3_600_000_000 + 5;
        let hour = hour_start(now);
        let width = 3_000_000; // a minute's window
        let current = now.div_euclid(width);
        let t = Taken {
            key: [1; 16],
            last_used: Some(now + 10_000_000),
            hours: vec![
                Hour { start: hour, n: 1 },
                Hour {
                    start: hour + 3_600_000_000,
                    n: 2,
                },
                Hour {
                    start: hour - 8 * DAY_US,
                    n: 3,
                },
                Hour {
                    start: hour + 7,
                    n: 4,
                },
            ],
            quota: Some((now + SKEW_US + 1, 5)),
            warn: Some(5),
            window: Some((
                60_000_000,
                vec![
                    (current - 25, 1),
                    (current - 3, 2),
                    (current + 9, 3),
                    (i64::MAX, 4),
                ],
            )),
        };
        let f = fit(t, now);
        assert_eq!(f.last_used, Some(now));
        assert_eq!(f.hours, vec![Hour { start: hour, n: 1 }]);
        assert_eq!((f.quota, f.warn), (None, None), "a period not begun yet");
        assert_eq!(
            f.window.unwrap().1,
            vec![(current - 3, 2), (current, 3), (current, 4)]
        );
        let ok = fit(
            Taken {
                quota: Some((now - DAY_US, 1)),
                ..Taken::default()
            },
            now,
        );
        assert_eq!(ok.quota, Some((now - DAY_US, 1)));
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
            (
                r#"[{"k":"abababababababababababababababab","h":[[1,9007199254740993]]}]"#,
                "a count over",
            ),
            (
                r#"[{"k":"abababababababababababababababab","r":[999,[]]}]"#,
                "a rate window out of range",
            ),
        ] {
            let e = decode(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        assert_eq!(decode("[]").unwrap(), vec![]);
        let twice = r#"[{"k":"abababababababababababababababab"},{"k":"abababababababababababababababab"}]"#;
        assert!(decode(twice).unwrap_err().contains("appears twice"));
        let many = format!(
            "[{}]",
            vec![r#"{"k":"abababababababababababababababab"}"#; MAX_ITEMS + 1].join(",")
        );
        assert!(decode(&many).unwrap_err().contains("at most"));
        let asking = decode(r#"[{"k":"abababababababababababababababab","q":[1,0]}]"#);
        assert_eq!(
            asking.unwrap()[0].quota,
            Some((1, 0)),
            "a quota count of 0 asks for news"
        );
    }
}
