//! The HTTP side of one delivery attempt: a POST of the event with the Standard Webhooks
//! headers, answered by an [`AttemptResult`] for [`super::next_step`]. Redirects are not
//! followed (a signed event goes only where it was configured to go) and only the start of a
//! response body is read.

use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use thiserror::Error;

use super::retry::{AttemptResult, EXCERPT_BYTES, excerpt};
use super::signature::{SigningSecret, signature_header};

/// One event to POST.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// `webhook-id`: the event id, the same on every attempt and redelivery.
    pub id: &'a str,
    /// `webhook-timestamp`: Unix seconds of this attempt.
    pub timestamp: i64,
    pub body: &'a [u8],
    pub content_type: &'a str,
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot build the webhook HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// Signs and POSTs deliveries.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    secrets: Vec<SigningSecret>,
}

impl WebhookClient {
    /// A client whose attempts give up after `timeout` (connecting and answering); the first
    /// of `secrets` is the current one, the others are being rotated out.
    pub fn new(
        secrets: Vec<SigningSecret>,
        timeout: Duration,
        max_connections_per_host: usize,
    ) -> Result<WebhookClient, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(max_connections_per_host)
            .build()
            .map_err(ClientError::Build)?;
        Ok(WebhookClient { http, secrets })
    }

    /// One attempt: never an error, since every failure is an answer for the retry policy.
    pub async fn attempt(&self, url: &str, delivery: &Delivery<'_>) -> AttemptResult {
        let signature = signature_header(
            &self.secrets,
            delivery.id,
            delivery.timestamp,
            delivery.body,
        );
        let request = self
            .http
            .post(url)
            .header(
                USER_AGENT,
                HeaderValue::from_static(concat!("cdcflow/", env!("CARGO_PKG_VERSION"))),
            )
            .header(CONTENT_TYPE, delivery.content_type)
            .header("webhook-id", delivery.id)
            .header("webhook-timestamp", delivery.timestamp.to_string())
            .header("webhook-signature", signature)
            .body(delivery.body.to_vec());
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) if error.is_timeout() => return AttemptResult::TimedOut,
            Err(error) => return AttemptResult::Unreachable(error_chain(&error)),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        // Only the start of the body is kept: a receiver's error page can be large.
        while body.len() <= EXCERPT_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(error) if error.is_timeout() && !(200..300).contains(&status) => {
                    return AttemptResult::TimedOut;
                }
                Err(_) => break,
            }
        }
        AttemptResult::Answered {
            status,
            retry_after,
            body: excerpt(&String::from_utf8_lossy(&body)),
        }
    }
}

/// An error with its causes (`error sending request: connection refused`).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
