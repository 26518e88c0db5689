//! Standard Webhooks signatures.
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`, the MAC is
//! HMAC-SHA256 keyed with the base64-decoded part of a `whsec_` secret, and the
//! `webhook-signature` header carries `v1,<base64 MAC>`.

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::config::Secret;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Computes the `webhook-signature` header value for one attempt.
pub fn sign(secret: &Secret, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.key()).expect("HMAC-SHA256 accepts keys of any length");
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(digest))
}

/// Checks a `webhook-signature` header, which may list several space-separated
/// signatures (one per secret during a rotation). Compares in constant time.
pub fn verify(secret: &Secret, webhook_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let mut mac = HmacSha256::new_from_slice(secret.key()).expect("HMAC-SHA256 accepts keys of any length");
    mac.update(format!("{webhook_id}.{timestamp}.").as_bytes());
    mac.update(body);

    header
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .any(
            |encoded| match base64::engine::general_purpose::STANDARD.decode(encoded) {
                Ok(expected) => mac.clone().verify_slice(&expected).is_ok(),
                Err(_) => false,
            },
        )
}

/// Generates a new secret of 32 random bytes, written as `whsec_<base64>`.
pub fn generate_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!(
        "{}{}",
        Secret::PREFIX,
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specification_secret() -> Secret {
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        Secret::from_key(key)
    }

    /// The example that the Standard Webhooks libraries test against.
    #[test]
    fn signature_matches_specification_vector() {
        let signature = sign(
            &specification_secret(),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn verify_accepts_any_listed_signature() {
        let secret = specification_secret();
        let body = br#"{"test": 2432232314}"#;
        let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert!(verify(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, good));
        assert!(verify(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            &format!("v1,AAAA {good}")
        ));
        assert!(!verify(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, good));
        assert!(!verify(&secret, "msg_other", 1614265330, body, good));
        assert!(!verify(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            b"{}",
            good
        ));
        assert!(!verify(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            "v2,abc"
        ));
    }

    #[test]
    fn generated_secrets_decode_to_32_bytes() {
        let text = generate_secret();
        let encoded = text.strip_prefix("whsec_").expect("prefix");
        assert_eq!(
            base64::engine::general_purpose::STANDARD.decode(encoded).unwrap().len(),
            32
        );
        assert_ne!(generate_secret(), text);
    }
}
