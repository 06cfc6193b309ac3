//! Helpers shared by the integration tests: building Debezium records and compiled pipelines.
#![allow(dead_code, unreachable_pub)]

use cdcflow::cdc::RawRecord;
use cdcflow::config::{Config, TopicRoute};
use cdcflow::engine::Pipeline;
use serde_json::{Value, json};

pub const ORDERS_TOPIC: &str = "shop.public.orders";

/// A test config: one `orders` pipeline with created / status-changed / deleted rules.
pub const ORDERS_CONFIG: &str = r#"
[[pipeline]]
name = "orders"
topics = ["shop.public.orders"]
audit_topic = "audit"

[[pipeline.rule]]
name = "created"
when = "op == 'c'"
event_type = "OrderCreated"
topic = "events"
payload = { id = "after.id", status = "after.status" }

[[pipeline.rule]]
name = "status_changed"
when = "op == 'u' && old != null && 'status' in changed"
event_type = "OrderStatusChanged"
topic = "events"
payload = { id = "after.id", from = "old.status", to = "after.status" }

[[pipeline.rule]]
name = "deleted"
when = "op == 'd'"
event_type = "OrderDeleted"
topic = "events"
"#;

pub fn pipelines(config: &str) -> Vec<(TopicRoute, Pipeline)> {
    Config::parse(config, "test", Vec::new())
        .expect("test config is valid")
        .build_pipelines()
        .expect("test pipelines compile")
}

/// A Debezium Postgres envelope (no schema wrapper) for an order row at `lsn`.
pub fn order_change(op: &str, id: i64, status: Option<&str>, lsn: u64) -> Value {
    let row = status.map(|status| json!({"id": id, "status": status, "amount": "10.00"}));
    let (before, after) = match op {
        "d" => (
            Some(json!({"id": id, "status": null, "amount": null})),
            None,
        ),
        _ => (None, row),
    };
    json!({
        "before": before,
        "after": after,
        "source": {
            "version": "2.7.3.Final", "connector": "postgresql", "name": "shop",
            "ts_ms": 1_700_000_000_000u64 + lsn, "snapshot": "false", "db": "shop",
            "sequence": format!("[\"{}\",\"{}\"]", lsn - 1, lsn),
            "schema": "public", "table": "orders", "txId": 500 + lsn, "lsn": lsn, "xmin": null
        },
        "op": op,
        "ts_ms": 1_700_000_000_100u64 + lsn,
        "transaction": null
    })
}

pub fn record(topic: &str, offset: i64, key: Option<Value>, value: Option<&Value>) -> RawRecord {
    RawRecord {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        key: key.map(|key| key.to_string().into_bytes()),
        value: value.map(|value| value.to_string().into_bytes()),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

pub fn raw_record(topic: &str, offset: i64, key: Option<&[u8]>, value: Option<&[u8]>) -> RawRecord {
    RawRecord {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        key: key.map(<[u8]>::to_vec),
        value: value.map(<[u8]>::to_vec),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

/// The JSON value of an output record.
pub fn output_json(value: &Option<Vec<u8>>) -> Value {
    serde_json::from_slice(value.as_deref().expect("output has a value")).expect("output is JSON")
}
