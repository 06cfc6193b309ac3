//! Rebuilds the local store from the changelog: from the store's checkpoint to the committed end
//! of each changelog partition, before the partition's input is processed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{ServiceError, clients, kafka_error};
use crate::config::{KafkaConfig, TopicRoute};
use crate::engine::Pipeline;
use crate::store::{Checkpoint, StateStore, StateWrite, changelog};

/// Changelog rows written to the store per SQL transaction during a restore.
const RESTORE_CHUNK: usize = 5_000;

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

    /// Restores the changelog partitions behind the given input partitions. Returns the
    /// number of changelog records applied.
    pub(super) fn restore(&self, inputs: &[(String, i32)]) -> Result<u64, ServiceError> {
        let mut targets: Vec<(&str, &str, i32)> = Vec::new();
        for (topic, partition) in inputs {
            for (pipeline, route, changelog) in &self.changelogs {
                if route.matches(topic) && !targets.contains(&(pipeline, changelog, *partition)) {
                    targets.push((pipeline, changelog, *partition));
                }
            }
        }
        let mut restored = 0;
        for (pipeline, changelog, partition) in targets {
            restored += self.restore_partition(pipeline, changelog, partition)?;
        }
        Ok(restored)
    }

    fn restore_partition(
        &self,
        pipeline: &str,
        topic: &str,
        partition: i32,
    ) -> Result<u64, ServiceError> {
        let started = Instant::now();
        let checkpoint = self
            .runtime
            .block_on(self.store.checkpoint(topic, partition))?;
        let consumer: BaseConsumer = clients::restore_consumer(&self.kafka)
            .create()
            .map_err(kafka_error("cannot create the changelog restore consumer"))?;
        let mut assignment = TopicPartitionList::new();
        let start = checkpoint.map_or(Offset::Beginning, |offset| Offset::Offset(offset + 1));
        assignment
            .add_partition_offset(topic, partition, start)
            .map_err(kafka_error(format!(
                "cannot assign `{topic}` partition {partition}"
            )))?;
        consumer.assign(&assignment).map_err(kafka_error(format!(
            "cannot assign `{topic}` partition {partition}"
        )))?;
        // An open transaction of a dead instance holds the committed end back until it
        // times out; allow for that, then give up loudly rather than run on partial state.
        let deadline = started + self.kafka.transaction_timeout * 3 + Duration::from_secs(60);
        let mut writes = Vec::new();
        let mut last_offset = checkpoint;
        let mut restored = 0u64;
        loop {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(message)) => {
                    let offset = message.offset();
                    let entity = message
                        .key()
                        .map(|key| String::from_utf8_lossy(key).into_owned())
                        .unwrap_or_default();
                    if let Some(value) = message.payload() {
                        let state =
                            changelog::decode(value).map_err(|error| ServiceError::Changelog {
                                topic: topic.to_owned(),
                                partition,
                                offset,
                                detail: error.to_string(),
                            })?;
                        writes.push(StateWrite {
                            pipeline: pipeline.to_owned(),
                            entity,
                            state,
                            partition,
                        });
                    }
                    last_offset = Some(offset);
                    restored += 1;
                    if writes.len() >= RESTORE_CHUNK {
                        self.save(std::mem::take(&mut writes), topic, partition, last_offset)?;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(error)) => {
                    tracing::warn!(%topic, partition, %error, "changelog restore: retrying after a consumer error");
                }
                None => {
                    if Instant::now() > deadline {
                        return Err(ServiceError::Topology(format!(
                            "restoring `{topic}` partition {partition} did not reach the committed \
                             end within {:?}; is a transaction stuck open?",
                            deadline - started
                        )));
                    }
                }
            }
        }
        self.save(writes, topic, partition, last_offset)?;
        tracing::info!(%topic, partition, restored, elapsed = ?started.elapsed(), "restored changelog partition");
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
