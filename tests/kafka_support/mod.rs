//! Harness for the tests against a real Kafka broker: unique topics per test, inputs produced
//! with rdkafka, cdcflow run as a child process, and outputs read back with Kafka's own Java
//! console consumer (a client other than librdkafka) with read_committed.
#![allow(dead_code, unreachable_pub)]

#[path = "../common/checkout.rs"]
mod checkout;
pub use checkout::root;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
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

/// Creates topics with topic-level configs (name, partitions, configs).
pub fn create_topics_with_configs(topics: &[TopicSpec<'_>]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client");
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
        .block_on(admin.create_topics(new.iter(), &AdminOptions::new()))
        .expect("create topics");
    for result in results {
        result.expect("topic created");
    }
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
        let reader = |isolation: &str| -> BaseConsumer {
            ClientConfig::new()
                .set("bootstrap.servers", bootstrap())
                .set("isolation.level", isolation)
                .create()
                .expect("consumer")
        };
        let committed = reader("read_committed");
        let metadata = committed
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .expect("metadata");
        let partitions = metadata
            .topics()
            .iter()
            .flat_map(|topic| topic.partitions())
            .map(|partition| partition.id())
            .collect();
        TransactionProbe {
            topic: topic.to_owned(),
            uncommitted: reader("read_uncommitted"),
            committed,
            partitions,
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

    /// SIGTERM, then the exit status within `timeout`.
    pub fn stop(mut self, timeout: Duration) -> std::process::ExitStatus {
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

impl Drop for Service {
    fn drop(&mut self) {
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
