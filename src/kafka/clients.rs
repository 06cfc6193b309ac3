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
        // Bounded prefetch: librdkafka's default is 64 MiB per partition queue.
        .set("queued.max.messages.kbytes", "16384")
        .set("session.timeout.ms", "10000")
        // Restoring a changelog runs inside the rebalance callback, between polls.
        .set("max.poll.interval.ms", "300000");
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
        // A checkpoint beyond a recreated changelog must restart from its beginning, not skip
        // to its end (librdkafka's default).
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", "16384");
    config
}

/// The producer: transactional (exactly-once) or idempotent (at-least-once), bounded queue.
pub(super) fn producer(kafka: &KafkaConfig, transactional_id: &str) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("enable.idempotence", "true")
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
    config
}

/// The admin client (topic creation and validation).
pub(super) fn admin(kafka: &KafkaConfig) -> ClientConfig {
    base(kafka)
}
