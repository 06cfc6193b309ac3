//! Outputs read back with Kafka's Java console consumer (a client other than librdkafka):
//! records with partition, key and headers, bounded waits for a count, and the check that no
//! transaction is left hanging.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

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
