//! Standard Webhooks signatures: `webhook-signature` is `v1,` + base64 of HMAC-SHA256 over
//! `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the bytes of a `whsec_`-prefixed
//! base64 secret. Several signatures, space-separated, let a sender sign with an old and a new
//! secret while receivers rotate.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A signing secret: its key bytes. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret {
    key: Vec<u8>,
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(***)")
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a webhook secret must start with `whsec_` followed by base64 (Standard Webhooks)")]
    MissingPrefix,
    #[error("the part of the webhook secret after `whsec_` is not base64")]
    NotBase64,
    #[error("the webhook secret is {0} bytes; use 24 to 64 random bytes")]
    BadLength(usize),
}

/// Why a request's signature is refused. The messages are safe to answer with: they never
/// carry the secret or the expected signature.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("the `{0}` header is missing")]
    MissingHeader(&'static str),
    #[error("`webhook-timestamp` is not a Unix time in seconds")]
    BadTimestamp,
    #[error("`webhook-timestamp` is {0} s old, beyond the tolerance")]
    TooOld(i64),
    #[error("`webhook-timestamp` is {0} s in the future, beyond the tolerance")]
    TooNew(i64),
    #[error("no `v1` signature in `webhook-signature` matches")]
    NoMatch,
}

impl SigningSecret {
    /// Reads `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<SigningSecret, SecretError> {
        let encoded = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = BASE64.decode(encoded).map_err(|_| SecretError::NotBase64)?;
        if !(24..=64).contains(&key.len()) {
            return Err(SecretError::BadLength(key.len()));
        }
        Ok(SigningSecret { key })
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length: new_from_slice cannot fail for it.
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC accepts any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// `v1,<base64 signature>` of a message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let digest = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!("v1,{}", BASE64.encode(digest))
    }

    /// Whether `signature` (the base64 part) is this secret's signature, compared in
    /// constant time.
    fn matches(&self, id: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
        let Ok(bytes) = BASE64.decode(signature) else {
            return false;
        };
        self.mac(id, timestamp, body).verify_slice(&bytes).is_ok()
    }
}

/// The `webhook-signature` header of a message: one `v1,` signature per secret, space-separated
/// (the first secret is the current one; the others are being rotated out).
pub fn signature_header(
    secrets: &[SigningSecret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks a request's Standard Webhooks headers against any of `secrets`, with the timestamp
/// within `tolerance_s` seconds of `now_s` either way (replays of an old request are refused).
pub fn verify(
    secrets: &[SigningSecret],
    id: Option<&str>,
    timestamp: Option<&str>,
    signatures: Option<&str>,
    body: &[u8],
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), VerifyError> {
    let id = id.ok_or(VerifyError::MissingHeader("webhook-id"))?;
    let timestamp = timestamp.ok_or(VerifyError::MissingHeader("webhook-timestamp"))?;
    let signatures = signatures.ok_or(VerifyError::MissingHeader("webhook-signature"))?;
    let sent: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    let age = now_s.saturating_sub(sent);
    if age > tolerance_s {
        return Err(VerifyError::TooOld(age));
    }
    if -age > tolerance_s {
        return Err(VerifyError::TooNew(-age));
    }
    let timestamp = timestamp.trim();
    let any = signatures
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .any(|signature| {
            secrets
                .iter()
                .any(|secret| secret.matches(id, timestamp, body, signature))
        });
    if any {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's example: its secret, message id, timestamp and
    /// body give its signature.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn spec_secret() -> SigningSecret {
        SigningSecret::parse(SPEC_SECRET).unwrap()
    }

    #[test]
    fn the_specification_vector_signs_and_verifies() {
        let secret = spec_secret();
        assert_eq!(
            secret.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY),
            SPEC_SIGNATURE
        );
        let timestamp = SPEC_TIMESTAMP.to_string();
        let check = |signatures: &str, body: &[u8], now: i64| {
            verify(
                std::slice::from_ref(&secret),
                Some(SPEC_ID),
                Some(&timestamp),
                Some(signatures),
                body,
                now,
                300,
            )
        };
        assert_eq!(check(SPEC_SIGNATURE, SPEC_BODY, SPEC_TIMESTAMP), Ok(()));
        // Another version's signature next to ours, as a sender may send during an upgrade.
        let several = format!("v2,AAAA {SPEC_SIGNATURE}");
        assert_eq!(check(&several, SPEC_BODY, SPEC_TIMESTAMP + 299), Ok(()));
        assert_eq!(
            check(SPEC_SIGNATURE, br#"{"test": 2432232315}"#, SPEC_TIMESTAMP),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            check(SPEC_SIGNATURE, SPEC_BODY, SPEC_TIMESTAMP + 301),
            Err(VerifyError::TooOld(301))
        );
        assert_eq!(
            check(SPEC_SIGNATURE, SPEC_BODY, SPEC_TIMESTAMP - 301),
            Err(VerifyError::TooNew(301))
        );
        assert_eq!(
            check("v1,not base64!", SPEC_BODY, SPEC_TIMESTAMP),
            Err(VerifyError::NoMatch)
        );
    }

    /// During a rotation the sender signs with both secrets; a receiver knowing either accepts.
    #[test]
    fn rotation_signs_with_every_secret() {
        let old = spec_secret();
        let new =
            SigningSecret::parse(&format!("{SECRET_PREFIX}{}", BASE64.encode([7u8; 32]))).unwrap();
        let header = signature_header(
            &[new.clone(), old.clone()],
            SPEC_ID,
            SPEC_TIMESTAMP,
            SPEC_BODY,
        );
        assert_eq!(header.split(' ').count(), 2);
        let timestamp = SPEC_TIMESTAMP.to_string();
        for receiver in [old, new] {
            assert_eq!(
                verify(
                    &[receiver],
                    Some(SPEC_ID),
                    Some(&timestamp),
                    Some(&header),
                    SPEC_BODY,
                    SPEC_TIMESTAMP,
                    300
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn secrets_and_headers_are_checked() {
        assert_eq!(
            SigningSecret::parse("MfKQ9r8G"),
            Err(SecretError::MissingPrefix)
        );
        assert_eq!(
            SigningSecret::parse("whsec_***"),
            Err(SecretError::NotBase64)
        );
        assert_eq!(
            SigningSecret::parse("whsec_AAAA"),
            Err(SecretError::BadLength(3))
        );
        assert_eq!(format!("{:?}", spec_secret()), "SigningSecret(***)");
        let secrets = [spec_secret()];
        let missing = |id, timestamp, signature| {
            verify(
                &secrets,
                id,
                timestamp,
                signature,
                SPEC_BODY,
                SPEC_TIMESTAMP,
                300,
            )
        };
        assert_eq!(
            missing(None, Some("1"), Some("v1,x")),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
        assert_eq!(
            missing(Some("a"), None, Some("v1,x")),
            Err(VerifyError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            missing(Some("a"), Some("1"), None),
            Err(VerifyError::MissingHeader("webhook-signature"))
        );
        assert_eq!(
            missing(Some("a"), Some("yesterday"), Some("v1,x")),
            Err(VerifyError::BadTimestamp)
        );
    }
}
