//! librdkafka client configurations: the settings cdcflow's guarantees depend on are set here
//! and cannot be overridden (config validation rejects them in the pass-through maps).

use rdkafka::ClientConfig;

use crate::config::{DeliveryConfig, KafkaConfig};

fn base(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        // Metadata lookups must never create topics with broker defaults.
        .set("allow.auto.create.topics", "false");
    for (property, value) in kafka.client_security.properties() {
        config.set(property, value);
    }
    config
}

/// The group consumer: manual offsets only, cooperative-sticky, read_committed, earliest.
pub(super) fn group_consumer(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A new group reads the backlog, not just new records (librdkafka defaults to latest).
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        // Restoring a changelog runs inside the rebalance callback, between polls.
        .set("max.poll.interval.ms", "300000")
        // The statistics say every second whether a broker is connected (/readyz).
        .set("statistics.interval.ms", "1000");
    bounded_prefetch(&mut config);
    for (key, value) in &kafka.consumer {
        config.set(key, value);
    }
    config
}

/// A group-less consumer for reading a changelog partition up to its committed end.
pub(super) fn restore_consumer(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("group.id", format!("{}.restore", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        // The restore ends on an end-of-partition signal, which takes an empty fetch; the
        // broker holds one up to this long (librdkafka's default 500 ms, per changelog topic).
        .set("fetch.wait.max.ms", "20")
        // A checkpoint beyond a recreated changelog must restart from its beginning, not skip
        // to its end (librdkafka's default).
        .set("auto.offset.reset", "earliest");
    bounded_prefetch(&mut config);
    config
}

/// The prefetch both consumers use: bounded (librdkafka's default is 64 MiB), and refilled as
/// soon as it drains. 8 MiB keeps up with 10,000-record batches once the backoff is short
/// (Kafka bench: same throughput as 16 MiB, ~30 MiB less peak RSS). librdkafka's backoff after
/// a full queue is 1 s: the queue fills every batch, and the worker then waited for data a
/// third of the time (Kafka bench, at-least-once: 41k records/s with 1 s, 59k with 10 ms).
fn bounded_prefetch(config: &mut ClientConfig) {
    config
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.queue.backoff.ms", "10");
}

/// librdkafka's default `batch.size`.
const DEFAULT_BATCH_BYTES: usize = 1_000_000;

/// Room for the record batch header and per-record framing.
const BATCH_FRAMING_BYTES: usize = 1_024;

/// The producer: transactional (exactly-once) or idempotent (at-least-once), bounded queue.
/// Its batches stay under `smallest_max_message_bytes` (the smallest `max.message.bytes` of
/// the topics it writes), so the broker refuses only records that are too large themselves.
pub(super) fn producer(
    kafka: &KafkaConfig,
    transactional_id: &str,
    smallest_max_message_bytes: Option<usize>,
) -> ClientConfig {
    let mut config = base(kafka);
    let batch_bytes = kafka
        .producer
        .get("batch.size")
        .and_then(|value| value.parse().ok())
        .unwrap_or(DEFAULT_BATCH_BYTES)
        .min(smallest_max_message_bytes.map_or(usize::MAX, |limit| {
            limit.saturating_sub(BATCH_FRAMING_BYTES)
        }))
        .max(BATCH_FRAMING_BYTES);
    config
        .set("enable.idempotence", "true")
        // The statistics give the producer's queue depth (cdcflow_producer_queue_messages).
        .set("statistics.interval.ms", "1000")
        .set("queue.buffering.max.kbytes", "65536")
        .set("linger.ms", "5");
    if kafka.delivery == DeliveryConfig::ExactlyOnce {
        config.set("transactional.id", transactional_id).set(
            "transaction.timeout.ms",
            kafka.transaction_timeout.as_millis().to_string(),
        );
    }
    for (key, value) in &kafka.producer {
        config.set(key, value);
    }
    config.set("batch.size", batch_bytes.to_string());
    config
}

/// An idempotent producer (acks=all) that reports no statistics, for the writers that have no
/// use for them (the webhook DLQ, the ingress, the operator's tools): librdkafka's default
/// context would log every report at info.
pub(super) fn idempotent_producer(kafka: &KafkaConfig) -> ClientConfig {
    let mut settings = kafka.clone();
    settings.delivery = DeliveryConfig::AtLeastOnce;
    let mut config = producer(&settings, "", None);
    config.set("statistics.interval.ms", "0");
    config
}

/// The admin client (topic creation and validation).
pub(super) fn admin(kafka: &KafkaConfig) -> ClientConfig {
    base(kafka)
}

/// The member of a poll's ownership group: it reads nothing that matters (the cursor topic's
/// single partition is what the group assigns, to one member), so it starts at the end.
pub(super) fn poll_owner_consumer(kafka: &KafkaConfig, group: &str) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "latest")
        // The owner keeps the poll when another instance joins.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000");
    config
}

/// The transactional producer of one poll: its rows and its cursor commit together, and its
/// fixed transactional id fences a previous owner. It partitions keys as Kafka's Java
/// clients do (murmur2), so the records of one row land where Debezium's would.
pub(super) fn poll_producer(kafka: &KafkaConfig, transactional_id: &str) -> ClientConfig {
    let mut settings = kafka.clone();
    settings.delivery = DeliveryConfig::ExactlyOnce;
    let mut config = producer(&settings, transactional_id, None);
    config
        .set("statistics.interval.ms", "0")
        .set("partitioner", "murmur2_random");
    config
}
