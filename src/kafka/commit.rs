//! What both commit protocols share: the [`Committer`] (the producer and what a commit
//! reads), how a failed batch is classified, and the dispatch to the configured protocol
//! ([`super::transactional`] or [`super::at_least_once`]).

use rdkafka::TopicPartitionList;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::admin::Topology;
use super::error::ServiceError;
use super::produce::{ChangelogRecord, Producer, RefusedOutput};
use super::rebalance::RebalanceContext;
use super::service::ServiceOptions;
use crate::config::DeliveryConfig;
use crate::runtime::{BatchOutcome, SharedPipelines};
use crate::store::{Checkpoint, StateStore};

/// How a failed batch is handled.
#[derive(Debug)]
pub(super) enum BatchFailure {
    /// Abort (if a transaction is open), rewind to the committed offsets, try again.
    Retry(String),
    /// Outputs the producer or the broker refused as too large (by index in the batch's
    /// outputs): their records go to the DLQ on the next attempt.
    Refused(Vec<RefusedOutput>),
    /// At-least-once: outputs and changelog records were delivered but the offset commit
    /// failed (it may even have landed). The batch's state is durable in the changelog, so it
    /// is kept; the batch is then retried from the committed offsets.
    OffsetsUncommitted {
        reason: String,
        changelog: Vec<Checkpoint>,
    },
    Fatal(ServiceError),
}

/// Error codes after which a client can never succeed: the producer was fenced, or the
/// broker refuses this principal. Retrying them would loop forever.
fn is_fatal_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fatal
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication
    )
}

fn is_fenced_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced
    )
}

/// Classifies a librdkafka error of a commit step: retriable and abortable errors retry the
/// batch; fenced, fatal, authorisation and unclassified transactional errors stop the service
/// (librdkafka's rule: treat an unclassified transactional error as fatal).
pub(super) fn classify(context: &str, error: KafkaError, transactional_id: &str) -> BatchFailure {
    let code = error.rdkafka_error_code();
    if code.is_some_and(is_fenced_code) {
        return BatchFailure::Fatal(ServiceError::Fenced(transactional_id.to_owned()));
    }
    let fatal = |error| {
        BatchFailure::Fatal(ServiceError::Kafka {
            context: context.to_owned(),
            source: error,
        })
    };
    if let KafkaError::Transaction(rd_error) = &error {
        if rd_error.is_fatal() {
            return fatal(error);
        }
        if rd_error.txn_requires_abort() || rd_error.is_retriable() {
            return BatchFailure::Retry(format!("{context}: {error}"));
        }
        return fatal(error);
    }
    if code.is_some_and(is_fatal_code) {
        return fatal(error);
    }
    match error {
        // rust-rdkafka's commit_transaction flushes first and reports a flush timeout as a
        // flush error, not a transaction error.
        KafkaError::Flush(_) | KafkaError::MessageProduction(_) | KafkaError::ConsumerCommit(_) => {
            BatchFailure::Retry(format!("{context}: {error}"))
        }
        other => fatal(other),
    }
}

/// Whether a consumer error means the consumer can never work again.
pub(super) fn is_fatal_consumer_error(error: &KafkaError) -> bool {
    error.rdkafka_error_code().is_some_and(is_fatal_code)
}

/// What a commit needs: the producer and what a commit reads.
pub(super) struct Committer<'a, S: StateStore> {
    pub options: &'a ServiceOptions,
    pub pipelines: &'a SharedPipelines,
    pub topology: &'a Topology,
    pub runtime: &'a tokio::runtime::Handle,
    pub producer: &'a Producer,
    pub consumer: &'a BaseConsumer<RebalanceContext<S>>,
    pub transactional_id: &'a str,
}

impl<S: StateStore> Committer<'_, S> {
    /// Commits a processed batch in the configured delivery mode; returns the changelog
    /// offsets written.
    pub(super) fn deliver(
        &self,
        outcome: &BatchOutcome,
        offsets: &TopicPartitionList,
    ) -> Result<Vec<Checkpoint>, BatchFailure> {
        let changelog_records: Vec<ChangelogRecord<'_>> = outcome
            .writes
            .iter()
            .filter_map(|write| {
                let pipeline = self
                    .pipelines
                    .iter()
                    .position(|(_, p)| p.name() == write.pipeline)?;
                Some(ChangelogRecord { pipeline, write })
            })
            .collect();
        let delivered = if self.options.kafka.delivery == DeliveryConfig::ExactlyOnce {
            self.commit_transactionally(&outcome.outputs, &changelog_records, offsets)
        } else {
            self.commit_at_least_once(&outcome.outputs, &changelog_records, offsets)
        };
        match delivered {
            // Without the topics' limits the producer's batches were not capped, so the broker
            // may have refused a whole batch of small records: no record can be blamed.
            Err(BatchFailure::Refused(_)) if self.topology.smallest_max_message_bytes.is_none() => {
                Err(BatchFailure::Retry(
                    "outputs refused as too large, and the topics' max.message.bytes could not \
                     be read at start (DescribeConfigs), so the record at fault is unknown; \
                     grant DescribeConfigs on the output topics or raise their limits"
                        .to_owned(),
                ))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fenced and authorisation errors stop the service whichever call reports them; a
    /// timed-out produce or flush retries the batch.
    #[test]
    fn fatal_and_fenced_errors_stop_and_transient_ones_retry() {
        let fenced = classify(
            "delivery",
            KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced),
            "group-a",
        );
        assert!(
            matches!(fenced, BatchFailure::Fatal(ServiceError::Fenced(ref id)) if id == "group-a"),
            "{fenced:?}"
        );
        let denied = classify(
            "produce",
            KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed),
            "group-a",
        );
        assert!(matches!(denied, BatchFailure::Fatal(_)), "{denied:?}");
        let timed_out = classify(
            "produce",
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            "group-a",
        );
        assert!(matches!(timed_out, BatchFailure::Retry(_)), "{timed_out:?}");
        let flush = classify(
            "commit_transaction",
            KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut),
            "group-a",
        );
        assert!(matches!(flush, BatchFailure::Retry(_)), "{flush:?}");
        assert!(is_fatal_consumer_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::GroupAuthorizationFailed
        )));
        assert!(!is_fatal_consumer_error(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
    }
}
