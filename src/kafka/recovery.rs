//! What the consume loop does when a batch does not commit, and when partitions are taken
//! away: drop the staged state, learn which outputs the broker refused, rewind to the
//! committed offsets, or stop.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;

use super::commit::BatchFailure;
use super::consume::{BATCH_RETRY, MAX_BATCH_ATTEMPTS, Worker};
use super::error::{ServiceError, kafka_error};
use super::produce::RefusedOutput;
use super::rebalance::{committed_positions, first_partition_error, lock};
use super::report::TopicPartition;
use crate::cdc::RawRecord;
use crate::engine::{OutputKind, RecordFailure, Stage};
use crate::runtime::{
    Attempt, BatchOutcome, OutputOrigin, Refusal, RetryError, RetryLimit, RetryPolicy, retry,
};
use crate::store::StateStore;

impl<S: StateStore> Worker<'_, S> {
    /// Drops what the batch held of revoked partitions; what was committed goes to the store,
    /// so a later reassignment restores on top of it; cached state of partitions another
    /// instance may now change is dropped.
    pub(super) fn partitions_revoked(
        &mut self,
        records: &mut Vec<RawRecord>,
        revoked: &[TopicPartition],
    ) -> Result<(), ServiceError> {
        let is_revoked = |topic: &str, partition: i32| {
            revoked
                .iter()
                .any(|tp| tp.topic == topic && tp.partition == partition)
        };
        records.retain(|record| !is_revoked(&record.topic, record.partition));
        self.refusals
            .retain(|(_, origin), _| !is_revoked(&origin.topic, origin.partition));
        lock(&self.write_behind).flush()?;
        self.lanes.clear();
        // A batch being retried may have belonged to them; the next one tells.
        self.options.health.set_failing(false);
        self.attempts = 0;
        self.failures = 0;
        // Revoked and assigned back within one poll: the assignment positioned the partition
        // at its committed offset, but the poll may already have handed out (and the batch
        // just dropped) records from there. Position it again so none is skipped.
        let assignment = self
            .consumer
            .assignment()
            .map_err(kafka_error("cannot read the assignment"))?;
        let mut returned = TopicPartitionList::new();
        for element in assignment.elements() {
            if is_revoked(element.topic(), element.partition()) {
                returned.add_partition(element.topic(), element.partition());
            }
        }
        if returned.count() > 0 {
            tracing::info!(
                partitions = returned.count(),
                "partitions came back in the same poll; repositioning them"
            );
            self.seek_committed(&returned)?;
        }
        Ok(())
    }

    /// Rewinds after a failed batch, or stops for a fatal failure or too many attempts.
    pub(super) fn recover(&mut self, failure: BatchFailure) -> Result<(), ServiceError> {
        match failure {
            BatchFailure::Fatal(error) => Err(error),
            // Each refusal sends one more record (or a smaller DLQ record) to the DLQ, so
            // these retries end; they do not count against the attempts.
            BatchFailure::Refused(refused) => {
                self.reporter.batch_refused(refused.len());
                self.rewind()
            }
            BatchFailure::Retry(reason) | BatchFailure::OffsetsUncommitted { reason, .. } => {
                let counted = self.options.health.brokers_reachable();
                if counted {
                    self.attempts += 1;
                }
                self.failures += 1;
                self.reporter.batch_retried(&reason, self.failures, counted);
                if self.attempts >= MAX_BATCH_ATTEMPTS {
                    return Err(ServiceError::BatchKeepsFailing {
                        attempts: self.attempts,
                        reason,
                    });
                }
                self.rewind()?;
                let wait = BATCH_RETRY.delay(self.failures - 1, &mut self.jitter);
                // A stop request ends the wait; the loop then stops with nothing committed.
                let _ = self.shutdown.sleep(wait);
                Ok(())
            }
        }
    }

    /// Remembers which records' outputs were refused, so the next attempt sends them to the
    /// DLQ; a DLQ record refused once is sent again without the original key and value, and
    /// refused again it stops the service (the DLQ topic cannot take even the headers).
    pub(super) fn learn_refusals(
        &mut self,
        outcome: &BatchOutcome,
        refused: &[RefusedOutput],
    ) -> Result<(), ServiceError> {
        for RefusedOutput { index, error } in refused {
            let (Some(output), Some(OutputOrigin { pipeline, origin })) = (
                outcome.outputs.get(*index),
                outcome.output_origins.get(*index),
            ) else {
                // Refused retries do not count against the attempts: never loop on one that
                // cannot be attributed.
                return Err(ServiceError::UnattributableRefusal { index: *index });
            };
            let topic = &output.topic;
            let size = output.size();
            let refusal = self
                .refusals
                .entry((*pipeline, origin.clone()))
                .or_insert(Refusal {
                    failure: None,
                    strip_dead_letter: false,
                });
            match output.kind {
                OutputKind::DeadLetter => {
                    if refusal.strip_dead_letter {
                        return Err(ServiceError::DeadLetterRefused {
                            topic: topic.clone(),
                            origin: origin.clone(),
                            size,
                            code: *error,
                        });
                    }
                    refusal.strip_dead_letter = true;
                }
                OutputKind::Event | OutputKind::Audit => {
                    tracing::warn!(%origin, %topic, size, %error, "output refused as too large; the record goes to the DLQ");
                    refusal.failure.get_or_insert_with(|| RecordFailure {
                        stage: Stage::Output,
                        reason: "output_refused",
                        message: format!(
                            "`{topic}` refused this record's {} ({size} bytes): {error}; \
                             raise max.message.bytes on `{topic}` (and the producer's \
                             message.max.bytes) or set limits.max_output_bytes below them",
                            output.kind.as_str()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Positions every assigned partition at its committed offset, after dropping the staged
    /// state. While no broker is reachable the rewind is retried, not fatal: an outage is
    /// waited out with readiness false.
    pub(super) fn rewind(&mut self) -> Result<(), ServiceError> {
        lock(&self.write_behind).flush()?;
        self.lanes.clear();
        let health = Arc::clone(&self.options.health);
        let policy = RetryPolicy::new(
            Duration::from_millis(500),
            Duration::from_secs(10),
            RetryLimit::Forever,
        )
        .counted_as("rewind");
        let rewound = retry(
            "rewinding to the committed offsets",
            policy,
            self.shutdown,
            || {
                // Waiting out an outage is progress, not a stuck loop.
                health.beat();
                let assignment = self
                    .consumer
                    .assignment()
                    .map_err(kafka_error("cannot read the assignment"))
                    .map_err(Attempt::Permanent)?;
                self.seek_committed(&assignment).map_err(|error| {
                    if health.brokers_reachable() {
                        Attempt::Permanent(error)
                    } else {
                        Attempt::Transient(error)
                    }
                })
            },
        );
        match rewound {
            Ok(()) => Ok(()),
            // Nothing of the failed batch was committed; the loop stops next.
            Err(RetryError::Stopped) => Ok(()),
            // A rewind that does not land would let the next commit skip the aborted batch:
            // fatal, and a restart resumes from the committed offsets.
            Err(RetryError::Failed { error, .. }) => Err(error),
        }
    }

    /// Positions `partitions` at their (stable) committed offsets.
    fn seek_committed(&self, partitions: &TopicPartitionList) -> Result<(), ServiceError> {
        if partitions.count() == 0 {
            return Ok(());
        }
        let positioned = committed_positions(
            self.consumer,
            partitions,
            self.options.kafka.transaction_timeout * 3,
            self.shutdown,
        )?;
        let sought = self
            .consumer
            .seek_partitions(positioned, Duration::from_secs(10))
            .map_err(kafka_error("cannot rewind to the committed offsets"))?;
        first_partition_error(&sought, "cannot rewind to the committed offset")
    }
}
