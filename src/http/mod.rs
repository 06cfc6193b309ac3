//! The HTTP endpoint of `cdcflow run`: `/metrics` (Prometheus text format), `/healthz` (the
//! process loop is alive) and `/readyz` (partitions assigned and restored, a broker reachable,
//! no failed batch being retried, not stopping).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, TextEncoder};
use thiserror::Error;

use crate::metrics::Metrics;
use crate::runtime::Health;

#[derive(Debug, Error)]
pub enum HttpError {
    #[error(
        "config key `http.listen`: cannot listen on {address}: {source}; pick a free port, or \
         set http.enabled = false"
    )]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct Endpoint {
    metrics: Metrics,
    health: Arc<Health>,
    /// How long the process loop may show no progress before `/healthz` fails.
    stall_after: Duration,
}

/// Binds the listener (at start-up, so a taken port stops the start with the key to fix).
pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| HttpError::Bind { address, source })
}

/// Serves the endpoint on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Arc<Health>,
    stall_after: Duration,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(liveness))
        .route("/readyz", get(readiness))
        .with_state(Endpoint {
            metrics,
            health,
            stall_after,
        });
    axum::serve(listener, router).await
}

async fn metrics_text(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let metrics = &endpoint.metrics;
    metrics
        .ready
        .set(i64::from(endpoint.health.readiness().is_ok()));
    metrics.sync_retries(&crate::runtime::retry_counts());
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&endpoint.metrics.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            error.to_string().into_bytes(),
        ),
    }
}

async fn liveness(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    match endpoint.health.liveness(endpoint.stall_after) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(silent) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stuck: the process loop has shown no progress for {}s\n",
                silent.as_secs()
            ),
        ),
    }
}

async fn readiness(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    match endpoint.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}
