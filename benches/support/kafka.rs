//! The Kafka side of the benchmark harnesses: the broker's address, a run's topics, the
//! producer that preloads and feeds inputs, and how far a consumer group has committed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The broker: `CDCFLOW_KAFKA_BOOTSTRAP`, else the local one `deploy/local/kafka.sh start`
/// starts (or finds running).
pub(crate) fn bootstrap(root: &Path) -> String {
    std::env::var("CDCFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        let out = Command::new(root.join("deploy/local/kafka.sh"))
            .arg("start")
            .output()
            .expect("kafka.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    })
}

/// A producer batching for throughput; `linger_ms` 5 is librdkafka's default and cdcflow's.
pub(crate) fn producer(
    bootstrap: &str,
    linger_ms: u32,
) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", linger_ms.to_string())
        .set("batch.size", "1000000")
        .set("queue.buffering.max.kbytes", "262144")
        .create()
        .expect("producer")
}

/// Sends one record, waiting while the producer's queue is full.
pub(crate) fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &[u8],
    value: &[u8],
) {
    let mut record = BaseRecord::to(topic).key(key).payload(value);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, returned)) => {
                record = returned;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Writes `changes` (entity id, Debezium value) to `topic`, keyed by entity as Debezium keys
/// them, and returns once the broker has every record.
pub(crate) fn preload(bootstrap: &str, topic: &str, changes: impl Iterator<Item = (u64, String)>) {
    // Large batches: the preload is not measured, it only has to be quick.
    let producer = producer(bootstrap, 20);
    for (id, value) in changes {
        send(
            &producer,
            topic,
            format!("{{\"id\":{id}}}").as_bytes(),
            value.as_bytes(),
        );
    }
    producer
        .flush(Duration::from_secs(300))
        .expect("preload flushed");
}

/// Creates `names`, each with `partitions` partitions and one replica.
pub(crate) fn create_topics(
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
    partitions: i32,
) {
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in runtime
        .block_on(admin.create_topics(topics.iter(), &AdminOptions::new()))
        .expect("create topics")
    {
        result.expect("topic created");
    }
    await_topics(admin, names, partitions);
}

/// Waits until the broker's metadata shows every partition of `names`: creation returns once
/// the controller has them, and a client that checks its topics at once (cdcflow does, at
/// start) could otherwise be told one does not exist.
fn await_topics(admin: &AdminClient<DefaultClientContext>, names: &[String], partitions: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let visible = admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(5))
                .is_ok_and(|metadata| {
                    metadata.topics().iter().any(|topic| {
                        topic.error().is_none() && topic.partitions().len() == partitions as usize
                    })
                });
            if visible {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "topic `{name}` not visible 30 s after creation"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Deletes every topic whose name starts with this run's prefix.
pub(crate) fn delete_run_topics(
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    probe: &BaseConsumer,
    prefix: &str,
) {
    // Runs on a failed bench's unwinding too: report, never panic.
    let metadata = match probe.fetch_metadata(None, Duration::from_secs(10)) {
        Ok(metadata) => metadata,
        Err(error) => {
            eprintln!("could not list the topics to delete (prefix `{prefix}`): {error}");
            return;
        }
    };
    let names: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|topic| topic.name())
        .filter(|name| name.starts_with(prefix))
        .collect();
    match runtime.block_on(admin.delete_topics(&names, &AdminOptions::new())) {
        Ok(results) => {
            for (topic, error) in results.into_iter().filter_map(Result::err) {
                eprintln!("could not delete `{topic}`: {error}");
            }
        }
        Err(error) => eprintln!("could not delete the run's topics: {error}"),
    }
    eprintln!("deleted the run's {} topics", names.len());
}

/// A consumer in `group` that never subscribes, so it never joins the group: it only reads
/// the group's committed offsets (and metadata).
pub(crate) fn group_consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .expect("consumer")
}

/// The sum of the committed offsets of `consumer`'s group over `topic`'s partitions (0 for a
/// partition without a commit): on a fresh topic, the records the group has processed.
pub(crate) fn committed(consumer: &BaseConsumer, topic: &str, partitions: i32) -> i64 {
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    consumer
        .committed_offsets(list, Duration::from_secs(5))
        .map(|list| {
            list.elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(offset) => offset,
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
