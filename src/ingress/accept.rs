//! What the ingress decides before anything is stored or written: is the push authentic,
//! does it carry a request id, is it JSON, which entity is it. Pure: the HTTP adapter hands
//! in the headers, the body and the clock.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::webhook::{SigningSecret, VerifyError, verify};

/// The headers the ingress reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushHeaders<'a> {
    pub webhook_id: Option<&'a str>,
    pub webhook_timestamp: Option<&'a str>,
    pub webhook_signature: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
}

/// How pushes are authenticated.
#[derive(Debug, Clone)]
pub struct Authentication {
    pub secrets: Vec<SigningSecret>,
    /// A push without `webhook-signature` is taken (one that has it is still verified).
    pub allow_unsigned: bool,
    pub tolerance_s: i64,
}

/// A push that may be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub request_id: String,
    /// The Kafka key: a JSON object of the route's key fields, as Debezium writes keys.
    pub key: Vec<u8>,
    /// SHA-256 of the body, hex: a request id reused with another body is refused.
    pub fingerprint: String,
}

/// Why a push is refused; the message is safe to answer with.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("signature refused: {0}")]
    Unauthorized(VerifyError),
    #[error("a request id is required: send `webhook-id` (Standard Webhooks) or `Idempotency-Key`")]
    MissingRequestId,
    #[error("the request id is {0} bytes; at most 255 are accepted")]
    RequestIdTooLong(usize),
    #[error("the body is not JSON: {0}")]
    MalformedJson(String),
    #[error("the body is JSON but not an object")]
    NotAnObject,
    #[error("key field `{0}` is missing or null in the body")]
    MissingKeyField(String),
    #[error("key field `{0}` must be a string, a number or a bool")]
    KeyFieldNotScalar(String),
}

impl Refusal {
    /// The HTTP status answered.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Unauthorized(_) => 401,
            Refusal::MissingRequestId
            | Refusal::RequestIdTooLong(_)
            | Refusal::MalformedJson(_)
            | Refusal::NotAnObject => 400,
            Refusal::MissingKeyField(_) | Refusal::KeyFieldNotScalar(_) => 422,
        }
    }

    /// The metric label of the refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unauthorized(_) => "unauthorized",
            Refusal::MissingRequestId | Refusal::RequestIdTooLong(_) => "request_id",
            Refusal::MalformedJson(_) | Refusal::NotAnObject => "malformed",
            Refusal::MissingKeyField(_) | Refusal::KeyFieldNotScalar(_) => "key",
        }
    }
}

const MAX_REQUEST_ID_BYTES: usize = 255;

/// Checks a push in the order a sender can act on: authenticity first (an unauthenticated
/// caller learns nothing else), then the request id, then the body.
pub fn accept(
    headers: &PushHeaders<'_>,
    body: &[u8],
    key_fields: &[String],
    authentication: &Authentication,
    now_s: i64,
) -> Result<Accepted, Refusal> {
    let signed = headers.webhook_signature.is_some();
    if signed || !authentication.allow_unsigned {
        verify(
            &authentication.secrets,
            headers.webhook_id,
            headers.webhook_timestamp,
            headers.webhook_signature,
            body,
            now_s,
            authentication.tolerance_s,
        )
        .map_err(Refusal::Unauthorized)?;
    }
    let request_id = headers
        .webhook_id
        .or(headers.idempotency_key)
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .ok_or(Refusal::MissingRequestId)?;
    if request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(Refusal::RequestIdTooLong(request_id.len()));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|error| Refusal::MalformedJson(error.to_string()))?;
    let Value::Object(object) = &value else {
        return Err(Refusal::NotAnObject);
    };
    let key = entity_key(object, key_fields)?;
    Ok(Accepted {
        request_id: request_id.to_owned(),
        key,
        fingerprint: hex(&Sha256::digest(body)),
    })
}

/// `{"<last segment>": value, ...}` of the key fields, in the route's order.
fn entity_key(object: &Map<String, Value>, key_fields: &[String]) -> Result<Vec<u8>, Refusal> {
    let mut key = String::from("{");
    for (index, field) in key_fields.iter().enumerate() {
        let mut segments = field.split('.');
        let first = segments.next().unwrap_or_default();
        let mut found = object.get(first);
        for segment in segments {
            found = found.and_then(|value| value.get(segment));
        }
        let value = match found {
            None | Some(Value::Null) => return Err(Refusal::MissingKeyField(field.clone())),
            Some(scalar @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => scalar,
            Some(_) => return Err(Refusal::KeyFieldNotScalar(field.clone())),
        };
        let name = field.rsplit('.').next().unwrap_or(field);
        if index > 0 {
            key.push(',');
        }
        key.push_str(&Value::String(name.to_owned()).to_string());
        key.push(':');
        key.push_str(&value.to_string());
    }
    key.push('}');
    Ok(key.into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::signature_header;

    const NOW: i64 = 1_700_000_000;

    fn secret() -> SigningSecret {
        SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
    }

    fn signed() -> Authentication {
        Authentication {
            secrets: vec![secret()],
            allow_unsigned: false,
            tolerance_s: 300,
        }
    }

    fn key() -> Vec<String> {
        vec!["id".to_owned()]
    }

    /// A push signed now with the test secret.
    fn push(body: &[u8], at: i64) -> (String, String, String) {
        let id = "msg_1".to_owned();
        let signature = signature_header(&[secret()], &id, at, body);
        (id, at.to_string(), signature)
    }

    fn headers<'a>(parts: &'a (String, String, String)) -> PushHeaders<'a> {
        PushHeaders {
            webhook_id: Some(&parts.0),
            webhook_timestamp: Some(&parts.1),
            webhook_signature: Some(&parts.2),
            idempotency_key: None,
        }
    }

    #[test]
    fn a_signed_push_is_accepted_with_its_key_and_fingerprint() {
        let body = br#"{"id": 42, "status": "paid", "version": 3}"#;
        let parts = push(body, NOW);
        let accepted = accept(&headers(&parts), body, &key(), &signed(), NOW).unwrap();
        assert_eq!(accepted.request_id, "msg_1");
        assert_eq!(accepted.key, br#"{"id":42}"#);
        assert_eq!(accepted.fingerprint.len(), 64);
        let other = accept(
            &headers(&push(br#"{"id": 42}"#, NOW)),
            br#"{"id": 42}"#,
            &key(),
            &signed(),
            NOW,
        )
        .unwrap();
        assert_ne!(accepted.fingerprint, other.fingerprint);
    }

    #[test]
    fn a_wrong_signature_or_old_timestamp_is_401() {
        let body = br#"{"id": 1}"#;
        let parts = push(body, NOW);
        let tampered = br#"{"id": 2}"#;
        let refusal = accept(&headers(&parts), tampered, &key(), &signed(), NOW).unwrap_err();
        assert_eq!(refusal, Refusal::Unauthorized(VerifyError::NoMatch));
        assert_eq!(refusal.status(), 401);
        let old = push(body, NOW - 301);
        let refusal = accept(&headers(&old), body, &key(), &signed(), NOW).unwrap_err();
        assert_eq!(refusal, Refusal::Unauthorized(VerifyError::TooOld(301)));
        let unsigned = PushHeaders {
            idempotency_key: Some("k1"),
            ..PushHeaders::default()
        };
        let refusal = accept(&unsigned, body, &key(), &signed(), NOW).unwrap_err();
        assert_eq!(refusal.status(), 401, "{refusal}");
    }

    #[test]
    fn unsigned_pushes_need_allow_unsigned_and_a_request_id() {
        let open = Authentication {
            secrets: Vec::new(),
            allow_unsigned: true,
            tolerance_s: 300,
        };
        let body = br#"{"order": {"id": "A-1"}, "v": 1}"#;
        let fields = vec!["order.id".to_owned()];
        let with_key = PushHeaders {
            idempotency_key: Some(" req-7 "),
            ..PushHeaders::default()
        };
        let accepted = accept(&with_key, body, &fields, &open, NOW).unwrap();
        assert_eq!(accepted.request_id, "req-7");
        assert_eq!(accepted.key, br#"{"id":"A-1"}"#);
        let refusal = accept(&PushHeaders::default(), body, &fields, &open, NOW).unwrap_err();
        assert_eq!(refusal, Refusal::MissingRequestId);
        assert_eq!(refusal.status(), 400);
        let long = "x".repeat(256);
        let too_long = PushHeaders {
            idempotency_key: Some(&long),
            ..PushHeaders::default()
        };
        assert_eq!(
            accept(&too_long, body, &fields, &open, NOW).unwrap_err(),
            Refusal::RequestIdTooLong(256)
        );
    }

    #[test]
    fn bodies_that_name_no_entity_are_refused_with_the_field() {
        let open = Authentication {
            secrets: Vec::new(),
            allow_unsigned: true,
            tolerance_s: 300,
        };
        let headers = PushHeaders {
            idempotency_key: Some("k"),
            ..PushHeaders::default()
        };
        let refuse = |body: &[u8]| accept(&headers, body, &key(), &open, NOW).unwrap_err();
        let malformed = refuse(b"{\"id\": 1");
        assert!(matches!(malformed, Refusal::MalformedJson(_)));
        assert_eq!(malformed.status(), 400);
        assert!(malformed.to_string().contains("line 1"), "{malformed}");
        assert_eq!(refuse(b"[1]"), Refusal::NotAnObject);
        assert_eq!(
            refuse(br#"{"id": null}"#),
            Refusal::MissingKeyField("id".into())
        );
        assert_eq!(refuse(br#"{"name": "x"}"#).status(), 422);
        assert_eq!(
            refuse(br#"{"id": {"a": 1}}"#),
            Refusal::KeyFieldNotScalar("id".into())
        );
    }

    #[test]
    fn composite_keys_keep_the_route_order() {
        let open = Authentication {
            secrets: Vec::new(),
            allow_unsigned: true,
            tolerance_s: 300,
        };
        let headers = PushHeaders {
            idempotency_key: Some("k"),
            ..PushHeaders::default()
        };
        let fields = vec!["tenant".to_owned(), "id".to_owned()];
        let accepted = accept(
            &headers,
            br#"{"id": 5, "tenant": "t\"1"}"#,
            &fields,
            &open,
            NOW,
        )
        .unwrap();
        assert_eq!(accepted.key, br#"{"tenant":"t\"1","id":5}"#);
    }
}
