//! Harness for the tests against a real Kafka broker: unique topics per test, inputs produced
//! with rdkafka, cdcflow run as a child process, and outputs read back with Kafka's own Java
//! console consumer (a client other than librdkafka) with read_committed.
//!
//! This module holds the broker basics (its address, unique names, topics, producing inputs,
//! the per-test config); the rest lives by idea in `scenario`, `offsets` (committed and end
//! offsets, and every bounded wait), `service` (the `cdcflow run` child and its log),
//! `read_back` (the console consumer) and `oracle` (the replay oracle and the assertions
//! against it). Everything is re-exported here, so a test needs only `use kafka_support::*;`.
#![allow(dead_code, unreachable_pub, unused_imports)]

#[path = "../common/checkout.rs"]
mod checkout;
pub use checkout::root;

mod debezium;
mod offsets;
mod oracle;
mod read_back;
mod scenario;
mod service;
pub use debezium::*;
pub use offsets::*;
pub use oracle::*;
pub use read_back::*;
pub use scenario::*;
pub use service::*;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

use offsets::offset_reader;

/// An input record: topic, key, value.
pub type Record = (String, Option<Vec<u8>>, Option<Vec<u8>>);

/// The broker under test. Missing is a failure, never a skip.
pub fn bootstrap() -> String {
    std::env::var("CDCFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "CDCFLOW_KAFKA_BOOTSTRAP is not set: run tests/run-all.sh, which starts the local \
             Kafka broker (deploy/local/kafka.sh) and sets it"
        )
    })
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!(
        "{prefix}-{}-{millis}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A topic to create: name, partitions, topic-level configs.
pub type TopicSpec<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);

pub fn create_topics(topics: &[(&str, i32)]) {
    let plain: Vec<TopicSpec<'_>> = topics
        .iter()
        .map(|(name, partitions)| (*name, *partitions, &[][..]))
        .collect();
    create_topics_with_configs(&plain);
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client")
}

/// Creates topics with topic-level configs (name, partitions, configs).
pub fn create_topics_with_configs(topics: &[TopicSpec<'_>]) {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions, configs)| {
            configs.iter().fold(
                NewTopic::new(name, *partitions, TopicReplication::Fixed(1)),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let results = runtime()
        .block_on(admin().create_topics(new.iter(), &AdminOptions::new()))
        .expect("create topics");
    for result in results {
        result.expect("topic created");
    }
}

/// Deletes a topic and waits until the broker's metadata no longer lists it.
pub fn delete_topic(name: &str) {
    let results = runtime()
        .block_on(admin().delete_topics(&[name], &AdminOptions::new()))
        .expect("delete topics");
    for result in results {
        if let Err((topic, code)) = result {
            panic!("cannot delete topic `{topic}`: {code}");
        }
    }
    let reader = offset_reader("read_uncommitted", None);
    wait_until(
        &format!("the metadata no longer lists topic `{name}`"),
        Duration::from_secs(30),
        || {
            reader
                .fetch_metadata(None, Duration::from_secs(5))
                .is_ok_and(|metadata| metadata.topics().iter().all(|t| t.name() != name))
        },
    );
}

/// Produces records (topic, key, value) in order; the default partitioner keeps one key on
/// one partition.
pub fn produce(records: &[Record]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    runtime().block_on(async {
        let mut pending = Vec::new();
        for (topic, key, value) in records {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(value) = value {
                record = record.payload(value);
            }
            match producer.send_result(record) {
                Ok(future) => pending.push(future),
                Err((error, _)) => panic!("produce failed: {error}"),
            }
            if pending.len() >= 5_000 {
                for future in pending.drain(..) {
                    future.await.unwrap().expect("delivered");
                }
            }
        }
        for future in pending {
            future.await.unwrap().expect("delivered");
        }
    });
}

/// Produces `records` from a background thread at about `per_second`, so that they stream in
/// while a test stops and starts instances.
pub fn produce_paced(records: Vec<Record>, per_second: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        const TICK: Duration = Duration::from_millis(100);
        let per_tick = (per_second / 10).max(1);
        let started = Instant::now();
        for (tick, chunk) in records.chunks(per_tick).enumerate() {
            produce(chunk);
            let due = started + TICK * (tick as u32 + 1);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    })
}

/// Reads the kcat JSON Lines of an example input: (topic, key, value) per line.
pub fn kcat_records(path: &Path, topic_prefix: &str) -> Vec<Record> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line).unwrap();
            (
                format!("{topic_prefix}{}", record["topic"].as_str().unwrap()),
                record["key"].as_str().map(|key| key.as_bytes().to_vec()),
                record["payload"]
                    .as_str()
                    .map(|value| value.as_bytes().to_vec()),
            )
        })
        .collect()
}

/// The example config with every topic prefixed, the DLQs per test, and a [kafka] section.
pub fn shop_config(
    prefix: &str,
    group: &str,
    instance: &str,
    delivery: &str,
    state: &Path,
) -> String {
    let example = std::fs::read_to_string(root().join("examples/shop.toml")).unwrap();
    let mut config = format!(
        "[kafka]\nbootstrap_servers = \"{}\"\ngroup_id = \"{group}\"\ninstance_id = \"{instance}\"\n\
         delivery = \"{delivery}\"\nbatch_max_records = 500\nbatch_max_wait = \"50ms\"\n\
         transaction_timeout = \"10s\"\nshutdown_timeout = \"15s\"\n\
         consumer = {{ \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"1000\" }}\n\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\n",
        bootstrap()
    );
    for line in example.lines() {
        let line = line.replace("\"shop.", &format!("\"{prefix}shop."));
        if line.starts_with("path = ") {
            config.push_str(&format!("path = \"{}\"\n", state.display()));
            continue;
        }
        config.push_str(&line);
        config.push('\n');
        if let Some(name) = line
            .strip_prefix("name = \"")
            .filter(|_| !line.contains("rule"))
        {
            let name = name.trim_end_matches('"');
            if name == "orders" || name == "customers" {
                config.push_str(&format!("dlq_topic = \"{prefix}dlq.{name}\"\n"));
            }
        }
    }
    config
}

/// The consumer group of a config written by [`shop_config`].
pub fn group_of(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("group_id = \""))
        .unwrap_or_else(|| panic!("no group_id in {}", config.display()))
        .trim_end_matches('"')
        .to_owned()
}
