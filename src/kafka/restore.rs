//! Rebuilds the local store from the changelog: from the store's checkpoint to the committed end
//! of each changelog partition, before the partition's input is processed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::{BTreeMap, HashMap};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::clients;
use super::error::{ServiceError, kafka_error};
use super::report::{Reporter, TopicPartition};
use crate::config::{KafkaConfig, TopicRoute};
use crate::engine::Pipeline;
use crate::store::{Checkpoint, StateStore, StateWrite, changelog};

/// Changelog rows written to the store per SQL transaction during a restore.
const RESTORE_CHUNK: usize = 5_000;

/// The restore of one changelog partition under way.
struct Progress {
    writes: Vec<StateWrite>,
    last_offset: Option<i64>,
    /// The offset after the last record read (or the start): the end check when idle.
    next_offset: i64,
    done: bool,
}

/// A client context that does not log end-of-partition as an error: for the restore
/// consumer it is the expected signal.
pub(super) struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !end_of_partition {
            tracing::error!(%error, reason, "changelog restore consumer error");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// A pipeline's changelog topic and the input topics whose state it holds.
#[derive(Debug)]
pub(super) struct PipelineChangelog {
    pub pipeline: String,
    pub route: TopicRoute,
    pub topic: String,
}

/// Restores changelog partitions into a store.
#[derive(Debug)]
pub(super) struct ChangelogRestorer<S> {
    pub(super) kafka: KafkaConfig,
    /// Per pipeline: its changelog and the inputs it backs.
    pub(super) changelogs: Vec<PipelineChangelog>,
    pub(super) store: Arc<S>,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) reporter: Reporter,
}

impl<S: StateStore> ChangelogRestorer<S> {
    pub(super) fn new(
        kafka: &KafkaConfig,
        pipelines: &[(TopicRoute, Pipeline)],
        changelogs: &[String],
        store: Arc<S>,
        runtime: tokio::runtime::Handle,
        reporter: Reporter,
    ) -> Self {
        ChangelogRestorer {
            kafka: kafka.clone(),
            changelogs: pipelines
                .iter()
                .zip(changelogs)
                .map(|((route, pipeline), topic)| PipelineChangelog {
                    pipeline: pipeline.name().to_owned(),
                    route: route.clone(),
                    topic: topic.clone(),
                })
                .collect(),
            store,
            runtime,
            reporter,
        }
    }

    /// Restores the changelog partitions behind the given input partitions: one consumer per
    /// changelog topic, all its partitions at once. Returns the number of records applied.
    pub(super) fn restore(&self, inputs: &[TopicPartition]) -> Result<u64, ServiceError> {
        let mut per_topic: BTreeMap<&str, (&str, Vec<i32>)> = BTreeMap::new();
        for TopicPartition { topic, partition } in inputs {
            for PipelineChangelog {
                pipeline,
                route,
                topic: changelog,
            } in &self.changelogs
            {
                if route.matches(topic) {
                    let (_, partitions) =
                        per_topic.entry(changelog).or_insert((pipeline, Vec::new()));
                    if !partitions.contains(partition) {
                        partitions.push(*partition);
                    }
                }
            }
        }
        let started = Instant::now();
        let mut restored = 0;
        for (topic, (pipeline, partitions)) in &per_topic {
            restored += self.restore_topic(pipeline, topic, partitions)?;
        }
        if !per_topic.is_empty() {
            self.reporter
                .metrics
                .restore_seconds
                .inc_by(started.elapsed().as_secs_f64());
            tracing::info!(topics = per_topic.len(), restored, elapsed = ?started.elapsed(), "restored changelog");
        }
        Ok(restored)
    }

    fn restore_topic(
        &self,
        pipeline: &str,
        topic: &str,
        partitions: &[i32],
    ) -> Result<u64, ServiceError> {
        let started = Instant::now();
        let consumer: BaseConsumer<QuietEof> = clients::restore_consumer(&self.kafka)
            .create_with_context(QuietEof)
            .map_err(kafka_error("cannot create the changelog restore consumer"))?;
        let mut assignment = TopicPartitionList::new();
        let mut progress: HashMap<i32, Progress> = HashMap::new();
        for &partition in partitions {
            let checkpoint = self.checkpoint_within_changelog(&consumer, topic, partition)?;
            let start = checkpoint.map_or(Offset::Beginning, |offset| Offset::Offset(offset + 1));
            assignment
                .add_partition_offset(topic, partition, start)
                .map_err(kafka_error(format!(
                    "cannot assign `{topic}` partition {partition}"
                )))?;
            progress.insert(
                partition,
                Progress {
                    writes: Vec::new(),
                    last_offset: checkpoint,
                    next_offset: checkpoint.map_or(0, |offset| offset + 1),
                    done: false,
                },
            );
        }
        consumer.assign(&assignment).map_err(kafka_error(format!(
            "cannot assign the partitions of `{topic}`"
        )))?;
        let metrics = &self.reporter.metrics;
        let restored_records = metrics.restore_records.with_label_values(&[pipeline]);
        let remaining = metrics.restore_remaining.with_label_values(&[pipeline]);
        remaining.add(self.records_to_restore(&consumer, topic, &progress));
        // An open transaction of a dead instance holds the committed end back until it
        // times out; allow for that, then give up loudly rather than run on partial state.
        let deadline = started + self.kafka.transaction_timeout * 3 + Duration::from_secs(60);
        let mut restored = 0u64;
        while progress.values().any(|entry| !entry.done) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let (partition, offset) = (message.partition(), message.offset());
                    let Some(entry) = progress.get_mut(&partition) else {
                        continue;
                    };
                    if let Some(value) = message.payload() {
                        let state =
                            changelog::decode(value).map_err(|error| ServiceError::Changelog {
                                topic: topic.to_owned(),
                                partition,
                                offset,
                                detail: error.to_string(),
                            })?;
                        let entity = message
                            .key()
                            .map(|key| String::from_utf8_lossy(key).into_owned())
                            .unwrap_or_default();
                        entry.writes.push(StateWrite {
                            pipeline: pipeline.to_owned(),
                            entity,
                            state,
                            partition,
                        });
                    }
                    entry.last_offset = Some(offset);
                    entry.next_offset = offset + 1;
                    restored += 1;
                    restored_records.inc();
                    if remaining.get() > 0 {
                        remaining.dec();
                    }
                    if restored.is_multiple_of(10_000) {
                        // A long restore runs inside one poll: it is the loop's progress.
                        self.reporter.health.beat();
                    }
                    if entry.writes.len() >= RESTORE_CHUNK {
                        let writes = std::mem::take(&mut entry.writes);
                        self.save(writes, topic, partition, entry.last_offset)?;
                    }
                }
                // With read_committed the end of a partition is its last stable offset.
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    if let Some(entry) = progress.get_mut(&partition) {
                        entry.done = true;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%topic, %error, "changelog restore: retrying after a consumer error");
                }
                None => {
                    for (partition, entry) in progress.iter_mut().filter(|(_, e)| !e.done) {
                        if let Ok((_, high)) =
                            consumer.fetch_watermarks(topic, *partition, Duration::from_secs(5))
                            && entry.next_offset >= high
                        {
                            entry.done = true;
                        }
                    }
                    if Instant::now() > deadline {
                        return Err(ServiceError::RestoreTimedOut {
                            topic: topic.to_owned(),
                            waited: deadline - started,
                        });
                    }
                }
            }
        }
        for (partition, entry) in progress {
            self.save(entry.writes, topic, partition, entry.last_offset)?;
        }
        // What the estimate counted but the changelog did not hold (aborted transactions'
        // records and markers) is not left behind as remaining.
        remaining.set(0);
        Ok(restored)
    }

    /// Records between each partition's start and its end: what the restore will read, at
    /// most (transaction markers count too).
    fn records_to_restore(
        &self,
        consumer: &BaseConsumer<QuietEof>,
        topic: &str,
        progress: &HashMap<i32, Progress>,
    ) -> i64 {
        progress
            .iter()
            .filter_map(|(partition, entry)| {
                let (low, high) = consumer
                    .fetch_watermarks(topic, *partition, Duration::from_secs(5))
                    .ok()?;
                Some((high - entry.next_offset.max(low)).max(0))
            })
            .sum()
    }

    /// The store's checkpoint of a changelog partition, if the changelog still reaches it. A
    /// changelog that ends below the checkpoint was deleted and recreated (or truncated): the
    /// checkpoint belongs to its earlier life, and trusting it would mark the partition
    /// restored without reading what the new changelog holds (states another instance wrote
    /// since). Then the checkpoint is dropped and the partition is read from its start; the
    /// store keeps what it has, and a restored state replaces a stored one only if newer.
    fn checkpoint_within_changelog(
        &self,
        consumer: &BaseConsumer<QuietEof>,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, ServiceError> {
        let Some(checkpoint) = self
            .runtime
            .block_on(self.store.checkpoint(topic, partition))?
        else {
            return Ok(None);
        };
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(30))
            .map_err(kafka_error(format!(
                "cannot read the end of changelog `{topic}` partition {partition}"
            )))?;
        if checkpoint < high {
            if checkpoint + 1 < low {
                tracing::warn!(
                    %topic, partition, checkpoint, first_offset = low,
                    "the changelog no longer holds the records after this store's checkpoint \
                     (retention deleted them?): states written in between are missing; use a \
                     compacted changelog (cleanup.policy=compact) without time retention"
                );
            }
            return Ok(Some(checkpoint));
        }
        tracing::warn!(
            %topic, partition, checkpoint, changelog_end = high,
            "the changelog ends below this store's checkpoint: it was recreated or truncated; \
             re-reading it from the start"
        );
        self.runtime
            .block_on(self.store.reset_checkpoint(topic, partition, None))?;
        Ok(None)
    }

    fn save(
        &self,
        writes: Vec<StateWrite>,
        topic: &str,
        partition: i32,
        last_offset: Option<i64>,
    ) -> Result<(), ServiceError> {
        let checkpoints = last_offset
            .map(|offset| Checkpoint {
                topic: topic.to_owned(),
                partition,
                offset,
            })
            .into_iter()
            .collect();
        Ok(self
            .runtime
            .block_on(self.store.save(writes, checkpoints))?)
    }
}
