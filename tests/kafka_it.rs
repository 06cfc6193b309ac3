//! `cdcflow run` against a real Apache Kafka broker (KRaft, single node, started by
//! tests/run-all.sh). Every test uses fresh topics and a fresh group, reads outputs back with
//! Kafka's Java console consumer (read_committed), and ends by checking that no transaction is
//! left hanging.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use kafka_support::*;
use serde_json::{Value, json};

/// A bad record: the DLQ reason it must get, its key and its value.
type BadRecord<'a> = (&'a str, Option<Vec<u8>>, Option<Vec<u8>>);

/// Fresh topics, group, config file and state file for one test.
struct Scenario {
    prefix: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
}

impl Scenario {
    fn new(name: &str, delivery: &str, partitions: i32) -> Scenario {
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

    fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn example_records(&self) -> Vec<Record> {
        let mut records = kcat_records(&root().join("examples/input/orders.jsonl"), &self.prefix);
        records.extend(kcat_records(
            &root().join("examples/input/customers.jsonl"),
            &self.prefix,
        ));
        records
    }

    fn start(&self, log: &str) -> Service {
        Service::start(&self.config, &self.dir.path().join(log))
    }

    /// A config for another instance of the same group: its own instance id and state file.
    fn instance_config(&self, instance: &str) -> PathBuf {
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

fn order_topics(scenario: &Scenario) -> (String, String) {
    (
        scenario.topic("shop.order-events"),
        scenario.topic("shop.customer-events"),
    )
}

/// Waits for `expected` events on both event topics and returns what is there.
fn read_events(
    scenario: &Scenario,
    orders: usize,
    customers: usize,
) -> Vec<(String, String, String)> {
    let (order_topic, customer_topic) = order_topics(scenario);
    let mut all = events(&wait_for(&order_topic, orders, Duration::from_secs(90)));
    all.extend(events(&wait_for(
        &customer_topic,
        customers,
        Duration::from_secs(60),
    )));
    all
}

fn assert_exactly(actual: &[(String, String, String)], expected: &[(String, String, String)]) {
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

/// The example pipelines end to end: the exact expected business events, keyed by entity, in
/// order per entity, and the bad records in the DLQ.
#[test]
fn example_pipelines_end_to_end_exactly_once() {
    let scenario = Scenario::new("e2e", "exactly_once", 3);
    let records = scenario.example_records();
    produce(&records);
    let expected = expected_events(&scenario.config, &records);
    assert_eq!(expected.len(), 13);
    let service = scenario.start("run.log");
    let actual = read_events(&scenario, 8, 5);
    // The endpoint operators scrape and probe: counts of this run, alive, ready.
    let (status, metrics) = service.http_get("/metrics");
    assert_eq!(status, 200, "{metrics}");
    for line in [
        "cdcflow_events_total{pipeline=\"orders\",type=\"com.example.shop.OrderCreated\"} 3",
        "cdcflow_dlq_records_total{pipeline=\"orders\",reason=\"truncated_json\"} 1",
        "cdcflow_decisions_total{decision=\"duplicate\",pipeline=\"orders\"} 1",
        "cdcflow_skipped_records_total{pipeline=\"customers\",reason=\"tombstone\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in {metrics}"
        );
    }
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{name}` in {metrics}"))
    };
    let committed = sample("cdcflow_batches_total{result=\"committed\"}");
    assert!(committed >= 1.0);
    // Every committed batch was collected, processed and delivered once: no retries here.
    for phase in ["collect", "process", "deliver"] {
        let name = format!("cdcflow_batch_phase_seconds_count{{phase=\"{phase}\"}}");
        assert_eq!(sample(&name), committed, "{name}");
    }
    assert_eq!(service.http_get("/healthz").0, 200);
    assert_eq!(service.http_get("/readyz"), (200, "ready\n".to_owned()));
    let status = service.stop(Duration::from_secs(30));
    assert!(status.success(), "cdcflow exited with {status}");
    assert_exactly(&actual, &expected);
    let types: Vec<&str> = actual
        .iter()
        .filter(|(key, _, _)| key == "1001")
        .map(|(_, _, t)| t.as_str())
        .collect();
    assert_eq!(
        types,
        [
            "com.example.shop.OrderCreated",
            "com.example.shop.OrderPaid",
            "com.example.shop.OrderShipped"
        ]
    );
    let dlq = wait_for(&scenario.topic("dlq.orders"), 2, Duration::from_secs(30));
    let reasons: BTreeSet<&str> = dlq
        .iter()
        .map(|r| r.headers["cdcflow.error.reason"].as_str())
        .collect();
    assert_eq!(reasons, BTreeSet::from(["truncated_json", "unknown_op"]));
    for record in &dlq {
        assert_eq!(
            record.headers["cdcflow.origin.topic"],
            scenario.topic("shop.public.orders")
        );
        assert!(record.headers.contains_key("cdcflow.origin.offset"));
    }
    let (order_topic, customer_topic) = order_topics(&scenario);
    assert_no_hanging_transaction(&order_topic);
    assert_no_hanging_transaction(&customer_topic);
}

/// Debezium's redelivery after a restart (every record again) and a re-snapshot of every
/// entity: each event appears once and no state goes backwards.
#[test]
fn duplicates_stale_changes_and_resnapshot_emit_each_event_once() {
    let scenario = Scenario::new("dups", "exactly_once", 3);
    let mut records = scenario.example_records();
    let first_pass = records.clone();
    records.extend(first_pass.iter().cloned());
    records.extend(resnapshot(&first_pass));
    produce(&records);
    let expected = expected_events(&scenario.config, &first_pass);
    let service = scenario.start("run.log");
    let actual = read_events(&scenario, 8, 5);
    // Give the redeliveries time to be processed; nothing more may appear.
    std::thread::sleep(Duration::from_secs(3));
    let actual_after = read_events(&scenario, 8, 5);
    assert!(service.stop(Duration::from_secs(30)).success());
    assert_eq!(
        actual_after.len(),
        actual.len(),
        "redeliveries produced events"
    );
    assert_exactly(&actual_after, &expected);
    let changelog = read_topic(
        &format!("{}.orders.changelog", group_of(&scenario)),
        "read_committed",
        2_000,
    );
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for record in changelog {
        let version = record.json()["version"].as_str().unwrap().to_owned();
        if let Some(previous) = last.get(&record.key) {
            assert!(
                version > *previous,
                "version of {} went backwards",
                record.key
            );
        }
        last.insert(record.key.clone(), version);
    }
    assert_no_hanging_transaction(&order_topics(&scenario).0);
}

fn group_of(scenario: &Scenario) -> String {
    let text = std::fs::read_to_string(&scenario.config).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("group_id = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned()
}

/// A snapshot read (`op: r`) of every live order at a later position, with its current image.
fn resnapshot(records: &[Record]) -> Vec<Record> {
    let mut latest: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for (topic, key, value) in records {
        let (Some(key), Some(value)) = (key, value) else {
            continue;
        };
        let Ok(value) = serde_json::from_slice::<Value>(value) else {
            continue;
        };
        if !topic.ends_with("orders") || value.get("op").is_none() {
            continue;
        }
        latest.insert(
            String::from_utf8_lossy(key).into_owned(),
            (topic.clone(), value),
        );
    }
    latest
        .into_iter()
        .filter(|(_, (_, value))| value["op"] != "d" && value["after"].is_object())
        .map(|(key, (topic, mut value))| {
            value["op"] = json!("r");
            value["before"] = Value::Null;
            value["source"]["snapshot"] = json!("true");
            value["source"]["lsn"] = json!(99_000_000);
            value["source"]["sequence"] = json!("[null,\"99000000\"]");
            (
                topic,
                Some(key.into_bytes()),
                Some(value.to_string().into_bytes()),
            )
        })
        .collect()
}

/// Bad records of every kind land in the DLQ with reason and origin, and records after them
/// are processed.
#[test]
fn bad_records_go_to_the_dlq_and_processing_goes_on() {
    let scenario = Scenario::new("bad", "exactly_once", 1);
    let mut config = std::fs::read_to_string(&scenario.config).unwrap();
    config.push_str("\n[limits]\nmax_record_bytes = 100000\n");
    std::fs::write(&scenario.config, config).unwrap();
    let topic = scenario.topic("shop.public.orders");
    let key = |id: i64| Some(format!("{{\"id\":{id}}}").into_bytes());
    let good = |id: i64, lsn: u64| {
        let value = json!({"before": null, "after": {"id": id, "customer_id": 1, "status": "pending", "amount": "1.00"},
            "source": {"connector": "postgresql", "ts_ms": 1_700_000_000_000u64, "lsn": lsn,
                       "sequence": format!("[\"{}\",\"{lsn}\"]", lsn - 1), "txId": 1},
            "op": "c", "ts_ms": 1_700_000_000_000u64});
        Some(value.to_string().into_bytes())
    };
    let mut no_version: Value = serde_json::from_slice(&good(4, 10).unwrap()).unwrap();
    no_version["source"]
        .as_object_mut()
        .unwrap()
        .retain(|name, _| name == "connector");
    let bad: Vec<BadRecord<'_>> = vec![
        ("malformed_json", key(1), Some(b"{\"op\": c}".to_vec())),
        ("not_utf8", key(2), Some(b"{\"op\":\"c\xff\"}".to_vec())),
        (
            "truncated_json",
            key(3),
            Some(br#"{"before":null,"after":{"id":3,"#.to_vec()),
        ),
        (
            "wrong_type",
            key(5),
            Some(br#"{"op":"c","after":"row","source":{}}"#.to_vec()),
        ),
        ("missing_key", None, good(6, 20)),
        (
            "missing_version",
            key(4),
            Some(no_version.to_string().into_bytes()),
        ),
        (
            "unknown_op",
            key(7),
            Some(
                br#"{"op":"x","after":{"id":7},"source":{"connector":"postgresql","lsn":5}}"#
                    .to_vec(),
            ),
        ),
        (
            "nesting_too_deep",
            key(8),
            Some(format!("{}{}", "[".repeat(200), "]".repeat(200)).into_bytes()),
        ),
        (
            "record_too_large",
            key(9),
            Some(format!("{{\"pad\":\"{}\"}}", "x".repeat(200_000)).into_bytes()),
        ),
    ];
    let mut records: Vec<Record> = Vec::new();
    for (index, (_, key, value)) in bad.iter().enumerate() {
        records.push((topic.clone(), key.clone(), value.clone()));
        records.push((
            topic.clone(),
            Some(format!("{{\"id\":{}}}", 100 + index).into_bytes()),
            good(100 + index as i64, 1_000 + index as u64),
        ));
    }
    produce(&records);
    let service = scenario.start("run.log");
    let dlq = wait_for(
        &scenario.topic("dlq.orders"),
        bad.len(),
        Duration::from_secs(90),
    );
    let created = wait_for(
        &order_topics(&scenario).0,
        bad.len(),
        Duration::from_secs(60),
    );
    assert!(service.stop(Duration::from_secs(30)).success());
    let reasons: Vec<&str> = dlq
        .iter()
        .map(|r| r.headers["cdcflow.error.reason"].as_str())
        .collect();
    let expected: Vec<&str> = bad.iter().map(|(reason, _, _)| *reason).collect();
    assert_eq!(
        reasons, expected,
        "one DLQ record per bad record, in order, with its reason"
    );
    for (index, record) in dlq.iter().enumerate() {
        assert_eq!(
            record.headers["cdcflow.origin.offset"],
            (2 * index).to_string()
        );
        assert_eq!(record.headers["cdcflow.origin.topic"], topic);
        assert!(!record.headers["cdcflow.error.message"].is_empty());
    }
    assert_eq!(
        created.len(),
        bad.len(),
        "every good record after a bad one was processed"
    );
    assert_no_hanging_transaction(&order_topics(&scenario).0);
}

/// Outputs the broker refuses for their size (topics with a `max.message.bytes` below
/// `limits.max_output_bytes`): the batch is aborted, the record goes to the DLQ with
/// `output_refused` (without its original value when the DLQ topic refuses that too), and
/// every other record is processed exactly once.
#[test]
fn outputs_refused_by_the_broker_go_to_the_dlq() {
    let scenario = Scenario::new("refused", "exactly_once", 1);
    let events_topic = scenario.topic("shop.customer-events");
    let dlq_topic = scenario.topic("dlq.customers");
    create_topics_with_configs(&[
        (&events_topic, 1, &[("max.message.bytes", "4096")]),
        (&dlq_topic, 1, &[("max.message.bytes", "12000")]),
    ]);
    let records = scenario.example_records();
    let customer_topic = scenario.topic("shop.public.customers");
    let template = records
        .iter()
        .find(|(topic, _, value)| {
            *topic == customer_topic
                && value
                    .as_deref()
                    .is_some_and(|v| String::from_utf8_lossy(v).contains("alan@example.com"))
        })
        .cloned()
        .expect("the example creates customer 8");
    // Customer 20's event (~5 KB) is over the event topic's limit, its DLQ record (~8 KB)
    // is not; customer 21's DLQ record (~13 KB) is over the DLQ topic's limit too.
    let oversized = |id: u64, email_bytes: usize| -> Record {
        let text = |bytes: &Option<Vec<u8>>| String::from_utf8(bytes.clone().unwrap()).unwrap();
        let email = format!("{}@example.com", "a".repeat(email_bytes));
        (
            customer_topic.clone(),
            Some(
                text(&template.1)
                    .replace("\"id\":8}", &format!("\"id\":{id}}}"))
                    .into_bytes(),
            ),
            Some(
                text(&template.2)
                    .replace("\"id\":8,", &format!("\"id\":{id},"))
                    .replace("alan@example.com", &email)
                    .into_bytes(),
            ),
        )
    };
    let refused = [oversized(20, 4_500), oversized(21, 9_000)];
    let (orders, customers): (Vec<Record>, Vec<Record>) = records
        .into_iter()
        .partition(|(topic, _, _)| *topic != customer_topic);
    let mut input = orders;
    let mut customer_input = customers.clone();
    customer_input.insert(1, refused[0].clone());
    customer_input.insert(3, refused[1].clone());
    let refused_offsets = ["1", "3"];
    input.extend(customer_input);
    produce(&input);
    let mut oracle_input = input.clone();
    oracle_input.retain(|record| !refused.contains(record));
    let expected = expected_events(&scenario.config, &oracle_input);

    let service = scenario.start("run.log");
    let dlq = wait_for(&dlq_topic, 2, Duration::from_secs(90));
    let actual = read_events(&scenario, 8, 5);
    let status = service.stop(Duration::from_secs(30));
    assert!(status.success(), "cdcflow exited with {status}");
    assert_exactly(&actual, &expected);
    assert_eq!(dlq.len(), 2, "{dlq:#?}");
    for (record, offset) in dlq.iter().zip(refused_offsets) {
        assert_eq!(record.headers["cdcflow.error.reason"], "output_refused");
        assert_eq!(record.headers["cdcflow.error.stage"], "output");
        assert_eq!(record.headers["cdcflow.origin.offset"], offset);
        assert!(
            record.headers["cdcflow.error.message"].contains(&events_topic),
            "{:?}",
            record.headers
        );
    }
    assert_eq!(
        dlq[0].value.as_bytes(),
        refused[0].2.as_deref().unwrap(),
        "the first dead letter keeps the original value"
    );
    assert_eq!(dlq[1].value, "null", "the second dead letter drops it");
    assert!(dlq[1].headers.contains_key("cdcflow.value.dropped"));
    let log = std::fs::read_to_string(scenario.dir.path().join("run.log")).unwrap();
    assert!(log.contains("refused"), "the refusal is logged: {log}");
    assert_no_hanging_transaction(&events_topic);
}

/// Deleting the local SQLite store between runs loses nothing: state comes back from the
/// changelog, transitions after the restart see the old image, nothing is emitted twice.
#[test]
fn restart_with_the_store_deleted_restores_from_the_changelog() {
    let scenario = Scenario::new("restore", "exactly_once", 3);
    let records = scenario.example_records();
    let (first, second) = records.split_at(4);
    produce(first);
    let service = scenario.start("run-1.log");
    // Orders 1000 (snapshot), 1001 and 1002 created: two OrderCreated events.
    wait_for(&order_topics(&scenario).0, 2, Duration::from_secs(60));
    assert!(service.stop(Duration::from_secs(30)).success());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", scenario.state.display()));
    }
    produce(second);
    let service = scenario.start("run-2.log");
    let actual = read_events(&scenario, 8, 5);
    let log = service.log_text();
    assert!(service.stop(Duration::from_secs(30)).success());
    assert!(log.contains("restored changelog"), "{log}");
    assert_exactly(&actual, &expected_events(&scenario.config, &records));
    assert_no_hanging_transaction(&order_topics(&scenario).0);
}

/// Generated order changes: `entities` orders, `records` changes in all, statuses moving on.
fn generated_orders(topic: &str, entities: u64, records: u64) -> Vec<Record> {
    const STATUSES: [&str; 4] = ["pending", "paid", "shipped", "cancelled"];
    let mut steps = vec![0usize; entities as usize];
    (0..records)
        .map(|index| {
            let id = index % entities;
            let step = steps[id as usize];
            steps[id as usize] += 1;
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

/// SIGTERM mid-stream finishes the batch, commits and exits 0; a restart finishes the
/// stream: nothing lost, nothing twice.
#[test]
fn graceful_shutdown_mid_stream_loses_and_repeats_nothing() {
    let scenario = Scenario::new("sigterm", "exactly_once", 3);
    let records = generated_orders(&scenario.topic("shop.public.orders"), 300, 6_000);
    let expected = expected_events(&scenario.config, &records);
    produce(&records);
    let service = scenario.start("run-1.log");
    std::thread::sleep(Duration::from_secs(4));
    let status = service.stop(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exit status {status}");
    let service = scenario.start("run-2.log");
    let actual = events(&wait_for(
        &order_topics(&scenario).0,
        expected.len(),
        Duration::from_secs(120),
    ));
    assert!(service.stop(Duration::from_secs(30)).success());
    assert_exactly(&actual, &expected);
    assert_no_hanging_transaction(&order_topics(&scenario).0);
}

/// At-least-once: every expected event arrives, and any repeat carries the same id and
/// payload.
#[test]
fn at_least_once_delivers_every_event() {
    let scenario = Scenario::new("alo", "at_least_once", 3);
    let records = scenario.example_records();
    produce(&records);
    let expected = expected_events(&scenario.config, &records);
    let service = scenario.start("run.log");
    let actual = read_events(&scenario, 8, 5);
    assert!(service.stop(Duration::from_secs(30)).success());
    let actual_ids: BTreeSet<&String> = actual.iter().map(|(_, id, _)| id).collect();
    let expected_ids: BTreeSet<&String> = expected.iter().map(|(_, id, _)| id).collect();
    assert_eq!(actual_ids, expected_ids);
}

/// kill -9 at random moments while 50,000 records stream through, with restarts: a
/// read_committed reader sees every expected event exactly once, in order per entity, while a
/// read_uncommitted reader sees the aborted repeats the kills left behind.
#[test]
fn crash_test_exactly_once_under_kill_9() {
    let scenario = Scenario::new("crash", "exactly_once", 3);
    // Batches that wait at most 5 ms for input keep a transaction open most of the time.
    let config = std::fs::read_to_string(&scenario.config).unwrap();
    assert!(config.contains("batch_max_wait = \"50ms\""));
    std::fs::write(
        &scenario.config,
        config.replace("batch_max_wait = \"50ms\"", "batch_max_wait = \"5ms\""),
    )
    .unwrap();
    let records = generated_orders(&scenario.topic("shop.public.orders"), 2_000, 50_000);
    let expected = expected_events(&scenario.config, &records);
    let topic = order_topics(&scenario).0;
    // The input streams in over the five rounds (about 20 s), so every round has work.
    let streaming = produce_paced(records, 2_500);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut inside = 0;
    for round in 0..5 {
        let service = scenario.start(&format!("run-{round}.log"));
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Start-up and restore take a few seconds; kill somewhere in the processing after.
        std::thread::sleep(Duration::from_millis(2_500 + seed % 2_000));
        if round % 2 == 0 {
            service.kill();
        } else if kill_inside_transaction(service, &topic, Duration::from_secs(10)) {
            // A batch commits in milliseconds, so a blind kill mostly lands between
            // transactions; every other round aims at an open one.
            inside += 1;
        }
    }
    eprintln!("{inside} of 2 aimed kills landed inside a transaction");
    streaming.join().expect("input produced");
    let service = scenario.start("run-final.log");
    let committed = events(&wait_for(&topic, expected.len(), Duration::from_secs(240)));
    assert!(service.stop(Duration::from_secs(30)).success());
    assert_exactly(&committed, &expected);
    let uncommitted = read_topic(&topic, "read_uncommitted", 3_000);
    assert!(
        uncommitted.len() > committed.len(),
        "read_uncommitted sees {} records, read_committed {}: no kill landed inside a transaction",
        uncommitted.len(),
        committed.len()
    );
    assert_no_hanging_transaction(&topic);
}

/// Three instances in one group over a 12-partition input: one is killed mid-stream, later
/// another joins. No event is lost or duplicated, and transitions of entities whose partitions
/// moved carry the right "from" status (state moved with the partition).
#[test]
fn scale_out_and_failover_move_state_with_partitions() {
    let scenario = Scenario::new("scale", "exactly_once", 12);
    let topic = scenario.topic("shop.public.orders");
    let records = generated_orders(&topic, 600, 24_000);
    let expected = expected_events(&scenario.config, &records);
    let (first, rest) = records.split_at(8_000);
    produce(first);
    let a = scenario.start("a.log");
    let b = Service::start(
        &scenario.instance_config("b"),
        &scenario.dir.path().join("b.log"),
    );
    let c = Service::start(
        &scenario.instance_config("c"),
        &scenario.dir.path().join("c.log"),
    );
    std::thread::sleep(Duration::from_secs(8));
    produce(&rest[..8_000]);
    std::thread::sleep(Duration::from_secs(2));
    b.kill();
    produce(&rest[8_000..]);
    std::thread::sleep(Duration::from_secs(6));
    let d = Service::start(
        &scenario.instance_config("d"),
        &scenario.dir.path().join("d.log"),
    );
    let output = order_topics(&scenario).0;
    let actual = events(&wait_for(&output, expected.len(), Duration::from_secs(180)));
    for service in [a, c, d] {
        assert!(service.stop(Duration::from_secs(40)).success());
    }
    assert_exactly(&actual, &expected);
    assert_no_hanging_transaction(&output);
}

/// An instance stopped (SIGSTOP) past its session timeout while the others take its
/// partitions, then resumed (SIGCONT), commits nothing of what it had: the output stays exact.
#[test]
fn zombie_instance_is_fenced_and_output_stays_exact() {
    let scenario = Scenario::new("zombie", "exactly_once", 6);
    let topic = scenario.topic("shop.public.orders");
    let records = generated_orders(&topic, 300, 12_000);
    let expected = expected_events(&scenario.config, &records);
    produce(&records[..4_000]);
    let zombie = scenario.start("zombie.log");
    let other = Service::start(
        &scenario.instance_config("b"),
        &scenario.dir.path().join("b.log"),
    );
    std::thread::sleep(Duration::from_secs(8));
    produce(&records[4_000..]);
    zombie.signal("STOP");
    // Past the session timeout (6 s): the group moves the zombie's partitions to `other`.
    std::thread::sleep(Duration::from_secs(12));
    zombie.signal("CONT");
    let output = order_topics(&scenario).0;
    let actual = events(&wait_for(&output, expected.len(), Duration::from_secs(180)));
    std::thread::sleep(Duration::from_secs(5));
    let after = events(&read_topic(&output, "read_committed", 3_000));
    let zombie_log = zombie.log_text();
    let other_log = other.log_text();
    let _ = zombie.stop(Duration::from_secs(40));
    assert!(other.stop(Duration::from_secs(40)).success());
    eprintln!("other instance's log:\n{other_log}");
    // The zombie lost its partitions (or its producer was fenced) while it was stopped.
    assert!(
        zombie_log.contains("partitions revoked") || zombie_log.contains("fenced"),
        "the zombie never noticed it lost its partitions:\n{zombie_log}"
    );
    eprintln!("zombie log:\n{zombie_log}");
    assert_eq!(
        after.len(),
        actual.len(),
        "the zombie committed more events after it resumed"
    );
    if per_entity(&after) != per_entity(&expected) {
        let present: BTreeSet<&String> = after.iter().map(|(_, id, _)| id).collect();
        let origins = expected_origins(&scenario.config, &records);
        let mut missing: Vec<usize> = expected
            .iter()
            .filter(|(_, id, _)| !present.contains(id))
            .filter_map(|(_, id, _)| origins.get(id).copied())
            .collect();
        missing.sort_unstable();
        eprintln!("input records behind missing events: {missing:?}");
    }
    assert_exactly(&after, &expected);
    assert_no_hanging_transaction(&output);
}

/// kill -9 at random moments in at-least-once mode: every expected event id appears at least
/// once, and every repeat carries the same id and the same payload.
#[test]
fn crash_test_at_least_once_repeats_carry_the_same_id_and_payload() {
    let scenario = Scenario::new("crash-alo", "at_least_once", 3);
    let records = generated_orders(&scenario.topic("shop.public.orders"), 1_000, 20_000);
    let expected = expected_events(&scenario.config, &records);
    produce(&records);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..5 {
        let service = scenario.start(&format!("run-{round}.log"));
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(3_000 + seed % 2_000));
        service.kill();
    }
    let service = scenario.start("run-final.log");
    let topic = order_topics(&scenario).0;
    let read = wait_for(&topic, expected.len(), Duration::from_secs(180));
    // Let the last instance finish; repeats may keep arriving until it has caught up.
    std::thread::sleep(Duration::from_secs(5));
    let read = if read.len() < expected.len() {
        read
    } else {
        read_topic(&topic, "read_committed", 3_000)
    };
    assert!(service.stop(Duration::from_secs(30)).success());
    let mut payloads: BTreeMap<String, String> = BTreeMap::new();
    for record in &read {
        let event = record.json();
        let id = event["id"].as_str().unwrap().to_owned();
        let body = event.to_string();
        if let Some(first) = payloads.get(&id) {
            assert_eq!(
                *first, body,
                "a repeat of {id} differs from its first delivery"
            );
        } else {
            payloads.insert(id, body);
        }
    }
    let expected_ids: BTreeSet<&String> = expected.iter().map(|(_, id, _)| id).collect();
    let actual_ids: BTreeSet<&String> = payloads.keys().collect();
    assert_eq!(
        actual_ids, expected_ids,
        "an expected event is missing (or an unexpected one appeared)"
    );
}
