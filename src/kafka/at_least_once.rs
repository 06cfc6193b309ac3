//! The at-least-once commit protocol: outputs are produced and delivered, then the changelog
//! records, then the consumed offsets are committed. Outputs are always durable before the
//! state that says they were emitted, so a crash can repeat an event (same id), never lose one.

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{CommitMode, Consumer};

use super::commit::{BatchFailure, Committer, classify};
use super::produce::ChangelogRecord;
use crate::engine::OutputRecord;
use crate::store::{Checkpoint, StateStore};

impl<S: StateStore> Committer<'_, S> {
    /// Outputs delivered, then changelog records delivered, then offsets committed. Returns
    /// the changelog offsets written.
    pub(super) fn commit_at_least_once(
        &self,
        outputs: &[OutputRecord],
        changelog_records: &[ChangelogRecord<'_>],
        offsets: &TopicPartitionList,
    ) -> Result<Vec<Checkpoint>, BatchFailure> {
        let output_deliveries = self.send_all(outputs, &[])?;
        self.await_deliveries(output_deliveries)?;
        let changelog_deliveries = self.send_all(&[], changelog_records)?;
        let changelog = self.await_deliveries(changelog_deliveries)?;
        let started = std::time::Instant::now();
        let committed = self.consumer.commit(offsets, CommitMode::Sync);
        self.options
            .metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match committed {
            Ok(()) => Ok(changelog),
            Err(error) => match classify("commit offsets", error, self.transactional_id) {
                BatchFailure::Retry(reason) => {
                    Err(BatchFailure::OffsetsUncommitted { reason, changelog })
                }
                other => Err(other),
            },
        }
    }
}
