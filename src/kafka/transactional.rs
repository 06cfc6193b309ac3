//! The exactly-once commit protocol: one Kafka transaction per batch holds the outputs (events,
//! DLQ and audit records), the changelog records and the consumed offsets, sent with the
//! consumer's fresh group metadata (KIP-447: a zombie's commit is fenced).
//!
//! Failure handling follows librdkafka's classes: retriable calls are called again, abortable
//! ones abort and rewind, fatal ones (a fenced producer above all) stop the service.

use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer as _;

use super::commit::{BatchFailure, Committer, classify};
use super::error::ServiceError;
use super::produce::ChangelogRecord;
use crate::engine::OutputRecord;
use crate::runtime::{Attempt, RetryError, RetryLimit, RetryPolicy, Shutdown, retry};
use crate::store::{Checkpoint, StateStore};

/// `commit_transaction` after a retriable error (a timed-out commit may be called again,
/// librdkafka 2.0 and later; an abort while a commit is still in progress would fail).
const COMMIT_RETRIES: RetryPolicy = RetryPolicy::new(
    Duration::from_millis(50),
    Duration::from_secs(1),
    RetryLimit::Attempts(3),
)
.counted_as("commit_transaction");

impl<S: StateStore> Committer<'_, S> {
    /// One transaction: outputs, changelog records, consumed offsets. Returns the changelog
    /// offsets written.
    pub(super) fn commit_transactionally(
        &self,
        outputs: &[OutputRecord],
        changelog_records: &[ChangelogRecord<'_>],
        offsets: &TopicPartitionList,
    ) -> Result<Vec<Checkpoint>, BatchFailure> {
        let id = self.transactional_id;
        self.producer
            .begin_transaction()
            .map_err(|error| classify("begin_transaction", error, id))?;
        let mut in_flight = None;
        let committed = self
            .send_all(outputs, changelog_records)
            .and_then(|deliveries| {
                let deliveries = in_flight.insert(deliveries);
                if !deliveries.refused.is_empty() {
                    return Err(BatchFailure::Retry(
                        "the producer refused an output as too large".to_owned(),
                    ));
                }
                let metadata = self
                    .consumer
                    .group_metadata()
                    .ok_or(BatchFailure::Fatal(ServiceError::NoGroupMetadata))?;
                self.producer
                    .send_offsets_to_transaction(
                        offsets,
                        &metadata,
                        self.options.kafka.transaction_timeout,
                    )
                    .map_err(|error| classify("send_offsets_to_transaction", error, id))?;
                // Every report is awaited here, not by commit_transaction: rust-rdkafka's
                // commit first flushes by polling in 100 ms steps that never end early, which
                // cost a whole step per batch (about 95 ms of every 10,000-record batch in the
                // Kafka bench).
                self.await_until_failure(deliveries)?;
                self.await_drained()?;
                let started = Instant::now();
                self.commit_with_retries()?;
                let metrics = &self.options.metrics;
                metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.transactions.with_label_values(&["committed"]).inc();
                Ok(())
            });
        match committed {
            Ok(()) => self.delivered(in_flight.unwrap_or_default()),
            Err(BatchFailure::Retry(reason)) => {
                self.abort()?;
                self.options
                    .metrics
                    .transactions
                    .with_label_values(&["aborted"])
                    .inc();
                // After the abort every delivery has its report: refusals among them say
                // which records go to the DLQ on the next attempt.
                match in_flight.map(|mut deliveries| {
                    self.await_all(&mut deliveries);
                    self.delivered(deliveries)
                }) {
                    Some(Err(BatchFailure::Refused(refused))) => {
                        Err(BatchFailure::Refused(refused))
                    }
                    Some(Err(fatal @ BatchFailure::Fatal(_))) => Err(fatal),
                    _ => Err(BatchFailure::Retry(reason)),
                }
            }
            Err(other) => Err(other),
        }
    }

    /// Aborts the open transaction, calling again while librdkafka says the call may be
    /// retried (a broker being unreachable for a while); anything else is fatal
    /// (librdkafka 4849, 3003: an abort can itself fail fatally).
    fn abort(&self) -> Result<(), BatchFailure> {
        let timeout = self.options.kafka.transaction_timeout;
        let policy = RetryPolicy::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
            RetryLimit::Within(timeout * 6),
        )
        .counted_as("abort_transaction");
        // The abort must not be cut short by shutdown: an open transaction blocks readers.
        retry("abort_transaction", policy, &Shutdown::new(), || {
            self.producer
                .abort_transaction(timeout * 2)
                .map_err(|error| match &error {
                    KafkaError::Transaction(rd_error)
                        if rd_error.is_retriable() && !rd_error.is_fatal() =>
                    {
                        Attempt::Transient(error)
                    }
                    _ => Attempt::Permanent(error),
                })
        })
        .map_err(|failure| match failure {
            RetryError::Failed { error, .. } => {
                match classify("abort_transaction", error, self.transactional_id) {
                    BatchFailure::Fatal(fatal) => BatchFailure::Fatal(fatal),
                    other => BatchFailure::Fatal(ServiceError::AbortFailed {
                        reason: format!("{other:?}"),
                    }),
                }
            }
            RetryError::Stopped => BatchFailure::Fatal(ServiceError::Interrupted),
        })
    }

    /// Waits until librdkafka has released every delivered message, so that the flush at the
    /// start of commit_transaction finds nothing outstanding.
    fn await_drained(&self) -> Result<(), BatchFailure> {
        let deadline = Instant::now() + self.options.kafka.transaction_timeout;
        while self.producer.in_flight_count() > 0 {
            if Instant::now() >= deadline {
                return Err(BatchFailure::Retry(
                    "the producer still held delivered messages at the transaction timeout"
                        .to_owned(),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// `commit_transaction`, called again after a retriable error.
    fn commit_with_retries(&self) -> Result<(), BatchFailure> {
        let timeout = self.options.kafka.transaction_timeout * 2;
        retry(
            "commit_transaction",
            COMMIT_RETRIES,
            &Shutdown::new(),
            || {
                self.producer.commit_transaction(timeout).map_err(|error| {
                    let retriable = match &error {
                        KafkaError::Transaction(rd_error) => {
                            rd_error.is_retriable() && !rd_error.txn_requires_abort()
                        }
                        KafkaError::Flush(_) => true,
                        _ => false,
                    };
                    if retriable {
                        Attempt::Transient(error)
                    } else {
                        Attempt::Permanent(error)
                    }
                })
            },
        )
        .map_err(|failure| match failure {
            RetryError::Failed { error, .. } => {
                classify("commit_transaction", error, self.transactional_id)
            }
            RetryError::Stopped => BatchFailure::Fatal(ServiceError::Interrupted),
        })
    }
}
