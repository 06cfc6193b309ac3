//! Debezium's placeholder for unchanged TOASTed columns (`__debezium_unavailable_value`) never
//! reaches rules, events or the stored state as data: `cdcflow replay` end to end on Postgres
//! records shaped as Debezium writes them with REPLICA IDENTITY DEFAULT.

#[path = "common/checkout.rs"]
mod checkout;
use checkout::root;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const CONFIG: &str = r#"
[[pipeline]]
name = "docs"
topics = ["pg.public.docs"]
unavailable_value_placeholder = "__debezium_unavailable_value"

[[pipeline.rule]]
name = "status"
when = "op == 'u' && old != null && old.status != after.status"
event_type = "DocStatusChanged"
topic = "doc-events"
payload = { id = "after.id", from = "old.status", to = "after.status", body = "has(after.body) ? after.body : null", tags = "has(after.tags) ? after.tags : null" }

[[pipeline.rule]]
name = "body"
when = "op == 'u' && 'body' in changed"
event_type = "DocBodyChanged"
topic = "doc-events"
payload = { id = "after.id", from = "old.body", to = "after.body" }
"#;

/// A Postgres change as Debezium writes it (no schema wrapper), at change number `lsn`.
fn change(offset: u64, op: &str, after: Value) -> Value {
    let lsn = 1_000 + offset * 100;
    let value = json!({
        "before": null, "after": after, "op": op, "ts_ms": 1_700_000_000_000u64 + offset,
        "source": {"connector": "postgresql", "name": "pg", "ts_ms": 1_700_000_000_000u64 + offset,
                   "snapshot": "false", "db": "shop", "schema": "public", "table": "docs",
                   "sequence": format!("[\"{lsn}\",\"{lsn}\"]"), "lsn": lsn, "txId": 700 + offset}
    });
    json!({"topic": "pg.public.docs", "partition": 0, "offset": offset,
           "key": json!({"id": after["id"]}).to_string(), "payload": value.to_string()})
}

const TOASTED: &str = "__debezium_unavailable_value";
/// The placeholder's bytes as Debezium's JSON converter writes a bytea column (base64).
const TOASTED_BYTES: &str = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==";

/// The events `cdcflow replay` derives from `lines`, as CloudEvent documents.
fn replay(lines: &[Value]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("docs.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .current_dir(root())
        .args(["replay", "--in-memory", "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in lines {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .inspect(|line| assert_ne!(line["kind"], "dlq", "{line}"))
        .filter(|line| line["kind"] == "event")
        .map(|line| serde_json::from_str(line["payload"].as_str().unwrap()).unwrap())
        .collect()
}

/// An update that leaves the TOASTed body unchanged carries the placeholder: the event sees
/// the stored body, the body rule does not fire, and a later real change of the body reports
/// the real previous text (the placeholder was never stored).
#[test]
fn placeholders_take_the_stored_value_and_fire_nothing() {
    let body = "a long body ".repeat(200);
    let events = replay(&[
        change(
            0,
            "c",
            json!({"id": 1, "status": "draft", "body": body, "tags": ["a", "b"]}),
        ),
        change(
            1,
            "u",
            json!({"id": 1, "status": "published", "body": TOASTED, "tags": [TOASTED]}),
        ),
        change(
            2,
            "u",
            json!({"id": 1, "status": "published", "body": "short now", "tags": ["a"]}),
        ),
    ]);
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["DocStatusChanged", "DocBodyChanged"], "{events:#?}");
    let status = &events[0];
    assert_eq!(status["data"]["body"], json!(body));
    assert_eq!(status["data"]["tags"], json!(["a", "b"]));
    assert!(status.get("unavailablefields").is_none(), "{status}");
    assert_eq!(events[1]["data"]["from"], json!(body));
    assert_eq!(events[1]["data"]["to"], json!("short now"));
    for event in &events {
        assert!(!event.to_string().contains(TOASTED), "{event}");
    }
}

/// Without a stored value (the first change cdcflow sees of the entity), the field is absent
/// for the rules and the event names it in `unavailablefields`; bytea's base64 form counts.
#[test]
fn placeholders_without_a_stored_value_are_absent_and_named() {
    let events = replay(&[
        change(0, "r", json!({"id": 2, "status": "draft", "tags": ["x"]})),
        change(
            1,
            "u",
            json!({"id": 2, "status": "published", "body": TOASTED_BYTES, "tags": [TOASTED]}),
        ),
    ]);
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event["type"], "DocStatusChanged");
    assert_eq!(event["data"]["body"], Value::Null);
    assert_eq!(event["data"]["tags"], json!(["x"]));
    assert_eq!(event["unavailablefields"], "body");
}
