//! Partition assignment: the consumer context whose rebalance callback takes partitions over
//! (stable committed offsets, then their state from the changelog, then the explicit
//! position) and tells the consume loop what was revoked.
//!
//! The callback runs inside `poll` on the service thread (rust-rdkafka 738), so it may block,
//! and it shares the write-behind state with the loop through a mutex nobody else holds.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::error::{ServiceError, kafka_error};
use super::report::{ClientReports, Reporter, TopicPartition};
use super::restore::ChangelogRestorer;
use crate::runtime::{Attempt, RetryError, RetryLimit, RetryPolicy, Shutdown, retry};
use crate::store::{StateStore, WriteBehind};

/// What the rebalance callback tells the consume loop.
#[derive(Debug)]
pub(super) enum AssignmentEvent {
    Revoked(Vec<TopicPartition>),
    Failed(ServiceError),
}

/// Committed state not yet in the store, shared by the consume loop and the callback.
pub(super) type SharedWriteBehind<S> = Arc<Mutex<WriteBehind<S>>>;

/// Locks the write-behind state. Only the service thread locks it, so a poisoned lock means a
/// panic on that thread, which already stops the service; the guard is recovered to flush.
pub(super) fn lock<S>(shared: &SharedWriteBehind<S>) -> std::sync::MutexGuard<'_, WriteBehind<S>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) struct RebalanceContext<S> {
    pub restorer: ChangelogRestorer<S>,
    pub reporter: Reporter,
    pub reports: ClientReports,
    pub write_behind: SharedWriteBehind<S>,
    pub events: Mutex<Vec<AssignmentEvent>>,
    /// How long to wait for committed offsets to become stable.
    pub patience: Duration,
    pub shutdown: Shutdown,
}

impl<S> RebalanceContext<S> {
    fn push(&self, event: AssignmentEvent) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }

    /// The events since the last call.
    pub(super) fn take(&self) -> Vec<AssignmentEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl<S: StateStore> RebalanceContext<S> {
    /// Takes over assigned partitions: unsaved state to the store, stable offsets, then their
    /// state, then the assignment.
    fn assign(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: &TopicPartitionList,
        list: &[TopicPartition],
        cooperative: bool,
    ) -> Result<(), ServiceError> {
        // A partition revoked and given back within one poll still has committed states only
        // in memory: they go to the store first, or they would land after (and, without the
        // store's version check, over) the newer states the restore brings.
        lock(&self.write_behind).flush()?;
        // Stable committed offsets first: they wait for a transaction the partitions' previous
        // owner still has open (a zombie may yet commit it), and only once it is resolved does
        // the changelog hold every state those offsets stand for.
        let positioned = committed_positions(consumer, partitions, self.patience, &self.shutdown)?;
        self.reporter.offsets_committed(&positioned);
        self.restorer.restore(list)?;
        let result = if cooperative {
            consumer.incremental_assign(&positioned)
        } else {
            consumer.assign(&positioned)
        };
        result.map_err(kafka_error(format!("cannot assign {list:?}")))
    }
}

impl<S: StateStore> ClientContext for RebalanceContext<S> {
    fn error(&self, error: KafkaError, reason: &str) {
        self.reports.error(error, reason);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        self.reports.stats_raw(statistics);
    }
}

impl<S: StateStore> ConsumerContext for RebalanceContext<S> {
    /// Assign: take the partitions over (see [`RebalanceContext::assign`]), positioning each
    /// at its committed offset explicitly (prefetched records of an earlier assignment must
    /// not be handed out again). Revoke: tell the loop, which drops what it holds of them.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        error: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let list = partition_list(partitions);
        let health = &self.reporter.health;
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.reporter.partitions_assigned(&list);
                health.set_restoring(true);
                let assigned = self.assign(consumer, partitions, &list, cooperative);
                health.set_restoring(false);
                match assigned {
                    Ok(()) => health.set_joined(true),
                    // Shutdown came first: the partitions stay unassigned and the loop stops.
                    Err(ServiceError::Interrupted) => {}
                    Err(failure) => self.push(AssignmentEvent::Failed(failure)),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.reporter
                    .partitions_revoked(&list, consumer.assignment_lost());
                self.push(AssignmentEvent::Revoked(list));
                let result = if cooperative {
                    consumer.incremental_unassign(partitions)
                } else {
                    consumer.unassign()
                };
                if let Err(failure) = result {
                    tracing::warn!(%failure, "unassign failed");
                }
            }
            other => {
                self.reporter.rebalance_error(&format!("{other:?}"), &list);
                let _ = consumer.unassign();
                self.push(AssignmentEvent::Revoked(list));
            }
        }
    }
}

fn partition_list(partitions: &TopicPartitionList) -> Vec<TopicPartition> {
    partitions
        .elements()
        .iter()
        .map(|element| TopicPartition {
            topic: element.topic().to_owned(),
            partition: element.partition(),
        })
        .collect()
}

/// How often stable committed offsets are asked for again.
const STABLE_OFFSETS_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(2));

/// The partitions with their committed offsets (or the beginning for a new group).
pub(super) fn committed_positions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &TopicPartitionList,
    patience: Duration,
    shutdown: &Shutdown,
) -> Result<TopicPartitionList, ServiceError> {
    // Offsets committed by a transaction still open (a dead or stopped instance's) are
    // unstable: the broker withholds them until that transaction ends, at the latest after
    // transaction.timeout.ms. Retry until then rather than give up or guess.
    let policy = RetryPolicy::new(
        STABLE_OFFSETS_BACKOFF.0,
        STABLE_OFFSETS_BACKOFF.1,
        RetryLimit::Within(patience),
    )
    .counted_as("committed_offsets");
    let committed = retry(
        "reading stable committed offsets (an open transaction?)",
        policy,
        shutdown,
        || {
            let committed = consumer
                .committed_offsets(partitions.clone(), Duration::from_secs(10))
                .map_err(|source| {
                    Attempt::Transient(ServiceError::Kafka {
                        context: "cannot read the committed offsets".to_owned(),
                        source,
                    })
                })?;
            first_partition_error(&committed, "cannot read the committed offset")
                .map_err(Attempt::Transient)?;
            Ok(committed)
        },
    )
    .map_err(|failure| match failure {
        RetryError::Failed { error, .. } => error,
        RetryError::Stopped => ServiceError::Interrupted,
    })?;
    let mut positioned = TopicPartitionList::new();
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(offset) if offset >= 0 => Offset::Offset(offset),
            _ => Offset::Beginning,
        };
        positioned
            .add_partition_offset(element.topic(), element.partition(), offset)
            .map_err(kafka_error("cannot build the assignment"))?;
    }
    Ok(positioned)
}

/// The first per-partition error of a partition list, as ``<what>: `topic` partition p``.
pub(super) fn first_partition_error(
    list: &TopicPartitionList,
    what: &str,
) -> Result<(), ServiceError> {
    for element in list.elements() {
        if let Err(error) = element.error() {
            return Err(ServiceError::Kafka {
                context: format!(
                    "{what}: `{}` partition {}",
                    element.topic(),
                    element.partition()
                ),
                source: error,
            });
        }
    }
    Ok(())
}
