//! A three-stage chain on the real broker, each stage its own `cdcflow run` with exactly-once:
//! order changes -> OrderPaid -> ShipmentRequested -> CustomerNotified. The middle stage is
//! killed with SIGKILL while it works and started again; every final event comes out once,
//! and its causation and correlation ids link back, stage by stage, to the OrderPaid.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kafka_support::*;
use serde_json::{Value, json};

const ORDERS: u64 = 300;

/// One stage's config: `input` read in `format`, one rule writing `event_type` to `output`.
fn stage(
    dir: &Path,
    prefix: &str,
    name: &str,
    (input, format, version): (&str, &str, &str),
    (when, event_type, output, payload): (&str, &str, &str, &str),
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[state]
path = "{state}"

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}{name}"
instance_id = "{name}-1"
delivery = "exactly_once"
batch_max_records = 100
batch_max_wait = "50ms"
transaction_timeout = "10s"
shutdown_timeout = "15s"
consumer = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000" }}

[http]
listen = "127.0.0.1:0"

[[pipeline]]
name = "{name}"
topics = ["{prefix}{input}"]
format = "{format}"
dlq_topic = "{prefix}{name}.dlq"
{version}

[[pipeline.rule]]
name = "next"
when = "{when}"
event_type = "{event_type}"
topic = "{prefix}{output}"
payload = {payload}
"#,
            state = dir.join(format!("{name}.db")).display(),
            bootstrap = bootstrap(),
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_three_stage_chain_emits_every_final_event_once_across_a_kill_9() {
    let prefix = format!("{}.", unique("chain3"));
    let topics = ["orders", "paid", "shipments", "notifications"];
    let names: Vec<String> = topics
        .iter()
        .map(|topic| format!("{prefix}{topic}"))
        .collect();
    let mut to_create: Vec<(&str, i32)> = names.iter().map(|name| (name.as_str(), 3)).collect();
    let dlqs: Vec<String> = ["payments", "shipping", "notify"]
        .iter()
        .map(|name| format!("{prefix}{name}.dlq"))
        .collect();
    to_create.extend(dlqs.iter().map(|name| (name.as_str(), 1)));
    create_topics(&to_create);
    let dir = tempfile::tempdir().unwrap();
    let payments = stage(
        dir.path(),
        &prefix,
        "payments",
        (
            "orders",
            "flattened",
            "[pipeline.version]\nby = \"column\"\ncolumn = \"version\"",
        ),
        (
            "after.status == 'paid' && (old == null || old.status != 'paid')",
            "com.example.OrderPaid",
            "paid",
            r#"{ order_id = "after.id", total = "after.total" }"#,
        ),
    );
    let shipping = stage(
        dir.path(),
        &prefix,
        "shipping",
        ("paid", "cloudevents", ""),
        (
            "source.type == 'com.example.OrderPaid'",
            "com.example.ShipmentRequested",
            "shipments",
            r#"{ order_id = "after.order_id", paid_event = "source.id" }"#,
        ),
    );
    let notify = stage(
        dir.path(),
        &prefix,
        "notify",
        ("shipments", "cloudevents", ""),
        (
            "source.type == 'com.example.ShipmentRequested'",
            "com.example.CustomerNotified",
            "notifications",
            r#"{ order_id = "after.order_id" }"#,
        ),
    );
    let first = Service::start(&payments, &dir.path().join("payments.log"));
    let mut second = Service::start(&shipping, &dir.path().join("shipping-1.log"));
    let third = Service::start(&notify, &dir.path().join("notify.log"));
    // Each order is created, then paid; a few payments are sent twice (a redelivery).
    let mut records = Vec::new();
    for (status, version) in [("pending", 1), ("paid", 2)] {
        for id in 0..ORDERS {
            let value = json!({"id": id, "status": status, "total": 10 + id, "version": version});
            records.push((
                names[0].clone(),
                Some(format!("{{\"id\":{id}}}").into_bytes()),
                Some(value.to_string().into_bytes()),
            ));
        }
    }
    records.extend(records[ORDERS as usize..ORDERS as usize + 20].to_vec());
    let feeding = produce_paced(records, 400);
    // SIGKILL the middle stage once it has written part of its events.
    wait_until("some shipments", Duration::from_secs(120), || {
        read_topic(&names[2], "read_uncommitted", 1_000).len() >= 60
    });
    second.child.kill().unwrap();
    let _ = second.child.wait();
    feeding.join().unwrap();
    let second = Service::start(&shipping, &dir.path().join("shipping-2.log"));
    let notifications = wait_for(&names[3], ORDERS as usize, Duration::from_secs(180));
    // Time for a wrong extra event to show up.
    std::thread::sleep(Duration::from_secs(3));
    let notifications_again = read_topic(&names[3], "read_committed", 3_000);
    let shipments = read_topic(&names[2], "read_committed", 3_000);
    let paid = read_topic(&names[1], "read_committed", 3_000);
    for service in [first, second, third] {
        assert!(service.stop(Duration::from_secs(30)).success());
    }
    assert_eq!(paid.len(), ORDERS as usize, "OrderPaid once per order");
    assert_eq!(
        shipments.len(),
        ORDERS as usize,
        "ShipmentRequested once per order"
    );
    assert_eq!(notifications.len(), ORDERS as usize);
    assert_eq!(
        notifications_again.len(),
        ORDERS as usize,
        "no final event twice"
    );
    let by_id = |records: &[ReadRecord]| -> BTreeMap<String, Value> {
        records
            .iter()
            .map(|record| {
                let event = record.json();
                (event["id"].as_str().unwrap().to_owned(), event)
            })
            .collect()
    };
    let (paid, shipments) = (by_id(&paid), by_id(&shipments));
    let mut orders = BTreeSet::new();
    for record in &notifications_again {
        let notified = record.json();
        let shipment = &shipments[notified["causationid"].as_str().unwrap()];
        let payment = &paid[shipment["causationid"].as_str().unwrap()];
        assert_eq!(notified["type"], "com.example.CustomerNotified");
        assert_eq!(shipment["type"], "com.example.ShipmentRequested");
        assert_eq!(payment["type"], "com.example.OrderPaid");
        // The chain's correlation id is the OrderPaid's id, carried along.
        assert_eq!(shipment["correlationid"], payment["id"]);
        assert_eq!(notified["correlationid"], payment["id"]);
        assert_eq!(shipment["data"]["paid_event"], payment["id"]);
        // Every stage keeps the order as subject and Kafka key.
        let order = payment["data"]["order_id"].as_u64().unwrap();
        assert_eq!(notified["data"]["order_id"], order);
        assert_eq!(notified["subject"], payment["subject"]);
        assert_eq!(record.key, payment["subject"].as_str().unwrap());
        orders.insert(order);
    }
    assert_eq!(orders, (0..ORDERS).collect::<BTreeSet<_>>());
    for dlq in &dlqs {
        assert!(read_topic(dlq, "read_committed", 1_000).is_empty(), "{dlq}");
    }
}
