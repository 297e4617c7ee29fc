//! HMAC-SHA256 signatures, pure Rust: the `Keypal-Signature` header of webhook deliveries.

use hmac::{Hmac, Mac};
use sha2::Sha256;

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
    let signed = format!("{t}.{body}");
    format!(
        "t={t},v1={}",
        hmac_sha256_hex(secret.as_bytes(), signed.as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
