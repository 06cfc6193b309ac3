//! The HTTP endpoint of `cdcflow run`: `/metrics` (Prometheus text format), `/healthz` (the
//! process is alive) and `/readyz` (partitions assigned and restored, no failed batch being
//! retried, not stopping).

use std::net::SocketAddr;
use std::sync::Arc;

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
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(Endpoint { metrics, health });
    axum::serve(listener, router).await
}

async fn metrics_text(State(endpoint): State<Endpoint>) -> impl IntoResponse {
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

async fn readiness(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    match endpoint.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}
