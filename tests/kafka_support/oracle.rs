//! The replay oracle: `cdcflow replay` (in memory) on the same input derives the expected
//! events, whose ids are deterministic; and the assertions of what was read back against it
//! (ids per entity, payloads, at-least-once order).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::*;

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
