//! Rebuilds the local store from the changelog: from the store's checkpoint to the committed end
//! of each changelog partition, before the partition's input is processed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{ServiceError, clients, kafka_error};
use crate::config::{KafkaConfig, TopicRoute};
use crate::engine::Pipeline;
use crate::store::{Checkpoint, StateStore, StateWrite, changelog};

/// Changelog rows written to the store per SQL transaction during a restore.
const RESTORE_CHUNK: usize = 5_000;

/// The restore of one changelog partition under way.
struct Progress {
    pipeline: String,
    writes: Vec<StateWrite>,
    last_offset: Option<i64>,
    done: bool,
}

/// Whether the consumer has read `topic`/`partition` up to the last stable offset.
fn at_end<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, partition: i32) -> bool {
    let Ok((_, high)) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) else {
        return false;
    };
    if high == 0 {
        return true;
    }
    let Ok(positions) = consumer.position() else {
        return false;
    };
    positions
        .find_partition(topic, partition)
        .is_some_and(|element| matches!(element.offset(), Offset::Offset(next) if next >= high))
}

/// A client context that does not log end-of-partition as an error: for the restore
/// consumer it is the expected signal.
struct QuietEof;

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

/// Restores changelog partitions into a store.
#[derive(Debug)]
pub(super) struct ChangelogRestorer<S> {
    pub(super) kafka: KafkaConfig,
    /// (pipeline name, route, changelog topic) per pipeline.
    pub(super) changelogs: Vec<(String, TopicRoute, String)>,
    pub(super) store: Arc<S>,
    pub(super) runtime: tokio::runtime::Handle,
}

impl<S: StateStore> ChangelogRestorer<S> {
    pub(super) fn new(
        kafka: &KafkaConfig,
        pipelines: &[(TopicRoute, Pipeline)],
        changelogs: &[String],
        store: Arc<S>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        ChangelogRestorer {
            kafka: kafka.clone(),
            changelogs: pipelines
                .iter()
                .zip(changelogs)
                .map(|((route, pipeline), topic)| {
                    (pipeline.name().to_owned(), route.clone(), topic.clone())
                })
                .collect(),
            store,
            runtime,
        }
    }

    /// Restores the changelog partitions behind the given input partitions, all at once with
    /// one consumer. Returns the number of changelog records applied.
    pub(super) fn restore(&self, inputs: &[(String, i32)]) -> Result<u64, ServiceError> {
        let mut targets: Vec<(&str, &str, i32)> = Vec::new();
        for (topic, partition) in inputs {
            for (pipeline, route, changelog) in &self.changelogs {
                if route.matches(topic) && !targets.contains(&(pipeline, changelog, *partition)) {
                    targets.push((pipeline, changelog, *partition));
                }
            }
        }
        if targets.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let consumer: BaseConsumer<QuietEof> = clients::restore_consumer(&self.kafka)
            .create_with_context(QuietEof)
            .map_err(kafka_error("cannot create the changelog restore consumer"))?;
        let mut assignment = TopicPartitionList::new();
        let mut progress: HashMap<(String, i32), Progress> = HashMap::new();
        for (pipeline, topic, partition) in &targets {
            let checkpoint = self
                .runtime
                .block_on(self.store.checkpoint(topic, *partition))?;
            let start = checkpoint.map_or(Offset::Beginning, |offset| Offset::Offset(offset + 1));
            assignment
                .add_partition_offset(topic, *partition, start)
                .map_err(kafka_error(format!(
                    "cannot assign `{topic}` partition {partition}"
                )))?;
            progress.insert(
                ((*topic).to_owned(), *partition),
                Progress {
                    pipeline: (*pipeline).to_owned(),
                    writes: Vec::new(),
                    last_offset: checkpoint,
                    done: false,
                },
            );
        }
        consumer
            .assign(&assignment)
            .map_err(kafka_error("cannot assign the changelog partitions"))?;
        // An open transaction of a dead instance holds the committed end back until it
        // times out; allow for that, then give up loudly rather than run on partial state.
        let deadline = started + self.kafka.transaction_timeout * 3 + Duration::from_secs(60);
        let mut restored = 0u64;
        while progress.values().any(|entry| !entry.done) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let (topic, partition, offset) = (
                        message.topic().to_owned(),
                        message.partition(),
                        message.offset(),
                    );
                    let Some(entry) = progress.get_mut(&(topic.clone(), partition)) else {
                        continue;
                    };
                    if let Some(value) = message.payload() {
                        let state =
                            changelog::decode(value).map_err(|error| ServiceError::Changelog {
                                topic: topic.clone(),
                                partition,
                                offset,
                                detail: error.to_string(),
                            })?;
                        let entity = message
                            .key()
                            .map(|key| String::from_utf8_lossy(key).into_owned())
                            .unwrap_or_default();
                        entry.writes.push(StateWrite {
                            pipeline: entry.pipeline.clone(),
                            entity,
                            state,
                            partition,
                        });
                    }
                    entry.last_offset = Some(offset);
                    restored += 1;
                    if entry.writes.len() >= RESTORE_CHUNK {
                        let writes = std::mem::take(&mut entry.writes);
                        self.save(writes, &topic, partition, entry.last_offset)?;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    // The EOF error names only the partition: mark every target with it whose
                    // consumer position has reached the end.
                    for ((topic, target_partition), entry) in progress.iter_mut() {
                        if *target_partition == partition
                            && !entry.done
                            && at_end(&consumer, topic, partition)
                        {
                            entry.done = true;
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "changelog restore: retrying after a consumer error");
                }
                None => {
                    for ((topic, partition), entry) in progress.iter_mut() {
                        if !entry.done && at_end(&consumer, topic, *partition) {
                            entry.done = true;
                        }
                    }
                    if Instant::now() > deadline {
                        return Err(ServiceError::Topology(format!(
                            "restoring the changelog did not reach its committed end within \
                             {:?}; is a transaction stuck open?",
                            deadline - started
                        )));
                    }
                }
            }
        }
        for ((topic, partition), entry) in progress {
            self.save(entry.writes, &topic, partition, entry.last_offset)?;
        }
        tracing::info!(partitions = targets.len(), restored, elapsed = ?started.elapsed(), "restored changelog");
        Ok(restored)
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
