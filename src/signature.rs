//! HMAC-SHA256 signatures, pure Rust: the `Keypal-Signature` header of webhook deliveries,
//! and request signing (`keypal_sign`, `keypal_verify_signature`) with per-key secrets
//! derived from the server's `keypal.signing_secret`.

use crate::keys::{constant_time_eq, to_hex};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Lower-hex HMAC-SHA256 of `message` under `secret`.
pub fn hmac_sha256_hex(secret: &[u8], message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `Keypal-Signature` header of a webhook delivery sent at `t` (unix seconds):
/// `t=<t>,v1=<hex hmac-sha256(secret, t || '.' || body)>`.
pub fn webhook_signature(secret: &str, t: u64, body: &str) -> String {
    stamp(secret, t, &format!("{t}.{body}"))
}

/// `t=<t>,v1=<hex hmac-sha256(secret, signed)>`: the one shape of both kinds of signature.
fn stamp(secret: &str, t: impl std::fmt::Display, signed: &str) -> String {
    format!(
        "t={t},v1={}",
        hmac_sha256_hex(secret.as_bytes(), signed.as_bytes())
    )
}

/// The string a request signature covers: the method (upper case), the path, the unix time
/// and the lower-hex SHA-256 of the body, one per line.
pub fn canonical_request(method: &str, path: &str, t: i64, body: &[u8]) -> String {
    format!(
        "{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path,
        t,
        to_hex(&Sha256::digest(body))
    )
}

/// `t=<t>,v1=<hex hmac-sha256(secret, canonical_request)>`: what `keypal_sign` returns.
pub fn sign_request(secret: &str, method: &str, path: &str, body: &[u8], t: i64) -> String {
    stamp(secret, t, &canonical_request(method, path, t, body))
}

/// The `t` and `v1` of a signature in its one spelling, `t=<unix seconds>,v1=<64 lower-hex>`
/// (what keypal_sign makes): no other order, spaces, leading zeros or upper case, so that a
/// signature cannot be presented again as a different string.
pub fn parse_signature(sig: &str) -> Option<(i64, &str)> {
    let (t, v1) = sig.strip_prefix("t=")?.split_once(",v1=")?;
    let digits = !t.is_empty() && t.len() <= 12 && t.bytes().all(|b| b.is_ascii_digit());
    let hex = v1.len() == 64
        && v1
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !(digits && (t == "0" || !t.starts_with('0')) && hex) {
        return None;
    }
    Some((t.parse().ok()?, v1))
}

/// Whether a method and path can be signed: a method is an HTTP token (letters), a path has
/// no line breaks (either would make two requests share one canonical string).
pub fn signable(method: &str, path: &str) -> bool {
    !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_alphabetic())
        && !path.is_empty()
        && !path.bytes().any(|b| b == b'\n' || b == b'\r')
}

/// Whether `sig` signs this request with `secret` (constant-time); its `t` too.
pub fn check_request(
    secret: &str,
    method: &str,
    path: &str,
    body: &[u8],
    sig: &str,
) -> Option<i64> {
    let (t, v1) = parse_signature(sig)?;
    if !signable(method, path) {
        return None;
    }
    let signed = canonical_request(method, path, t, body);
    let expected = hmac_sha256_hex(secret.as_bytes(), signed.as_bytes());
    constant_time_eq(expected.as_bytes(), v1.as_bytes()).then_some(t)
}

/// A key's signing secret: `kps_` and the lower-hex HMAC-SHA256, under the server's
/// `keypal.signing_secret`, of `keypal signing secret:<key id>` (the id in its usual text
/// form). Not stored anywhere: derived again when needed.
pub fn derive_signing_secret(server_secret: &str, key_id: &str) -> String {
    format!(
        "kps_{}",
        hmac_sha256_hex(
            server_secret.as_bytes(),
            format!("keypal signing secret:{key_id}").as_bytes()
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_signatures_round_trip() {
        let sig = sign_request(
            "s3cret",
            "post",
            "/v1/items?a=1",
            b"{\"x\":1}",
            1_700_000_000,
        );
        assert!(sig.starts_with("t=1700000000,v1="));
        let other_t = sig.replace("t=1700000000", "t=1700000001");
        let body: &[u8] = b"{\"x\":1}";
        assert_eq!(
            check_request("s3cret", "POST", "/v1/items?a=1", body, &sig),
            Some(1_700_000_000)
        );
        // Any one part changed: refused.
        for (secret, method, path, body, sig) in [
            ("other", "POST", "/v1/items?a=1", body, &sig),
            ("s3cret", "GET", "/v1/items?a=1", body, &sig),
            ("s3cret", "POST", "/v1/items?a=2", body, &sig),
            ("s3cret", "POST", "/v1/items?a=1", &b"{\"x\":2}"[..], &sig),
            ("s3cret", "POST", "/v1/items?a=1", body, &other_t),
        ] {
            assert_eq!(
                check_request(secret, method, path, body, sig),
                None,
                "{secret} {method} {path}"
            );
        }
    }

    #[test]
    fn canonical_request_is_documented_shape() {
        assert_eq!(
            canonical_request("get", "/a", 5, b""),
            "GET\n/a\n5\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn malformed_signatures_are_refused() {
        let v = "a".repeat(64);
        let upper = "A".repeat(64);
        for bad in [
            "".to_string(),
            "t=1".into(),
            format!("v1={v}"),
            format!("t=x,v1={v}"),
            format!("t=1,v1={v},x=2"),
            format!("t=1,v1={}", "a".repeat(63)),
            format!("t=1,t=2,v1={v}"),
            format!("t=-1,v1={v}"),
            format!("v1={v},t=12"),
            format!("t=12, v1={v}"),
            format!(" t=12,v1={v}"),
            format!("t=012,v1={v}"),
            format!("t=12,v1={upper}"),
            format!("t=12,v1={v} "),
        ] {
            assert!(parse_signature(&bad).is_none(), "{bad}");
        }
        assert_eq!(
            parse_signature(&format!("t=12,v1={v}")),
            Some((12, v.as_str()))
        );
    }

    #[test]
    fn only_signable_requests() {
        assert!(signable("GET", "/a?b=1"));
        for (m, p) in [
            ("", "/"),
            ("GE T", "/"),
            ("GET\n/a", "b"),
            ("GET", "/a\nb"),
            ("GET", "/a\r"),
            ("GET", ""),
        ] {
            assert!(!signable(m, p), "{m:?} {p:?}");
        }
        let sig = sign_request("s", "GET", "/a\nb", b"", 1);
        assert_eq!(check_request("s", "GET", "/a\nb", b"", &sig), None);
    }

    #[test]
    fn signing_secrets_differ_per_key_and_server_secret() {
        let a = derive_signing_secret("server", "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
        assert!(a.starts_with("kps_") && a.len() == 68);
        assert_ne!(
            a,
            derive_signing_secret("server", "1b4e28ba-2fa1-11d2-883f-0016d3cca428")
        );
        assert_ne!(
            a,
            derive_signing_secret("server2", "1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(
            a,
            derive_signing_secret("server", "1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
    }

    #[test]
    fn rfc4231_case_2() {
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn webhook_signature_signs_t_dot_body() {
        let sig = webhook_signature("whsec", 1700000000, r#"{"a":1}"#);
        assert!(sig.starts_with("t=1700000000,v1="));
        assert_eq!(
            &sig[16..],
            hmac_sha256_hex(b"whsec", br#"1700000000.{"a":1}"#)
        );
        assert_ne!(sig, webhook_signature("whsec", 1700000001, r#"{"a":1}"#));
    }
}
