//! One delivery attempt against a real HTTP receiver on loopback: the Standard Webhooks headers
//! it sees verify with the project's code, and each kind of failure (5xx, 429 with
//! Retry-After, a timeout, a refused connection, a rejecting 4xx, a redirect) comes back as the
//! answer the retry policy acts on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use cdcflow::webhook::client::{Delivery, WebhookClient};
use cdcflow::webhook::{AttemptResult, Next, RetryPolicy, SigningSecret, next_step, verify};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the receiver saw of the signed request: whether it verified, and the id.
type Seen = Arc<Mutex<Vec<(bool, String)>>>;

async fn receiver() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = {
        let seen = Arc::clone(&seen);
        move |headers: HeaderMap, body: Bytes| {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let verified = verify(
                &[SigningSecret::parse(SECRET).unwrap()],
                header("webhook-id").as_deref(),
                header("webhook-timestamp").as_deref(),
                header("webhook-signature").as_deref(),
                &body,
                now,
                300,
            )
            .is_ok();
            seen.lock()
                .unwrap()
                .push((verified, header("webhook-id").unwrap_or_default()));
        }
    };
    let ok = {
        let record = record.clone();
        move |headers: HeaderMap, body: Bytes| async move {
            record(headers, body);
            StatusCode::NO_CONTENT
        }
    };
    let router = Router::new()
        .route("/ok", post(ok))
        .route(
            "/fail",
            post(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "boom: the database is down",
                )
            }),
        )
        .route(
            "/busy",
            post(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "3")],
                    "slow down",
                )
                    .into_response()
            }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                StatusCode::OK
            }),
        )
        .route(
            "/gone",
            post(|| async { (StatusCode::GONE, "no such subscriber") }),
        )
        .route(
            "/moved",
            post(|| async {
                (StatusCode::MOVED_PERMANENTLY, [("location", "/ok")], "").into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{address}"), seen)
}

const POLICY: RetryPolicy = RetryPolicy {
    initial_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(60),
    max_attempts: 5,
    max_age: Duration::from_secs(600),
};

#[tokio::test]
async fn attempts_are_signed_and_failures_classified() {
    let (base, seen) = receiver().await;
    let client = WebhookClient::new(
        vec![SigningSecret::parse(SECRET).unwrap()],
        Duration::from_millis(500),
        8,
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let delivery = Delivery {
        id: "evt_0f3c",
        timestamp: now,
        body: br#"{"specversion":"1.0","id":"evt_0f3c","type":"OrderPaid"}"#,
        content_type: "application/cloudevents+json",
    };
    let attempt = |path: &str| {
        let url = format!("{base}{path}");
        let client = client.clone();
        async move { client.attempt(&url, &delivery).await }
    };
    let step = |result: &AttemptResult| next_step(&POLICY, result, 1, Duration::ZERO, now, 0.0);

    let ok = attempt("/ok").await;
    assert_eq!(step(&ok), Next::Delivered, "{ok:?}");
    assert_eq!(*seen.lock().unwrap(), [(true, "evt_0f3c".to_owned())]);

    let failed = attempt("/fail").await;
    assert!(
        matches!(&failed, AttemptResult::Answered { status: 500, body, .. } if body.contains("database is down")),
        "{failed:?}"
    );
    assert!(matches!(step(&failed), Next::RetryIn(_)));

    let busy = attempt("/busy").await;
    assert_eq!(
        step(&busy),
        Next::RetryIn(Duration::from_secs(3)),
        "{busy:?}"
    );

    let slow = attempt("/slow").await;
    assert_eq!(slow, AttemptResult::TimedOut);

    let gone = attempt("/gone").await;
    assert!(
        matches!(step(&gone), Next::DeadLetter(ref abandoned) if abandoned.reason == "rejected" && abandoned.last_status == Some(410)),
        "{gone:?}"
    );

    let moved = attempt("/moved").await;
    assert!(
        matches!(moved, AttemptResult::Answered { status: 301, .. }),
        "redirects are not followed: {moved:?}"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "the redirect target was not called"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused_url = format!("http://{}/ok", closed.local_addr().unwrap());
    drop(closed);
    let refused = client.attempt(&refused_url, &delivery).await;
    assert!(
        matches!(&refused, AttemptResult::Unreachable(error) if error.to_lowercase().contains("connect")),
        "{refused:?}"
    );
    assert!(matches!(step(&refused), Next::RetryIn(_)));
}
