//! The ingress's HTTP adapter: read the body within its limit, [`accept`] it, claim the
//! request id in the [`RequestStore`], write the record to Kafka and answer only after the
//! broker acknowledged it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::accept::{Accepted, Authentication, PushHeaders, accept};
use super::store::{Claim, RequestStore, StoredAnswer};
use crate::config::IngressRoute;
use crate::kafka::IngressProducer;
use crate::metrics::IngressMetrics;
use crate::runtime::now_ms;

/// Everything a request needs.
#[derive(Debug)]
pub struct Ingress {
    pub routes: HashMap<String, IngressRoute>,
    pub authentication: Authentication,
    pub store: RequestStore,
    pub producer: IngressProducer,
    pub metrics: IngressMetrics,
    pub max_body_bytes: usize,
    /// How long a copy waits for the copy that owns its id (the owner's Kafka write).
    pub wait_for_owner: Duration,
    /// A claim older than this lost its owner (the owner answers within `wait_for_owner`).
    pub stale_after: Duration,
}

/// Serves pushes on `listener` until `shutdown` completes (requests under way finish).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ingress: Arc<Ingress>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new().fallback(push).with_state(ingress);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Forgets request ids past the retention, every `every`.
pub async fn expire_ids(store: RequestStore, retention: Duration, metrics: IngressMetrics) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::time::sleep(every).await;
        match store.expire(now_ms().saturating_sub(retention_ms)).await {
            Ok(removed) => metrics
                .expired_ids
                .with_label_values(&[store.backend()])
                .inc_by(removed),
            Err(error) => tracing::warn!(%error, "cannot expire old request ids; retrying later"),
        }
    }
}

fn answer(status: u16, body: String) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: u16, message: &str) -> Response {
    answer(
        status,
        json!({"status": status, "error": message}).to_string(),
    )
}

fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

async fn push(
    State(ingress): State<Arc<Ingress>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let path = uri.path().to_owned();
    let (label, response) = match ingress.routes.get(&path) {
        None => (
            "unknown",
            error(404, &format!("no ingress route is configured at `{path}`")),
        ),
        Some(_) if method != Method::POST => (path.as_str(), error(405, "pushes are POSTed")),
        Some(route) => (
            route.path.as_str(),
            handle(&ingress, route, &headers, body).await,
        ),
    };
    let metrics = &ingress.metrics;
    metrics
        .requests
        .with_label_values(&[label, response.status().as_str()])
        .inc();
    metrics
        .request_seconds
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn handle(
    ingress: &Ingress,
    route: &IngressRoute,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let refused = |reason: &str| {
        ingress
            .metrics
            .refused
            .with_label_values(&[route.path.as_str(), reason])
            .inc();
    };
    let too_large = || {
        error(
            413,
            &format!(
                "the body is larger than {} bytes (ingress.max_body_bytes)",
                ingress.max_body_bytes
            ),
        )
    };
    let declared =
        header_text(headers, "content-length").and_then(|text| text.parse::<usize>().ok());
    if declared.is_some_and(|length| length > ingress.max_body_bytes) {
        refused("too_large");
        return too_large();
    }
    let Ok(body) = axum::body::to_bytes(body, ingress.max_body_bytes).await else {
        refused("too_large");
        return too_large();
    };
    let push_headers = PushHeaders {
        webhook_id: header_text(headers, "webhook-id"),
        webhook_timestamp: header_text(headers, "webhook-timestamp"),
        webhook_signature: header_text(headers, "webhook-signature"),
        idempotency_key: header_text(headers, "idempotency-key"),
    };
    let accepted = match accept(
        &push_headers,
        &body,
        &route.key,
        &ingress.authentication,
        now_ms() / 1000,
    ) {
        Ok(accepted) => accepted,
        Err(refusal) => {
            refused(refusal.reason());
            return error(refusal.status(), &refusal.to_string());
        }
    };
    let deadline = Instant::now() + ingress.wait_for_owner;
    loop {
        let claim = ingress
            .store
            .claim(
                &route.path,
                &accepted.request_id,
                &accepted.fingerprint,
                now_ms(),
                ingress.stale_after,
            )
            .await;
        let fingerprint = match claim {
            Ok(Claim::Owned) => return write(ingress, route, &accepted, &body).await,
            Ok(Claim::Answered {
                answer: stored,
                fingerprint,
            }) if fingerprint == accepted.fingerprint => {
                ingress
                    .metrics
                    .duplicates
                    .with_label_values(&[route.path.as_str()])
                    .inc();
                let mut response = answer(stored.status, stored.body);
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return response;
            }
            Ok(Claim::Answered { fingerprint, .. } | Claim::InProgress { fingerprint }) => {
                fingerprint
            }
            Err(failure) => {
                tracing::error!(error = %failure, "the request-id database failed");
                return unavailable("the request-id database is unavailable; retry");
            }
        };
        if fingerprint != accepted.fingerprint {
            refused("reused_id");
            return error(
                422,
                &format!(
                    "request id `{}` was used before with another body; a retry must send \
                     the same body, a new push needs a new id",
                    accepted.request_id
                ),
            );
        }
        if Instant::now() >= deadline {
            let mut response = error(
                409,
                "a copy of this request is being processed; retry to get its answer",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn unavailable(message: &str) -> Response {
    let mut response = error(503, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

/// The owner's part: the record into Kafka, then the answer into the store.
async fn write(
    ingress: &Ingress,
    route: &IngressRoute,
    accepted: &Accepted,
    body: &[u8],
) -> Response {
    let written = ingress
        .producer
        .write(
            &route.topic,
            &accepted.key,
            body,
            &[
                ("cdcflow.ingress.request_id", accepted.request_id.as_str()),
                ("cdcflow.ingress.route", route.path.as_str()),
                ("content-type", "application/json"),
            ],
        )
        .await;
    let written = match written {
        Ok(written) => written,
        Err(failure) => {
            tracing::warn!(request_id = %accepted.request_id, error = %failure, "a push was not acknowledged by Kafka; answering 503");
            if let Err(error) = ingress
                .store
                .release(&route.path, &accepted.request_id)
                .await
            {
                // The claim then expires as stale, and a retry after it is written.
                tracing::error!(%error, "cannot release the claim of a failed push");
            }
            return unavailable(&format!(
                "Kafka did not acknowledge the record: {failure}; nothing was stored, retry \
                 with the same request id"
            ));
        }
    };
    let stored = StoredAnswer {
        status: 202,
        body: json!({
            "request_id": accepted.request_id,
            "topic": route.topic,
            "partition": written.partition,
            "offset": written.offset,
        })
        .to_string(),
    };
    // The record is in Kafka: the push is answered now, and its answer stored with the next
    // group commit (a copy arriving before that waits for it). Should the answer never be
    // stored, a retry after the claim goes stale is written again, and the pipeline's
    // version gate drops the copy.
    if let Err(error) = ingress
        .store
        .finish_later(&route.path, &accepted.request_id, &stored)
        .await
    {
        tracing::error!(request_id = %accepted.request_id, %error, "cannot store the answer of a written push");
    }
    answer(stored.status, stored.body)
}
