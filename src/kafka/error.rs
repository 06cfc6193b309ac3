//! Why `cdcflow run` stops with an error. Every variant is fatal: the process exits non-zero
//! with the message, and a restart resumes from committed state. Each message says what could
//! not be done, why, and what to change.

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use thiserror::Error;

use crate::cdc::Origin;
use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("webhook delivery: {0}")]
    Webhook(String),
    #[error("{context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "the producer was fenced: another instance with transactional id `{0}` took over; this \
         one stops and commits nothing (give every instance its own kafka.instance_id)"
    )]
    Fenced(String),
    #[error(
        "the Kafka {client} reported a fatal error ({code:?}): {reason}; the client cannot be \
         used any more: check the broker's ACLs and this instance's configuration, then restart"
    )]
    FatalClient {
        client: &'static str,
        code: RDKafkaErrorCode,
        reason: String,
    },
    #[error(
        "{needed_by} needs librdkafka's `{feature}`, which this binary's librdkafka {version} \
         lacks (builtin.features: {features}); use a cdcflow built with its default features, \
         or change that setting"
    )]
    MissingFeature {
        feature: String,
        needed_by: String,
        version: String,
        features: String,
    },
    #[error(
        "cannot connect to Kafka at {bootstrap}: {reason} ({code:?}); {}",
        refusal_hint(*code)
    )]
    ConnectionRefused {
        bootstrap: String,
        code: RDKafkaErrorCode,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("changelog `{topic}` partition {partition} offset {offset}: {detail}")]
    Changelog {
        topic: String,
        partition: i32,
        offset: i64,
        detail: String,
    },
    #[error(
        "input topic `{topic}` of pipeline `{pipeline}` does not exist on {bootstrap}; create it \
         (Debezium creates it with the first change) or fix pipeline.topics"
    )]
    MissingInput {
        topic: String,
        pipeline: String,
        bootstrap: String,
    },
    #[error(
        "pipeline `{pipeline}` matches no existing topic; check pipeline.topics and topic_pattern"
    )]
    NoInput { pipeline: String },
    #[error(
        "pipeline `{pipeline}` matches {} topics ({}); cdcflow run needs one table per pipeline \
         (entities are identified by key alone and changelog partition p holds input partition \
         p): split it into one pipeline per topic",
        topics.len(),
        topics.join(", ")
    )]
    SeveralInputs {
        pipeline: String,
        topics: Vec<String>,
    },
    #[error(
        "pipeline `{pipeline}` identifies entities by key_fields {key_fields:?}, but its input \
         `{topic}` has {partitions} partitions: records without a Kafka key are spread over \
         partitions, so one entity's changes could be processed on two partitions (two lanes, \
         two states, no order between them). Key the topic's records by the entity (Debezium \
         keys by primary key; for keyless tables set `message.key.columns`), or use a \
         single-partition input topic"
    )]
    EntitiesSpanPartitions {
        pipeline: String,
        key_fields: Vec<String>,
        topic: String,
        partitions: usize,
    },
    #[error(
        "changelog topic `{changelog}` has {count} partitions but the input of pipeline \
         `{pipeline}` has {partitions}; they must match (partition p of the changelog holds the \
         state of input partition p). Delete the changelog (state is rebuilt from new changes \
         only) or restore the input's partition count"
    )]
    ChangelogPartitions {
        changelog: String,
        count: usize,
        pipeline: String,
        partitions: usize,
    },
    #[error("cannot create topic `{topic}`: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("cannot describe an output topic's config: {0}")]
    DescribeConfigs(RDKafkaErrorCode),
    #[error(
        "restoring `{topic}` did not reach its committed end within {waited:?}; is a \
         transaction stuck open?"
    )]
    RestoreTimedOut {
        topic: String,
        waited: std::time::Duration,
    },
    #[error(
        "a batch failed {attempts} times in a row while the brokers were reachable, last: \
         {reason}; stopping rather than retrying forever (check broker limits such as \
         message.max.bytes, and the broker's health)"
    )]
    BatchKeepsFailing { attempts: u32, reason: String },
    #[error("a refused output (#{index}) has no input record; stopping")]
    UnattributableRefusal { index: usize },
    #[error(
        "the DLQ topic `{topic}` refused the dead letter of {origin} even without its original \
         key and value ({size} bytes): {code}; raise max.message.bytes on `{topic}`"
    )]
    DeadLetterRefused {
        topic: String,
        origin: Origin,
        size: usize,
        code: RDKafkaErrorCode,
    },
    #[error("the consumer has no group metadata (it left its group); cannot commit a transaction")]
    NoGroupMetadata,
    #[error("shutdown was requested while waiting")]
    Interrupted,
    #[error("abort_transaction failed: {reason}")]
    AbortFailed { reason: String },
}

/// Wraps a librdkafka error with what cdcflow was doing.
pub(super) fn kafka_error(context: impl Into<String>) -> impl FnOnce(KafkaError) -> ServiceError {
    let context = context.into();
    move |source| ServiceError::Kafka { context, source }
}

/// What to check when the brokers refuse the connection.
fn refusal_hint(code: RDKafkaErrorCode) -> &'static str {
    match code {
        RDKafkaErrorCode::Authentication => {
            "check kafka.security.username, the password (password_env or password_file) and \
             sasl_mechanism against what the broker's listener accepts"
        }
        _ => {
            "check that kafka.security.ca_file holds the CA that signed the broker's \
             certificate, that the broker's certificate names the host in bootstrap_servers \
             (or set verify_hostname = false), and, if the broker requires client \
             certificates, kafka.security.cert_file and key_file"
        }
    }
}
