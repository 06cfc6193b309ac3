//! Harness for the tests against a real Kafka broker: unique topics per test, inputs produced
//! with rdkafka, cdcflow run as a child process, and outputs read back with Kafka's own Java
//! console consumer (a client other than librdkafka) with read_committed.
#![allow(dead_code, unreachable_pub)]

#[path = "../common/checkout.rs"]
mod checkout;
pub use checkout::root;

mod scenario;
pub use scenario::*;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

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

/// How often the bounded waits look again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Whether `condition` holds within `timeout`, looked at every [`POLL_INTERVAL`].
fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until `condition` holds, looking every 100 ms; panics naming `what` (the condition,
/// e.g. "the group has committed every input record") after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, condition),
        "waited {timeout:?} in vain until {what}"
    );
}

/// A client that only reads offsets: it never subscribes, so it never joins `group`.
fn offset_reader(isolation: &str, group: Option<&str>) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap())
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false");
    if let Some(group) = group {
        config.set("group.id", group);
    }
    config.create().expect("consumer")
}

/// The partitions of `topic`; panics when it has none (it does not exist).
fn partitions_of(reader: &BaseConsumer, topic: &str) -> Vec<i32> {
    let metadata = reader
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|topic| topic.partitions())
        .map(|partition| partition.id())
        .collect();
    assert!(!partitions.is_empty(), "topic `{topic}` has no partitions");
    partitions
}

/// How long a read of committed offsets retries while the broker withholds them: offsets
/// committed by a transaction still open are unstable until it ends, at the latest after the
/// 10 s `transaction_timeout` of [`shop_config`].
const UNSTABLE_OFFSETS_PATIENCE: Duration = Duration::from_secs(15);

/// A group's committed offsets and the end offsets of one topic it reads, read by clients
/// that never join the group, so looking causes no rebalance.
pub struct GroupOffsets {
    group: String,
    topic: String,
    partitions: Vec<i32>,
    /// read_committed, so librdkafka asks for stable offsets only (KIP-447): offsets of an
    /// open transaction come back as UNSTABLE_OFFSET_COMMIT, never as a guess.
    committed_reader: BaseConsumer,
    /// read_uncommitted, so its end offsets are the high watermarks, not the last stable
    /// offsets.
    end_reader: BaseConsumer,
}

impl GroupOffsets {
    pub fn new(group: &str, topic: &str) -> GroupOffsets {
        let committed_reader = offset_reader("read_committed", Some(group));
        GroupOffsets {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partitions: partitions_of(&committed_reader, topic),
            committed_reader,
            end_reader: offset_reader("read_uncommitted", None),
        }
    }

    /// One look at the committed offsets: an error while any is unstable (waits take that
    /// for "not yet"). Partitions without a commit are absent.
    pub fn try_committed(&self) -> KafkaResult<BTreeMap<i32, i64>> {
        let mut list = TopicPartitionList::new();
        for &partition in &self.partitions {
            list.add_partition(&self.topic, partition);
        }
        let committed = self
            .committed_reader
            .committed_offsets(list, Duration::from_secs(5))?;
        let mut offsets = BTreeMap::new();
        for element in committed.elements() {
            element.error()?;
            if let Offset::Offset(offset) = element.offset() {
                offsets.insert(element.partition(), offset);
            }
        }
        Ok(offsets)
    }

    /// The committed offset per partition (absent: nothing committed), retrying while an
    /// open transaction keeps them unstable.
    pub fn committed(&self) -> BTreeMap<i32, i64> {
        let deadline = Instant::now() + UNSTABLE_OFFSETS_PATIENCE;
        loop {
            match self.try_committed() {
                Ok(offsets) => return offsets,
                Err(_) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                Err(error) => panic!(
                    "cannot read the offsets group `{}` committed on `{}` within \
                     {UNSTABLE_OFFSETS_PATIENCE:?}: {error}",
                    self.group, self.topic
                ),
            }
        }
    }

    /// The high watermark per partition.
    pub fn end(&self) -> BTreeMap<i32, i64> {
        self.try_end().unwrap_or_else(|error| {
            panic!("cannot read the end offsets of `{}`: {error}", self.topic)
        })
    }

    fn try_end(&self) -> KafkaResult<BTreeMap<i32, i64>> {
        high_watermarks(&self.end_reader, &self.topic, &self.partitions)
    }

    /// Waits until the committed offsets add up to `at_least`.
    pub fn wait_for_committed(&self, at_least: i64, timeout: Duration) {
        let mut committed = BTreeMap::new();
        let reached = poll_until(timeout, || {
            // Unstable offsets (an open transaction) are a "not yet", not a failure.
            if let Ok(offsets) = self.try_committed() {
                committed = offsets;
            }
            committed.values().sum::<i64>() >= at_least
        });
        assert!(
            reached,
            "group `{}` committed {} records of `{}` within {timeout:?}, not {at_least} \
             (per partition: {committed:?})",
            self.group,
            committed.values().sum::<i64>(),
            self.topic
        );
    }

    /// Waits until the committed offset of every partition is its end offset.
    pub fn wait_caught_up(&self, timeout: Duration) {
        let (mut committed, mut end) = (BTreeMap::new(), BTreeMap::new());
        let caught_up = poll_until(timeout, || {
            let (Ok(now_committed), Ok(now_end)) = (self.try_committed(), self.try_end()) else {
                return false;
            };
            (committed, end) = (now_committed, now_end);
            end.iter()
                .all(|(partition, last)| committed.get(partition).copied().unwrap_or(0) == *last)
        });
        assert!(
            caught_up,
            "group `{}` did not catch up with `{}` within {timeout:?}: committed {committed:?}, \
             end offsets {end:?}",
            self.group, self.topic
        );
    }
}

/// The high watermark per partition. `reader` must read uncommitted: librdkafka asks for the
/// end offsets with the consumer's isolation level, and read_committed ones are the last
/// stable offsets.
fn high_watermarks(
    reader: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
) -> KafkaResult<BTreeMap<i32, i64>> {
    partitions
        .iter()
        .map(|&partition| {
            let (_, high) = reader.fetch_watermarks(topic, partition, Duration::from_secs(5))?;
            Ok((partition, high))
        })
        .collect()
}

/// The offsets `group` committed per partition of `topic` (read_committed; partitions
/// without a commit are absent), retrying while an open transaction keeps them unstable (up
/// to 15 s).
pub fn committed_offsets(group: &str, topic: &str) -> BTreeMap<i32, i64> {
    GroupOffsets::new(group, topic).committed()
}

/// The high watermark per partition of `topic`.
pub fn end_offsets(topic: &str) -> BTreeMap<i32, i64> {
    let reader = offset_reader("read_uncommitted", None);
    high_watermarks(&reader, topic, &partitions_of(&reader, topic))
        .unwrap_or_else(|error| panic!("cannot read the end offsets of `{topic}`: {error}"))
}

/// Waits until the offsets `group` committed on `topic` add up to `at_least`.
pub fn wait_for_committed(group: &str, topic: &str, at_least: i64, timeout: Duration) {
    GroupOffsets::new(group, topic).wait_for_committed(at_least, timeout);
}

/// Waits until `group` has committed every record of `topic`: committed offset = end offset
/// on every partition.
pub fn wait_caught_up(group: &str, topic: &str, timeout: Duration) {
    GroupOffsets::new(group, topic).wait_caught_up(timeout);
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

/// Readers of `topic`'s end offsets: read_uncommitted sees records of open transactions,
/// read_committed stops at the last stable offset.
pub struct TransactionProbe {
    topic: String,
    uncommitted: BaseConsumer,
    committed: BaseConsumer,
    partitions: Vec<i32>,
}

impl TransactionProbe {
    pub fn new(topic: &str) -> TransactionProbe {
        let committed = offset_reader("read_committed", None);
        TransactionProbe {
            topic: topic.to_owned(),
            uncommitted: offset_reader("read_uncommitted", None),
            partitions: partitions_of(&committed, topic),
            committed,
        }
    }

    /// Whether a partition holds records past its last stable offset: records of an open
    /// transaction, or of one whose commit markers are still being written.
    pub fn records_past_stable_offset(&self) -> bool {
        let end = |consumer: &BaseConsumer, partition: i32| {
            consumer
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(5))
                .map_or(0, |(_, high)| high)
        };
        self.partitions
            .iter()
            .any(|&partition| end(&self.uncommitted, partition) > end(&self.committed, partition))
    }
}

/// Kills `service` with SIGKILL inside an open transaction writing `topic`, trying up to
/// `timeout`: the process is frozen (SIGSTOP), the markers of a transaction it already
/// committed get time to land, and only records still past the last stable offset mean a
/// transaction the kill leaves open; otherwise it resumes (SIGCONT) and is tried again a moment
/// later. Returns whether the kill landed inside a transaction (at the timeout it kills anyway).
pub fn kill_inside_transaction(service: Service, topic: &str, timeout: Duration) -> bool {
    let probe = TransactionProbe::new(topic);
    let deadline = Instant::now() + timeout;
    let mut attempt = 0u64;
    loop {
        service.signal("STOP");
        std::thread::sleep(Duration::from_millis(300));
        let inside = probe.records_past_stable_offset();
        if inside || Instant::now() >= deadline {
            service.kill();
            return inside;
        }
        service.signal("CONT");
        attempt += 1;
        std::thread::sleep(Duration::from_millis(10 + attempt * 37 % 90));
    }
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

/// A running `cdcflow run`.
pub struct Service {
    pub child: Child,
    pub log: PathBuf,
}

impl Service {
    pub fn start(config: &Path, log: &Path) -> Service {
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
            .args(["run", "--config"])
            .arg(config)
            .env(
                "CDCFLOW_LOG",
                "info,cdcflow::kafka::service=debug,rdkafka=warn",
            )
            // Tests read the log (partition lists, errors): plain text, no ANSI colours.
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("cdcflow starts");
        Service {
            child,
            log: log.to_owned(),
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGTERM, then the exit status within `timeout` (at once if it has exited already).
    pub fn stop(mut self, timeout: Duration) -> std::process::ExitStatus {
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.signal("KILL");
                panic!(
                    "cdcflow did not stop within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` and returns it; panics with the log after
    /// `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let mut log = String::new();
        if poll_until(timeout, || {
            log = self.log_text();
            log.contains(needle)
        }) {
            return log;
        }
        panic!("no `{needle}` in the log within {timeout:?}; log:\n{log}");
    }

    /// How often `needle` occurs in the log so far.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// The partitions of each `partitions assigned` line, in log order (a line may name none:
    /// a cooperative rebalance can assign nothing new).
    pub fn assignments(&self) -> Vec<Vec<TopicPartition>> {
        self.log_text()
            .lines()
            .filter_map(|line| logged_partitions(line, ASSIGNED))
            .collect()
    }

    /// The partitions the log says the instance holds: assigned and not revoked since.
    pub fn held_partitions(&self) -> BTreeSet<TopicPartition> {
        let mut held = BTreeSet::new();
        for line in self.log_text().lines() {
            if let Some(assigned) = logged_partitions(line, ASSIGNED) {
                held.extend(assigned);
            } else if let Some(dropped) =
                logged_partitions(line, REVOKED).or_else(|| logged_partitions(line, DROPPED))
            {
                for partition in &dropped {
                    held.remove(partition);
                }
            }
        }
        held
    }

    /// `GET path` on the service's HTTP endpoint (its address is in the log): (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let log = self.log_text();
        let address = log
            .split("serving http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("the log names no HTTP address: {log}"));
        let mut stream = std::net::TcpStream::connect(address).expect("HTTP endpoint accepts");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_owned());
        (status, body)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// How much of a service's log a failing test prints.
const LOG_TAIL_LINES: usize = 60;

/// An input partition named in the log: (topic, partition).
pub type TopicPartition = (String, i32);

/// The log line of an assignment; its `partitions` field lists what was assigned.
pub const ASSIGNED: &str = "partitions assigned";
/// The log line of a revocation (`lost=true` when the session had expired).
pub const REVOKED: &str = "partitions revoked";
/// The log line of a failed rebalance, whose partitions are dropped.
const DROPPED: &str = "dropping the assignment";

/// The partitions a log line containing `needle` names after it, in the form
/// `partitions=[("<topic>", 3), ("<topic>", 7)]`; `None` for any other line.
fn logged_partitions(line: &str, needle: &str) -> Option<Vec<TopicPartition>> {
    let (_, fields) = line.split_once(needle)?;
    Some(
        fields
            .split('(')
            .skip(1)
            .filter_map(|tuple| {
                let (topic, partition) = tuple.split_once(')')?.0.rsplit_once(", ")?;
                Some((topic.trim_matches('"').to_owned(), partition.parse().ok()?))
            })
            .collect(),
    )
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed wait or assertion: the end of the log usually says why.
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "last lines of {}:\n{}",
                self.log.display(),
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            );
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One record read back by the Java console consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRecord {
    pub partition: i32,
    pub key: String,
    pub value: String,
    pub headers: BTreeMap<String, String>,
}

impl ReadRecord {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.value).unwrap_or(Value::Null)
    }
}

/// Reads a topic from the beginning with Kafka's Java console consumer.
pub fn read_topic(topic: &str, isolation: &str, idle_ms: u64) -> Vec<ReadRecord> {
    let output = Command::new(root().join("deploy/local/kafka.sh"))
        .args([
            "console-consumer",
            "--bootstrap-server",
            &bootstrap(),
            "--topic",
            topic,
        ])
        .args(["--from-beginning", "--isolation-level", isolation])
        .args(["--timeout-ms", &idle_ms.to_string()])
        .args(["--formatter-property", "print.key=true"])
        .args(["--formatter-property", "print.partition=true"])
        .args(["--formatter-property", "print.headers=true"])
        .args(["--formatter-property", "key.separator=\u{1f}"])
        .args(["--formatter-property", "headers.separator=\u{1e}"])
        .output()
        .expect("console consumer runs");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.splitn(4, '\u{1f}').collect();
            assert_eq!(fields.len(), 4, "unexpected console consumer line: {line}");
            let partition = fields[0]
                .trim_start_matches("Partition:")
                .trim()
                .parse()
                .unwrap_or(-1);
            let headers = if fields[1] == "NO_HEADERS" {
                BTreeMap::new()
            } else {
                fields[1]
                    .split('\u{1e}')
                    // Header names never contain ':'; values may.
                    .filter_map(|pair| pair.split_once(':'))
                    .map(|(name, value)| (name.to_owned(), value.to_owned()))
                    .collect()
            };
            ReadRecord {
                partition,
                key: fields[2].to_owned(),
                value: fields[3].to_owned(),
                headers,
            }
        })
        .collect()
}

/// Reads until at least `count` records are visible (read_committed), bounded.
pub fn wait_for(topic: &str, count: usize, timeout: Duration) -> Vec<ReadRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = read_topic(topic, "read_committed", 2_000);
        if records.len() >= count || Instant::now() > deadline {
            return records;
        }
    }
}

/// A marker produced after the test becomes readable with read_committed only if no
/// transaction on the topic is left open.
pub fn assert_no_hanging_transaction(topic: &str) {
    let marker = unique("marker");
    produce(&[(
        topic.to_owned(),
        Some(marker.as_bytes().to_vec()),
        Some(b"{}".to_vec()),
    )]);
    let records = wait_for_marker(topic, &marker, Duration::from_secs(30));
    assert!(
        records,
        "marker on `{topic}` is not readable with read_committed: a transaction hangs"
    );
}

fn wait_for_marker(topic: &str, marker: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if read_topic(topic, "read_committed", 2_000)
            .iter()
            .any(|r| r.key == marker)
        {
            return true;
        }
    }
    false
}

/// Expected events of an input, computed by `cdcflow replay` (in memory) on the same records:
/// ids are deterministic, so the replay is the oracle. Returns (key, id, type) in order.
pub fn expected_events(config: &Path, records: &[Record]) -> Vec<(String, String, String)> {
    oracle_events(config, records)
        .into_iter()
        .map(|(key, event)| {
            (
                key,
                event["id"].as_str().unwrap().to_owned(),
                event["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// For diagnosing a failure: the index in `records` of the input record behind each expected
/// event id (from the oracle's `causationid`, `topic/0/index`).
pub fn expected_origins(config: &Path, records: &[Record]) -> BTreeMap<String, usize> {
    oracle_events(config, records)
        .into_iter()
        .filter_map(|(_, event)| {
            let index = event["causationid"]
                .as_str()?
                .rsplit('/')
                .next()?
                .parse()
                .ok()?;
            Some((event["id"].as_str()?.to_owned(), index))
        })
        .collect()
}

/// (key, CloudEvent) of every event `cdcflow replay` derives from `records`, in order.
fn oracle_events(config: &Path, records: &[Record]) -> Vec<(String, Value)> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    let mut lines = String::new();
    for (offset, (topic, key, value)) in records.iter().enumerate() {
        let text = |bytes: &Option<Vec<u8>>| {
            bytes
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        lines.push_str(
            &serde_json::json!({"topic": topic, "partition": 0, "offset": offset,
                                "key": text(key), "payload": text(value)})
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&input, lines).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .args(["replay", "--in-memory", "--config"])
        .arg(config)
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| line["kind"] == "event")
        .map(|line| {
            let event: Value = serde_json::from_str(line["payload"].as_str().unwrap()).unwrap();
            (line["key"].as_str().unwrap().to_owned(), event)
        })
        .collect()
}

/// (key, id, type) of business events read back.
pub fn events(records: &[ReadRecord]) -> Vec<(String, String, String)> {
    records
        .iter()
        .map(|record| {
            let event = record.json();
            (
                record.key.clone(),
                event["id"].as_str().unwrap_or_default().to_owned(),
                event["type"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Events grouped per entity key, in order.
pub fn per_entity(events: &[(String, String, String)]) -> BTreeMap<String, Vec<String>> {
    let mut grouped: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, id, _) in events {
        grouped.entry(key.clone()).or_default().push(id.clone());
    }
    grouped
}

/// Event id -> the CloudEvent's `data`, of the events read back.
pub fn event_data(records: &[ReadRecord]) -> BTreeMap<String, Value> {
    records
        .iter()
        .map(|record| {
            let event = record.json();
            (
                event["id"].as_str().unwrap_or_default().to_owned(),
                event["data"].clone(),
            )
        })
        .collect()
}

/// Event id -> the CloudEvent's `data`, of the events the replay oracle derives from
/// `records`.
pub fn expected_event_data(config: &Path, records: &[Record]) -> BTreeMap<String, Value> {
    oracle_events(config, records)
        .into_iter()
        .map(|(_, event)| {
            (
                event["id"].as_str().unwrap().to_owned(),
                event["data"].clone(),
            )
        })
        .collect()
}

/// Every event read carries the oracle's `data` for its id. This is what catches a
/// transition computed from a lost previous image (an OrderPaid with the wrong
/// `from_status`): its id, derived from the input position, is right; its payload is not.
pub fn assert_payloads(actual: &[ReadRecord], expected: &BTreeMap<String, Value>) {
    let wrong: Vec<String> = actual
        .iter()
        .filter_map(|record| {
            let event = record.json();
            let id = event["id"].as_str().unwrap_or_default();
            match expected.get(id) {
                Some(data) if *data == event["data"] => None,
                Some(data) => Some(format!(
                    "{id} (key {}): data {} where the oracle has {data}",
                    record.key, event["data"]
                )),
                None => Some(format!("{id}: no such expected event: {}", record.value)),
            }
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} events read differ from the replay oracle; first: {:#?}",
        wrong.len(),
        actual.len(),
        &wrong[..wrong.len().min(10)]
    );
}

/// At-least-once order, per entity key: a crash rewinds to the last commit, so each id read
/// is either the entity's next expected id or a repeat of one read before, and the first
/// occurrences are exactly the expected sequence.
pub fn assert_order_per_entity(
    actual: &[(String, String, String)],
    expected: &[(String, String, String)],
) {
    let (actual, expected) = (per_entity(actual), per_entity(expected));
    let keys: BTreeSet<&String> = actual.keys().chain(expected.keys()).collect();
    for key in keys {
        let read = actual.get(key).map_or(&[][..], Vec::as_slice);
        let want = expected.get(key).map_or(&[][..], Vec::as_slice);
        let mut next = 0;
        for (position, id) in read.iter().enumerate() {
            if want.get(next) == Some(id) {
                next += 1;
            } else {
                assert!(
                    want[..next].contains(id),
                    "entity {key}: read {id} at position {position} where the next expected \
                     event is {:?}, and it is no repeat; read {read:?}, expected {want:?}",
                    want.get(next)
                );
            }
        }
        assert_eq!(
            next,
            want.len(),
            "entity {key}: expected events missing; read {read:?}, expected {want:?}"
        );
    }
}
