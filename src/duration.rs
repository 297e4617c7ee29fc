//! Short duration strings: `30s 5m 1h 7d 2w 90d 1y` (case-insensitive).
//!
//! Seconds, minutes and hours become an exact time span; days, weeks and years become
//! whole days (a year is 365 days), so `30d` means the same wall-clock time of day
//! 30 days on across a DST change. Anything else is left to PostgreSQL's `interval` input.

/// A parsed short duration, in the two fields of an `interval` it fills.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Span {
    pub days: i32,
    pub micros: i64,
}

pub const MAX_DAYS: i64 = 1_000_000; // ~2700 years: far beyond any key's life
const MICROS_PER_SEC: i64 = 1_000_000;

/// Parses the short form. `None` when `s` is not in it (the caller then tries `interval`
/// input); `Some(Err)` when it is, but out of range.
pub fn parse_short(s: &str) -> Option<Result<Span, String>> {
    let t = s.trim();
    let (at, unit) = t.char_indices().last()?;
    let unit = unit.to_ascii_lowercase();
    let digits = &t[..at];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = match digits.parse() {
        Ok(n) => n,
        Err(_) => return Some(Err(format!("duration {t:?} is out of range"))),
    };
    let (days, secs) = match unit {
        's' => (0, n),
        'm' => (0, n.checked_mul(60)?),
        'h' => (0, n.checked_mul(3600)?),
        'd' => (n, 0),
        'w' => (n.checked_mul(7)?, 0),
        'y' => (n.checked_mul(365)?, 0),
        _ => return None,
    };
    if days > MAX_DAYS || secs > MAX_DAYS * 86_400 {
        return Some(Err(format!("duration {t:?} is out of range")));
    }
    Some(Ok(Span {
        days: days as i32,
        micros: secs * MICROS_PER_SEC,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Span {
        parse_short(s).unwrap().unwrap()
    }

    #[test]
    fn units() {
        assert_eq!(
            ok("30s"),
            Span {
                days: 0,
                micros: 30_000_000
            }
        );
        assert_eq!(
            ok("5m"),
            Span {
                days: 0,
                micros: 300_000_000
            }
        );
        assert_eq!(
            ok("1H"),
            Span {
                days: 0,
                micros: 3_600_000_000
            }
        );
        assert_eq!(ok("7d"), Span { days: 7, micros: 0 });
        assert_eq!(
            ok("2W"),
            Span {
                days: 14,
                micros: 0
            }
        );
        assert_eq!(
            ok("1y"),
            Span {
                days: 365,
                micros: 0
            }
        );
        assert_eq!(
            ok(" 90d "),
            Span {
                days: 90,
                micros: 0
            }
        );
    }

    #[test]
    fn not_short_form() {
        for s in [
            "", "d", "1", "1x", "1.5h", "-1d", "1 day", "1dd", "ab", "5é", "é", "1日",
        ] {
            assert!(parse_short(s).is_none(), "{s}");
        }
    }

    #[test]
    fn out_of_range() {
        assert!(parse_short("99999999999999999999d").unwrap().is_err());
        assert!(parse_short("5000y").unwrap().is_err());
        assert!(parse_short("9223372036854775807h").is_none_or(|r| r.is_err()));
    }
}
