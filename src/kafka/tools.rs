//! The Kafka side of the operator's commands (`cdcflow dlq`, `cdcflow state get
//! --from-changelog`): read topics from their start to the end they had when the command
//! began, and write records back into input partitions. Blocking calls: run them on a thread
//! of their own (or from a command that has nothing else to do).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use super::clients;
use super::error::{ServiceError, kafka_error};
use super::records::raw_record;
use super::restore::QuietEof;
use crate::cdc::RawRecord;
use crate::config::KafkaConfig;
use crate::ops::Reinjection;

/// How long metadata and watermark look-ups may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a read may go without a record before it gives up on a partition end it cannot
/// reach (an open transaction's records below the end, never committed or aborted yet).
const READ_STALL: Duration = Duration::from_secs(60);

/// Reads `topics` from their start to the end each partition had when the read began
/// (read_committed), calling `visit` with each record in partition order, until it breaks.
/// A topic that does not exist reads as empty and is named in the result.
pub fn read_topics(
    kafka: &KafkaConfig,
    topics: &[String],
    mut visit: impl FnMut(RawRecord) -> ControlFlow<()>,
) -> Result<ReadSummary, ServiceError> {
    let consumer: BaseConsumer<QuietEof> = clients::restore_consumer(kafka)
        .set("group.id", format!("{}.tools", kafka.group_id))
        .create_with_context(QuietEof)
        .map_err(kafka_error("cannot create a Kafka consumer"))?;
    let mut summary = ReadSummary::default();
    let mut assignment = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), LOOKUP_TIMEOUT)
            .map_err(kafka_error(format!(
                "cannot read the metadata of `{topic}`"
            )))?;
        let Some(found) = metadata
            .topics()
            .iter()
            .find(|found| found.name() == topic && found.error().is_none())
            .filter(|found| !found.partitions().is_empty())
        else {
            summary.missing_topics.push(topic.clone());
            continue;
        };
        for partition in found.partitions() {
            let id = partition.id();
            let (low, high) = consumer
                .fetch_watermarks(topic, id, LOOKUP_TIMEOUT)
                .map_err(kafka_error(format!(
                    "cannot read the offsets of `{topic}` partition {id}"
                )))?;
            if high > low {
                assignment
                    .add_partition_offset(topic, id, Offset::Beginning)
                    .map_err(kafka_error("cannot build the assignment"))?;
                ends.insert((topic.clone(), id), high);
            }
        }
    }
    if ends.is_empty() {
        return Ok(summary);
    }
    consumer
        .assign(&assignment)
        .map_err(kafka_error("cannot assign the topics to read"))?;
    let mut last_record = Instant::now();
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                last_record = Instant::now();
                let record = raw_record(&message);
                let key = (record.topic.clone(), record.partition);
                let Some(end) = ends.get(&key).copied() else {
                    continue;
                };
                if record.offset + 1 >= end {
                    ends.remove(&key);
                }
                if record.offset >= end {
                    continue;
                }
                summary.records += 1;
                if visit(record).is_break() {
                    return Ok(summary);
                }
            }
            Some(Err(error)) if !matches!(error, KafkaError::PartitionEOF(_)) => {
                return Err(ServiceError::Kafka {
                    context: "cannot read".to_owned(),
                    source: error,
                });
            }
            // An end of partition, or nothing fetched: with read_committed the end reached
            // may lie below the high watermark (transaction markers, aborted records), so the
            // positions decide which partitions are done.
            _ => {
                let positions = consumer
                    .position()
                    .map_err(kafka_error("cannot read the positions"))?;
                for element in positions.elements() {
                    let key = (element.topic().to_owned(), element.partition());
                    if let (Offset::Offset(position), Some(end)) =
                        (element.offset(), ends.get(&key))
                        && position >= *end
                    {
                        ends.remove(&key);
                    }
                }
                if last_record.elapsed() > READ_STALL {
                    summary.incomplete = ends.keys().map(|(t, p)| format!("{t}/{p}")).collect();
                    return Ok(summary);
                }
            }
        }
    }
    Ok(summary)
}

/// What a read covered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReadSummary {
    pub records: u64,
    pub missing_topics: Vec<String>,
    /// Partitions whose end was not reached in time (an open transaction?).
    pub incomplete: Vec<String>,
}

/// Writes records to their partitions with an idempotent producer (acks=all), in order per
/// partition, and waits until every one is acknowledged. Returns how many were written.
pub async fn write_records(
    kafka: &KafkaConfig,
    records: &[Reinjection],
) -> Result<usize, ServiceError> {
    let producer: FutureProducer = clients::idempotent_producer(kafka)
        // One request in flight keeps order without depending on idempotence's sequence
        // numbers alone; the command writes few records.
        .set("max.in.flight.requests.per.connection", "1")
        .create()
        .map_err(kafka_error("cannot create the Kafka producer"))?;
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(KafkaHeader {
                key: name,
                value: Some(value),
            });
        }
        let mut future = FutureRecord::to(&record.topic)
            .partition(record.partition)
            .headers(headers);
        if let Some(key) = &record.key {
            future = future.key(key);
        }
        if let Some(value) = &record.value {
            future = future.payload(value);
        }
        let delivery = producer
            .send_result(future)
            .map_err(|(error, _)| ServiceError::Kafka {
                context: format!("cannot write to `{}`", record.topic),
                source: error,
            })?;
        deliveries.push(delivery);
    }
    producer
        .flush(LOOKUP_TIMEOUT)
        .map_err(kafka_error("cannot flush the producer"))?;
    let mut written = 0;
    for (delivery, record) in deliveries.into_iter().zip(records) {
        match delivery.await {
            Ok(Ok(_)) => written += 1,
            Ok(Err((error, _))) => {
                return Err(ServiceError::Kafka {
                    context: format!(
                        "`{}` partition {} refused a record ({written} written before it)",
                        record.topic, record.partition
                    ),
                    source: error,
                });
            }
            Err(_) => {
                return Err(ServiceError::Kafka {
                    context: format!("a write to `{}` was cancelled", record.topic),
                    source: KafkaError::Canceled,
                });
            }
        }
    }
    Ok(written)
}

/// Writes keyed records to `topic`, partitioned by key as Kafka's Java clients partition
/// (murmur2, as Debezium's records and cdcflow's polls are), and waits for every
/// acknowledgement. Returns how many were written.
pub async fn write_keyed(
    kafka: &KafkaConfig,
    topic: &str,
    records: &[(Vec<u8>, Vec<u8>)],
) -> Result<usize, ServiceError> {
    let producer: FutureProducer = clients::idempotent_producer(kafka)
        .set("partitioner", "murmur2_random")
        .create()
        .map_err(kafka_error("cannot create the Kafka producer"))?;
    let mut deliveries = Vec::with_capacity(records.len());
    for (key, value) in records {
        deliveries.push(
            producer
                .send_result(FutureRecord::to(topic).key(key).payload(value))
                .map_err(|(error, _)| ServiceError::Kafka {
                    context: format!("cannot write to `{topic}`"),
                    source: error,
                })?,
        );
    }
    let mut written = 0;
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => written += 1,
            Ok(Err((error, _))) => {
                return Err(ServiceError::Kafka {
                    context: format!("`{topic}` refused a record ({written} written before it)"),
                    source: error,
                });
            }
            Err(_) => {
                return Err(ServiceError::Kafka {
                    context: format!("a write to `{topic}` was cancelled"),
                    source: KafkaError::Canceled,
                });
            }
        }
    }
    Ok(written)
}
