//! The Kafka adapter of `cdcflow run`: clients, topic set-up, changelog restore and the
//! consume-process-produce loop with its two commit protocols.
//!
//! The pure core decides; this module only moves bytes and offsets. Every librdkafka call that
//! blocks runs on the service's own thread, never on a tokio worker.

mod admin;
mod clients;
mod restore;
mod service;

use thiserror::Error;

pub use service::{ServiceOptions, run_service};

/// Why the service stopped with an error. Each is fatal: the process exits non-zero and a
/// restart resumes from committed state.
#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("{context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("{0}")]
    Topology(String),
    #[error(
        "the producer was fenced: another instance with transactional id `{0}` took over; this one stops and commits nothing"
    )]
    Fenced(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("changelog `{topic}` partition {partition} offset {offset}: {detail}")]
    Changelog {
        topic: String,
        partition: i32,
        offset: i64,
        detail: String,
    },
}

fn kafka_error(
    context: impl Into<String>,
) -> impl FnOnce(rdkafka::error::KafkaError) -> ServiceError {
    let context = context.into();
    move |source| ServiceError::Kafka { context, source }
}

/// The name of a pipeline's changelog topic: `<group_id>.<pipeline>.changelog`.
pub fn changelog_topic(group_id: &str, pipeline: &str) -> String {
    format!("{group_id}.{pipeline}.changelog")
}
