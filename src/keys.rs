//! Key format, generation and hashing: pure Rust, no PostgreSQL needed.
//!
//! A key is `prefix || random`, where `random` is drawn with the operating system's
//! CSPRNG from an alphabet, without modulo bias. Only a hash of the key is stored:
//! `hash = ALG(key || S)`, `S = lower-hex(sha256(salt))` or `''` without a salt, which is
//! what the TypeScript keypal stores, so its exported keys keep verifying here.

use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256, Sha512};

pub const DEFAULT_ALPHABET: &str = "A-Za-z0-9";
pub const DEFAULT_LENGTH: i32 = 32;
pub const MIN_LENGTH: i32 = 16;
pub const MAX_LENGTH: i32 = 256;
pub const MAX_PREFIX_LEN: usize = 64;

/// The hash algorithms a key may be stored under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn parse(name: &str) -> Option<Algorithm> {
        match name.to_ascii_lowercase().as_str() {
            "sha256" | "sha-256" => Some(Algorithm::Sha256),
            "sha512" | "sha-512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// The other algorithm: verify tries it when the configured one finds nothing, so keys
    /// hashed before the default changed keep verifying.
    pub fn other(self) -> Algorithm {
        match self {
            Algorithm::Sha256 => Algorithm::Sha512,
            Algorithm::Sha512 => Algorithm::Sha256,
        }
    }
}

/// Expands an alphabet spec such as `A-Za-z0-9_-` into its distinct characters, in order.
/// `x-y` is a range; a `-` first or last stands for itself. Only printable ASCII other
/// than space is allowed, so keys survive headers, URLs and shells unquoted.
pub fn expand_alphabet(spec: &str) -> Result<Vec<u8>, String> {
    let bytes = spec.as_bytes();
    if bytes.is_empty() {
        return Err("alphabet must not be empty".into());
    }
    if let Some(c) = spec.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("alphabet may hold only printable ASCII, not {c:?}"));
    }
    let mut out: Vec<u8> = Vec::new();
    let mut push = |c: u8| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    let mut i = 0;
    while i < bytes.len() {
        if i + 2 < bytes.len() && bytes[i + 1] == b'-' {
            let (lo, hi) = (bytes[i], bytes[i + 2]);
            if lo > hi {
                return Err(format!(
                    "alphabet range {}-{} is reversed",
                    lo as char, hi as char
                ));
            }
            (lo..=hi).for_each(&mut push);
            i += 3;
        } else {
            push(bytes[i]);
            i += 1;
        }
    }
    if out.len() < 2 {
        return Err("alphabet needs at least 2 distinct characters".into());
    }
    Ok(out)
}

/// Checks a key length setting.
pub fn check_length(length: i32) -> Result<(), String> {
    if !(MIN_LENGTH..=MAX_LENGTH).contains(&length) {
        return Err(format!(
            "length must be between {MIN_LENGTH} and {MAX_LENGTH}, got {length}"
        ));
    }
    Ok(())
}

/// The least entropy a key may carry, in bits: `length × log2(alphabet size)`.
pub const MIN_ENTROPY_BITS: f64 = 128.0;

/// Checks that `length` characters of an alphabet of `symbols` carry at least
/// MIN_ENTROPY_BITS, so guessing a key stays out of reach (failed verifies are not limited).
pub fn check_entropy(length: i32, symbols: usize) -> Result<(), String> {
    let bits = length as f64 * (symbols as f64).log2();
    if bits < MIN_ENTROPY_BITS {
        let need = (MIN_ENTROPY_BITS / (symbols as f64).log2()).ceil();
        return Err(format!(
            "{length} characters of a {symbols}-character alphabet carry {bits:.1} bits; \
             keys need at least {MIN_ENTROPY_BITS} (length {need} or more with this alphabet)"
        ));
    }
    Ok(())
}

/// Checks a prefix: short, printable ASCII, no whitespace.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.len() > MAX_PREFIX_LEN {
        return Err(format!(
            "prefix must be at most {MAX_PREFIX_LEN} characters"
        ));
    }
    if let Some(c) = prefix.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("prefix may hold only printable ASCII, not {c:?}"));
    }
    Ok(())
}

/// 16 bytes stamped as an RFC 9562 uuid of `version` (its version nibble and variant bits).
pub fn uuid_stamped(mut b: [u8; 16], version: u8) -> [u8; 16] {
    b[6] = (b[6] & 0x0f) | (version << 4);
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// An RFC 9562 version 7 uuid: `unix_ms` (milliseconds since 1970) in its first 48 bits,
/// then 74 bits of `random`. Ids made one after the other sort by time, so a table's and its
/// indexes' new entries land near each other rather than on a random page each.
pub fn uuid_v7(unix_ms: u64, random: [u8; 16]) -> [u8; 16] {
    let mut b = random;
    b[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    uuid_stamped(b, 7)
}

/// Fills `buf` from the OS CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    OsRng.fill_bytes(buf);
}

/// Draws `length` characters uniformly from `alphabet` (rejection sampling, no modulo bias),
/// from the OS CSPRNG: one read of random bytes per key (not one system call per character,
/// which was most of the cost of generating a key), more only when rejections use them up.
pub fn generate(prefix: &str, length: usize, alphabet: &[u8]) -> String {
    let mut key = String::with_capacity(prefix.len() + length);
    key.push_str(prefix);
    let mut fill = |buf: &mut [u8]| OsRng.fill_bytes(buf);
    key.extend(pick_uniform(length, alphabet, &mut fill).map(|c| c as char));
    key
}

/// `n` symbols of `alphabet` (at most 256), uniform given uniform bytes from `fill`: a byte
/// counts only below the largest multiple of the alphabet's size (the rest are drawn again).
pub fn pick_uniform<'a>(
    n: usize,
    alphabet: &'a [u8],
    fill: &'a mut dyn FnMut(&mut [u8]),
) -> impl Iterator<Item = u8> + 'a {
    let size = alphabet.len();
    assert!(
        (1..=256).contains(&size),
        "an alphabet has 1 to 256 symbols"
    );
    let limit = 256 - 256 % size;
    let mut buf = vec![0u8; n + n / 2 + 16];
    let mut at = buf.len();
    std::iter::from_fn(move || loop {
        if at == buf.len() {
            fill(&mut buf);
            at = 0;
        }
        let b = usize::from(buf[at]);
        at += 1;
        if b < limit {
            return Some(alphabet[b % size]);
        }
    })
    .take(n)
}

/// `S`: lower-hex sha256 of the salt, or empty without a salt.
pub fn salt_suffix(salt: &str) -> String {
    if salt.is_empty() {
        String::new()
    } else {
        to_hex(&Sha256::digest(salt.as_bytes()))
    }
}

/// `ALG(key || S)` as raw bytes.
pub fn hash_key(key: &str, salt_suffix: &str, alg: Algorithm) -> Vec<u8> {
    match alg {
        Algorithm::Sha256 => {
            let mut h = Sha256::new();
            h.update(key.as_bytes());
            h.update(salt_suffix.as_bytes());
            h.finalize().to_vec()
        }
        Algorithm::Sha512 => {
            let mut h = Sha512::new();
            h.update(key.as_bytes());
            h.update(salt_suffix.as_bytes());
            h.finalize().to_vec()
        }
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Constant-time equality: the time taken depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Strips an optional `Bearer ` scheme (any case) and surrounding whitespace.
pub fn strip_bearer(raw: &str) -> &str {
    let t = raw.trim();
    match t.get(..7) {
        Some(head) if head.eq_ignore_ascii_case("bearer ") => t[7..].trim_start(),
        _ if t.eq_ignore_ascii_case("bearer") => "",
        _ => t,
    }
}

/// Whether `key` could have been issued under these settings: one of `prefixes`
/// (an empty list, or an empty prefix, accepts any start), then exactly `length`
/// characters of `alphabet`.
pub fn matches_format(
    key: &str,
    prefixes: &[String],
    length: usize,
    alphabet: &[u8],
    checksum: bool,
) -> bool {
    let body_ok = |body: &str| body.len() == length && body.bytes().all(|c| alphabet.contains(&c));
    let shaped = if prefixes.is_empty() {
        body_ok(key)
    } else {
        prefixes
            .iter()
            .any(|p| key.strip_prefix(p.as_str()).is_some_and(body_ok))
    };
    shaped || checksum && checksum_verdict(key, prefixes, length, alphabet) == Some(true)
}

/// CRC-32 (IEEE 802.3, as zlib computes it) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// How many characters of an alphabet of `size` hold a CRC-32: the fewest n with size^n ≥ 2^32
/// (6 for the default 62 letters and digits).
pub fn checksum_len(size: usize) -> usize {
    let (mut n, mut room) = (0, 1u128);
    while room < 1u128 << 32 && size > 1 {
        room *= size as u128;
        n += 1;
    }
    n
}

/// A key's checksum: the CRC-32 of everything before it (prefix and random part), written in
/// the key's alphabet, most significant digit first, always `checksum_len` characters.
pub fn checksum(body: &str, alphabet: &[u8]) -> String {
    let n = checksum_len(alphabet.len());
    let base = alphabet.len().max(2) as u64;
    let mut v = u64::from(crc32(body.as_bytes()));
    let mut out = vec![0u8; n];
    for slot in out.iter_mut().rev() {
        *slot = alphabet.get((v % base) as usize).copied().unwrap_or(b'0');
        v /= base;
    }
    String::from_utf8(out).unwrap_or_default()
}

/// For a key of a checksummed key's shape (a known prefix, then `length` + checksum_len
/// characters of the alphabet): whether its checksum is right. None for any other shape (a
/// key made before checksums were on, or imported): those are looked up as ever.
pub fn checksum_verdict(
    key: &str,
    prefixes: &[String],
    length: usize,
    alphabet: &[u8],
) -> Option<bool> {
    let n = checksum_len(alphabet.len());
    let shaped = |p: &str| {
        key.strip_prefix(p).is_some_and(|rest| {
            rest.len() == length + n && rest.bytes().all(|c| alphabet.contains(&c))
        })
    };
    let fits = if prefixes.is_empty() {
        shaped("")
    } else {
        prefixes.iter().any(|p| shaped(p))
    };
    fits.then(|| {
        let (body, sum) = key.split_at(key.len() - n);
        checksum(body, alphabet) == sum
    })
}

/// A shape keys were issued in: the random part's length and alphabet, and whether a
/// checksum followed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub length: usize,
    pub alphabet: Vec<u8>,
    pub checksum: bool,
}

/// The shapes of settings.issued (`[{"length": 32, "alphabet": "A-Za-z0-9", "checksum":
/// false}, …]`) and the current one; and whether keys were imported (`{"imported": true}`),
/// whose shapes nobody recorded.
pub fn issued_shapes(issued: Option<&serde_json::Value>, current: Shape) -> (Vec<Shape>, bool) {
    let mut shapes = vec![current];
    let mut imported = false;
    for entry in issued.and_then(|v| v.as_array()).into_iter().flatten() {
        if entry.get("imported").and_then(|v| v.as_bool()) == Some(true) {
            imported = true;
            continue;
        }
        let length = entry.get("length").and_then(|v| v.as_u64());
        let alphabet = entry
            .get("alphabet")
            .and_then(|v| v.as_str())
            .and_then(|a| expand_alphabet(a).ok());
        if let (Some(length), Some(alphabet)) = (length, alphabet) {
            let checksum = entry
                .get("checksum")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let shape = Shape {
                length: length as usize,
                alphabet,
                checksum,
            };
            if !shapes.contains(&shape) {
                shapes.push(shape);
            }
        }
    }
    (shapes, imported)
}

/// Whether verify may refuse `key` as mistyped without looking it up: it has the shape of a
/// checksummed key of some shape keys were issued in, its checksum is wrong under every such
/// shape, and it has no shape of keys issued without a checksum (such a key may be any string
/// of its shape, so only a lookup can tell).
pub fn refuse_unlooked(key: &str, prefixes: &[String], shapes: &[Shape]) -> bool {
    let bare = [String::new()];
    let prefixes = if prefixes.is_empty() {
        &bare[..]
    } else {
        prefixes
    };
    let in_alphabet = |rest: &str, a: &[u8]| rest.bytes().all(|c| a.contains(&c));
    let mut checksummed = false;
    for rest in prefixes.iter().filter_map(|p| key.strip_prefix(p.as_str())) {
        for shape in shapes {
            let n = if shape.checksum {
                checksum_len(shape.alphabet.len())
            } else {
                0
            };
            if rest.len() != shape.length + n || !in_alphabet(rest, &shape.alphabet) {
                continue;
            }
            if !shape.checksum {
                return false;
            }
            let (body, sum) = key.split_at(key.len() - n);
            if checksum(body, &shape.alphabet) == sum {
                return false;
            }
            checksummed = true;
        }
    }
    checksummed
}

/// A regular expression that matches the keys of these settings (for secret scanners):
/// one of the prefixes, then the random part (and checksum) in the alphabet. Written in the
/// syntax PostgreSQL, RE2 (gitleaks, GitHub secret scanning) and PCRE share; not anchored.
pub fn key_regex(prefixes: &[String], shapes: &[Shape]) -> String {
    let escape = |s: &str| {
        s.chars()
            .map(|c| {
                if "\\.^$|?*+()[]{}".contains(c) {
                    format!("\\{c}")
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
    };
    // Longest first: a scanner takes the first alternative that matches, and a shorter
    // prefix of a longer one would cut the key.
    let mut distinct: Vec<&String> = prefixes.iter().filter(|p| !p.is_empty()).collect();
    distinct.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    distinct.dedup();
    let alternatives = distinct
        .iter()
        .map(|p| escape(p))
        .collect::<Vec<_>>()
        .join("|");
    let prefix = match (
        distinct.len(),
        prefixes.is_empty() || prefixes.iter().any(|p| p.is_empty()),
    ) {
        (0, _) => String::new(),
        (_, true) => format!("(?:{alternatives})?"),
        (_, false) => format!("(?:{alternatives})"),
    };
    let class = |alphabet: &[u8]| {
        let mut bytes = alphabet.to_vec();
        bytes.sort_unstable();
        bytes.dedup();
        let lit = |b: u8| {
            let c = b as char;
            if "\\]^-[".contains(c) {
                format!("\\{c}")
            } else {
                c.to_string()
            }
        };
        let mut class = String::new();
        let mut i = 0;
        while i < bytes.len() {
            let mut j = i;
            while j + 1 < bytes.len() && bytes[j + 1] == bytes[j] + 1 {
                j += 1;
            }
            if j >= i + 2 {
                class.push_str(&format!("{}-{}", lit(bytes[i]), lit(bytes[j])));
            } else {
                (i..=j).for_each(|k| class.push_str(&lit(bytes[k])));
            }
            i = j + 1;
        }
        format!("[{class}]")
    };
    // n characters of a class, in counts PostgreSQL's regular expressions take (at most 255).
    let repeat = |c: &str, n: usize| {
        let mut out = format!("{c}{{255}}").repeat(n / 255);
        if !n.is_multiple_of(255) || n == 0 {
            out.push_str(&format!("{c}{{{}}}", n % 255));
        }
        out
    };
    // Every shape keys were issued in, longest first.
    let mut bodies: Vec<(usize, String)> = shapes
        .iter()
        .map(|s| {
            let n = s.length
                + if s.checksum {
                    checksum_len(s.alphabet.len())
                } else {
                    0
                };
            (n, repeat(&class(&s.alphabet), n))
        })
        .collect();
    bodies.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    bodies.dedup();
    let body = match bodies.len() {
        1 => bodies.remove(0).1,
        _ => format!(
            "(?:{})",
            bodies
                .into_iter()
                .map(|b| b.1)
                .collect::<Vec<_>>()
                .join("|")
        ),
    };
    format!("{prefix}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_v7_carries_the_time_and_sorts_by_it() {
        let a = uuid_v7(0x0123_4567_89ab, [0xff; 16]);
        assert_eq!(&a[..6], &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab]);
        assert_eq!(a[6] >> 4, 7, "version 7");
        assert_eq!(a[8] >> 6, 0b10, "RFC 9562 variant");
        assert_eq!(&a[9..], &[0xff; 7], "the rest is the random bytes");
        let later = uuid_v7(0x0123_4567_89ac, [0; 16]);
        assert!(
            later > a,
            "a later millisecond sorts after, whatever the random bytes"
        );
    }

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn checksums_catch_typos_and_truncation() {
        let alpha = expand_alphabet("A-Za-z0-9").unwrap();
        assert_eq!(checksum_len(62), 6);
        assert_eq!(checksum_len(16), 8);
        assert_eq!(checksum_len(2), 32);
        let prefixes = vec!["sk_live_".to_string()];
        let body = generate("sk_live_", 32, &alpha);
        let key = format!("{body}{}", checksum(&body, &alpha));
        assert_eq!(key.len(), 8 + 32 + 6);
        assert_eq!(checksum_verdict(&key, &prefixes, 32, &alpha), Some(true));
        assert!(matches_format(&key, &prefixes, 32, &alpha, true));
        // one character changed, anywhere: a wrong checksum
        for i in 8..key.len() {
            let mut typo = key.clone().into_bytes();
            typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(typo).unwrap();
            assert_eq!(
                checksum_verdict(&typo, &prefixes, 32, &alpha),
                Some(false),
                "{typo}"
            );
        }
        // another shape (truncated, or made before checksums): not judged here
        assert_eq!(
            checksum_verdict(&key[..key.len() - 1], &prefixes, 32, &alpha),
            None
        );
        assert_eq!(checksum_verdict(&body, &prefixes, 32, &alpha), None);
        assert!(matches_format(&body, &prefixes, 32, &alpha, true));
    }

    #[test]
    fn key_regexes() {
        let alpha = expand_alphabet("A-Za-z0-9").unwrap();
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let shape = |length, alphabet: &[u8], checksum| Shape {
            length,
            alphabet: alphabet.to_vec(),
            checksum,
        };
        assert_eq!(
            key_regex(&p(&[""]), &[shape(32, &alpha, false)]),
            "[0-9A-Za-z]{32}"
        );
        assert_eq!(
            key_regex(
                &p(&["sk_", "sk_live_", "sk_test_"]),
                &[shape(32, &alpha, true), shape(32, &alpha, false)]
            ),
            "(?:sk_live_|sk_test_|sk_)(?:[0-9A-Za-z]{38}|[0-9A-Za-z]{32})"
        );
        assert_eq!(
            key_regex(
                &p(&["", "k.v+"]),
                &[shape(20, &expand_alphabet("-_abc").unwrap(), false)]
            ),
            "(?:k\\.v\\+)?[\\-_a-c]{20}"
        );
        assert_eq!(
            key_regex(&p(&["x"]), &[shape(256, &alpha, false)]),
            "(?:x)[0-9A-Za-z]{255}[0-9A-Za-z]{1}"
        );
    }

    #[test]
    fn only_a_key_no_issued_shape_explains_is_refused_unlooked() {
        let alnum = expand_alphabet("A-Za-z0-9").unwrap();
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let shape = |length, alphabet: &[u8], checksum| Shape {
            length,
            alphabet: alphabet.to_vec(),
            checksum,
        };
        let sum = |body: &str, a: &[u8]| format!("{body}{}", checksum(body, a));
        let flip = |k: &str| {
            let mut b = k.as_bytes().to_vec();
            let last = b.len() - 1;
            b[last] = if b[last] == b'A' { b'B' } else { b'A' };
            String::from_utf8(b).unwrap()
        };
        let good = sum(&generate("sk_", 32, &alnum), &alnum);
        let shapes = [shape(32, &alnum, false), shape(32, &alnum, true)];
        assert!(!refuse_unlooked(&good, &p(&["sk_"]), &shapes));
        assert!(refuse_unlooked(&flip(&good), &p(&["sk_"]), &shapes));
        // keys issued 38 long before checksums, then length 32 with checksums: looked up
        let old38 = generate("sk_", 38, &alnum);
        assert!(!refuse_unlooked(
            &old38,
            &p(&["sk_"]),
            &[shape(38, &alnum, false), shape(32, &alnum, true)]
        ));
        assert!(refuse_unlooked(
            &old38,
            &p(&["sk_"]),
            &[shape(32, &alnum, true)]
        ));
        // the alphabet changed after checksummed keys were issued: their checksums still count
        let wider = expand_alphabet("A-Za-z0-9_").unwrap();
        let both = [shape(32, &alnum, true), shape(32, &wider, true)];
        assert!(!refuse_unlooked(&good, &p(&["sk_"]), &both));
        assert!(refuse_unlooked(&flip(&good), &p(&["sk_"]), &both));
        // overlapping prefixes: a key that is a plain key under one of them is looked up
        let live = generate("sklive", 32, &alnum);
        assert!(!refuse_unlooked(
            &live,
            &p(&["", "sklive"]),
            &[shape(32, &alnum, false), shape(32, &alnum, true)]
        ));
    }
    #[test]
    fn alphabet_ranges_expand() {
        let a = expand_alphabet("A-Za-z0-9").unwrap();
        assert_eq!(a.len(), 62);
        assert_eq!(expand_alphabet("abc-").unwrap(), b"abc-".to_vec());
        assert_eq!(expand_alphabet("-ab").unwrap(), b"-ab".to_vec());
        assert_eq!(expand_alphabet("aab").unwrap(), b"ab".to_vec());
    }

    #[test]
    fn bad_alphabets_are_refused() {
        assert!(expand_alphabet("").is_err());
        assert!(expand_alphabet("a").is_err());
        assert!(expand_alphabet("aaaa").is_err());
        assert!(expand_alphabet("z-a").is_err());
        assert!(expand_alphabet("ab c").is_err());
        assert!(expand_alphabet("abé").is_err());
    }

    #[test]
    fn lengths_are_bounded() {
        assert!(check_length(15).is_err());
        assert!(check_length(16).is_ok());
        assert!(check_length(256).is_ok());
        assert!(check_length(257).is_err());
    }

    #[test]
    fn generated_keys_have_the_format() {
        let alpha = expand_alphabet(DEFAULT_ALPHABET).unwrap();
        let k = generate("sk_live_", 32, &alpha);
        assert!(k.starts_with("sk_live_"));
        assert_eq!(k.len(), 40);
        assert!(matches_format(&k, &["sk_live_".into()], 32, &alpha, false));
        assert!(!matches_format(&k, &["sk_test_".into()], 32, &alpha, false));
        assert!(!matches_format(&k, &["sk_live_".into()], 31, &alpha, false));
        assert_ne!(k, generate("sk_live_", 32, &alpha));
    }

    #[test]
    fn generation_is_roughly_uniform() {
        // 3 symbols, 30 000 draws: each count must be near 10 000 (a biased draw of
        // a 3-symbol alphabet from bytes would skew it by ~0.4 %, a broken one by far more).
        let k = generate("", 30_000, b"abc");
        for c in b"abc" {
            let n = k.bytes().filter(|x| x == c).count();
            assert!(
                (9_400..=10_600).contains(&n),
                "{} drawn {n} times",
                *c as char
            );
        }
    }

    #[test]
    fn bytes_past_the_largest_multiple_are_drawn_again() {
        // 62 symbols: bytes 248..=255 would favour the first 8 symbols; they are skipped.
        let alpha = expand_alphabet(DEFAULT_ALPHABET).unwrap();
        let mut script = vec![255u8, 248, 61, 0, 124, 247].into_iter().cycle();
        let mut fill = |buf: &mut [u8]| buf.iter_mut().for_each(|b| *b = script.next().unwrap());
        let got: Vec<u8> = pick_uniform(4, &alpha, &mut fill).collect();
        assert_eq!(got, vec![alpha[61], alpha[0], alpha[0], alpha[247 % 62]]);
        // A buffer used up by rejections is filled again.
        let mut all_bad = 0usize;
        let mut fill = |buf: &mut [u8]| {
            all_bad += 1;
            buf.fill(if all_bad < 3 { 250 } else { 1 });
        };
        let got: Vec<u8> = pick_uniform(3, &alpha, &mut fill).collect();
        assert_eq!(got, vec![alpha[1]; 3]);
        // Every byte value counts for a 256-symbol alphabet.
        let every: Vec<u8> = (0..=255).collect();
        let mut n = 0u8;
        let mut fill = |buf: &mut [u8]| {
            buf.iter_mut().for_each(|b| {
                *b = n;
                n = n.wrapping_add(1)
            })
        };
        assert_eq!(
            pick_uniform(256, &every, &mut fill).collect::<Vec<_>>(),
            every
        );
    }

    #[test]
    fn hash_matches_known_vectors() {
        // sha256("abc"), no salt
        assert_eq!(
            to_hex(&hash_key("abc", "", Algorithm::Sha256)),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // sha256("pepper") = S; the stored hash is sha256("abc" || S)
        let s = salt_suffix("pepper");
        assert_eq!(s.len(), 64);
        let mut concat = String::from("abc");
        concat.push_str(&s);
        assert_eq!(
            hash_key("abc", &s, Algorithm::Sha256),
            hash_key(&concat, "", Algorithm::Sha256)
        );
        assert_eq!(hash_key("abc", "", Algorithm::Sha512).len(), 64);
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(to_hex(&[0, 255, 16]), "00ff10");
    }

    #[test]
    fn bearer_is_stripped() {
        assert_eq!(strip_bearer("Bearer abc"), "abc");
        assert_eq!(strip_bearer("bearer   abc "), "abc");
        assert_eq!(strip_bearer("Bearer "), "");
        assert_eq!(strip_bearer("  "), "");
        assert_eq!(strip_bearer("abc"), "abc");
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn entropy_floor() {
        assert!(check_entropy(32, 62).is_ok()); // the default: 190 bits
        assert!(check_entropy(22, 62).is_ok()); // 131 bits
        assert!(check_entropy(21, 62).is_err()); // 125 bits
        assert!(check_entropy(32, 16).is_ok()); // exactly 128
        assert!(check_entropy(31, 16).is_err());
        assert!(check_entropy(16, 2).is_err());
        assert!(check_entropy(128, 2).is_ok());
        assert!(check_entropy(16, 2).unwrap_err().contains("length 128"));
    }

    #[test]
    fn algorithms_parse() {
        assert_eq!(Algorithm::parse("SHA256"), Some(Algorithm::Sha256));
        assert_eq!(Algorithm::parse("sha512"), Some(Algorithm::Sha512));
        assert_eq!(Algorithm::parse("md5"), None);
        assert_eq!(Algorithm::Sha256.other(), Algorithm::Sha512);
    }
}

/// The key a request carries: `Authorization` (a `Bearer` token, or a bare token) first,
/// then `X-API-Key`. Header names are case-insensitive; values are trimmed.
pub fn key_from_headers(headers: &serde_json::Value) -> Option<String> {
    let obj = headers.as_object()?;
    let header = |name: &str| {
        obj.iter()
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let from_auth = header("authorization").and_then(|v| {
        let stripped = strip_bearer(v);
        let is_bearer = stripped.len() < v.len();
        (is_bearer || !v.contains(' ')).then(|| stripped.to_string())
    });
    from_auth
        .filter(|k| !k.is_empty())
        .or_else(|| header("x-api-key").map(str::to_string))
}

#[cfg(test)]
mod header_tests {
    use super::key_from_headers;
    use serde_json::json;

    #[test]
    fn authorization_then_x_api_key() {
        assert_eq!(
            key_from_headers(&json!({"Authorization": "Bearer abc"})),
            Some("abc".into())
        );
        assert_eq!(
            key_from_headers(&json!({"authorization": " bearer  abc "})),
            Some("abc".into())
        );
        assert_eq!(
            key_from_headers(&json!({"X-Api-Key": " xyz "})),
            Some("xyz".into())
        );
        assert_eq!(
            key_from_headers(&json!({"authorization": "Bearer abc", "x-api-key": "xyz"})),
            Some("abc".into())
        );
        assert_eq!(
            key_from_headers(&json!({"authorization": "Basic dXNlcg==", "x-api-key": "xyz"})),
            Some("xyz".into())
        );
        assert_eq!(
            key_from_headers(&json!({"authorization": "Bearer ", "x-api-key": "k"})),
            Some("k".into())
        );
        assert_eq!(key_from_headers(&json!({"accept": "*/*"})), None);
        assert_eq!(key_from_headers(&json!("nope")), None);
        assert_eq!(key_from_headers(&json!({"x-api-key": 5})), None);
    }
}
