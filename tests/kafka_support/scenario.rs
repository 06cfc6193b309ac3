//! One test's world: fresh topics, group, config and state, the shop example's pipelines, and
//! generated order changes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use super::*;

/// Fresh topics, group, config file and state file for one test.
pub struct Scenario {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
}

impl Scenario {
    pub fn new(name: &str, delivery: &str, partitions: i32) -> Scenario {
        let prefix = format!("{}.", unique(name));
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.db");
        let config = dir.path().join("cdcflow.toml");
        let group = unique(&format!("{name}-group"));
        std::fs::write(&config, shop_config(&prefix, &group, "a", delivery, &state)).unwrap();
        create_topics(&[
            (&format!("{prefix}shop.public.orders"), partitions),
            (&format!("{prefix}shop.public.customers"), partitions),
        ]);
        Scenario {
            prefix,
            dir,
            config,
            state,
        }
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn example_records(&self) -> Vec<Record> {
        let mut records = kcat_records(&root().join("examples/input/orders.jsonl"), &self.prefix);
        records.extend(kcat_records(
            &root().join("examples/input/customers.jsonl"),
            &self.prefix,
        ));
        records
    }

    pub fn start(&self, log: &str) -> Service {
        Service::start(&self.config, &self.dir.path().join(log))
    }

    /// Another instance of the group, logging to `<instance>.log`.
    pub fn start_instance(&self, instance: &str) -> Service {
        Service::start(
            &self.instance_config(instance),
            &self.dir.path().join(format!("{instance}.log")),
        )
    }

    pub fn group(&self) -> String {
        group_of(&self.config)
    }

    /// A config for another instance of the same group: its own instance id and state file.
    pub fn instance_config(&self, instance: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let state = self.dir.path().join(format!("state-{instance}.db"));
        let text = text
            .replace(
                "instance_id = \"a\"",
                &format!("instance_id = \"{instance}\""),
            )
            .replace(
                &self.state.display().to_string(),
                &state.display().to_string(),
            );
        let path = self.dir.path().join(format!("cdcflow-{instance}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }
}

pub fn order_topics(scenario: &Scenario) -> (String, String) {
    (
        scenario.topic("shop.order-events"),
        scenario.topic("shop.customer-events"),
    )
}

/// Waits for `orders` and `customers` events on the two event topics and returns the records
/// there.
pub fn read_event_records(scenario: &Scenario, orders: usize, customers: usize) -> Vec<ReadRecord> {
    let (order_topic, customer_topic) = order_topics(scenario);
    let mut all = wait_for(&order_topic, orders, Duration::from_secs(90));
    all.extend(wait_for(
        &customer_topic,
        customers,
        Duration::from_secs(60),
    ));
    all
}

/// Waits for `orders` and `customers` events on the two event topics and returns what is there.
pub fn read_events(
    scenario: &Scenario,
    orders: usize,
    customers: usize,
) -> Vec<(String, String, String)> {
    events(&read_event_records(scenario, orders, customers))
}

pub fn assert_exactly(actual: &[(String, String, String)], expected: &[(String, String, String)]) {
    let ids: Vec<&String> = actual.iter().map(|(_, id, _)| id).collect();
    let unique: BTreeSet<&String> = ids.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "an event id appears twice: {actual:#?}"
    );
    let (actual_ids, expected_ids): (BTreeSet<&String>, BTreeSet<&String>) = (
        actual.iter().map(|(_, id, _)| id).collect(),
        expected.iter().map(|(_, id, _)| id).collect(),
    );
    let missing: Vec<&(String, String, String)> = expected
        .iter()
        .filter(|(_, id, _)| !actual_ids.contains(id))
        .collect();
    let extra: Vec<&(String, String, String)> = actual
        .iter()
        .filter(|(_, id, _)| !expected_ids.contains(id))
        .collect();
    assert_eq!(
        per_entity(actual),
        per_entity(expected),
        "events per entity differ from the replay oracle: {} missing (first: {:?}), {} extra \
         (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(10)],
        extra.len(),
        &extra[..extra.len().min(10)]
    );
}

/// Generated order changes: `entities` orders, `records` changes in all, statuses moving on.
pub fn generated_orders(topic: &str, entities: u64, records: u64) -> Vec<Record> {
    order_changes(topic, 0, entities, records, 0)
}

/// Order changes of orders `first_id..first_id + entities`, `records` in all, round robin,
/// each order's status moving pending, paid, shipped, cancelled, again; positions start at
/// change number `first_change` (later batches of one stream continue the positions).
pub fn order_changes(
    topic: &str,
    first_id: u64,
    entities: u64,
    records: u64,
    first_change: u64,
) -> Vec<Record> {
    const STATUSES: [&str; 4] = ["pending", "paid", "shipped", "cancelled"];
    let mut steps = vec![0usize; entities as usize];
    (0..records)
        .map(|number| {
            let index = first_change + number;
            let slot = number % entities;
            let id = first_id + slot;
            let step = steps[slot as usize];
            steps[slot as usize] += 1;
            let lsn = 30_000_000 + index * 64;
            let value = json!({
                "before": null,
                "after": {"id": id, "customer_id": id % 7, "status": STATUSES[step % 4],
                          "amount": format!("{}.00", 10 + step), "created_at": "2024-11-25T09:58:00.000000Z"},
                "source": {"connector": "postgresql", "name": "shop", "ts_ms": 1_732_528_800_000u64 + index,
                           "snapshot": "false", "db": "shop", "schema": "public", "table": "orders",
                           "sequence": format!("[\"{}\",\"{lsn}\"]", lsn - 32), "txId": 5_000 + index, "lsn": lsn},
                "op": if step == 0 { "c" } else { "u" }, "ts_ms": 1_732_528_800_100u64 + index});
            (topic.to_owned(), Some(format!("{{\"id\":{id}}}").into_bytes()), Some(value.to_string().into_bytes()))
        })
        .collect()
}
