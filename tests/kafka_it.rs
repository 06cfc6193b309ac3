//! `cdcflow run` against a real Apache Kafka broker (KRaft, single node, started by
//! tests/run-all.sh). Every test uses fresh topics and a fresh group, reads outputs back with
//! Kafka's Java console consumer (read_committed); the exactly-once tests end by checking
//! that no transaction is left hanging.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kafka_support::*;
use serde_json::{Value, json};

/// A bad record: the DLQ reason it must get, its key and its value.
type BadRecord<'a> = (&'a str, Option<Vec<u8>>, Option<Vec<u8>>);

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
    // Once the group has committed every input record, the redeliveries and the re-snapshot
    // are processed: nothing more may have appeared.
    let group = scenario.group();
    for input in ["shop.public.orders", "shop.public.customers"] {
        wait_caught_up(&group, &scenario.topic(input), Duration::from_secs(60));
    }
    let actual_after = read_events(&scenario, 8, 5);
    assert!(service.stop(Duration::from_secs(30)).success());
    assert_eq!(
        actual_after.len(),
        actual.len(),
        "redeliveries produced events"
    );
    assert_exactly(&actual_after, &expected);
    let changelog = read_topic(
        &format!("{group}.orders.changelog"),
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

/// SIGTERM mid-stream finishes the batch, commits and exits 0; a restart finishes the
/// stream: nothing lost, nothing twice.
#[test]
fn graceful_shutdown_mid_stream_loses_and_repeats_nothing() {
    let scenario = Scenario::new("sigterm", "exactly_once", 3);
    let input = scenario.topic("shop.public.orders");
    let records = generated_orders(&input, 300, 6_000);
    let expected = expected_events(&scenario.config, &records);
    let offsets = GroupOffsets::new(&scenario.group(), &input);
    // A backlog, then the rest streaming in (4.5 s) once the instance has its partitions, so
    // that the SIGTERM lands while records still arrive.
    let (backlog, stream) = records.split_at(1_500);
    produce(backlog);
    let service = scenario.start("run-1.log");
    service.wait_for_log(ASSIGNED, Duration::from_secs(60));
    let streaming = produce_paced(stream.to_vec(), 1_000);
    wait_until(
        "the group has committed more than 1,000 of the 6,000 records, but not all",
        Duration::from_secs(60),
        || {
            offsets
                .try_committed()
                .is_ok_and(|committed| (1_001..6_000).contains(&committed.values().sum::<i64>()))
        },
    );
    let status = service.stop(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exit status {status}");
    streaming.join().expect("input produced");
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

/// At-least-once: every expected event arrives, in order per entity (a repeat only as a
/// rewind to events already read), and every delivery carries the oracle's payload.
#[test]
fn at_least_once_delivers_every_event() {
    let scenario = Scenario::new("alo", "at_least_once", 3);
    let records = scenario.example_records();
    produce(&records);
    let expected = expected_events(&scenario.config, &records);
    let service = scenario.start("run.log");
    let read = read_event_records(&scenario, 8, 5);
    assert!(service.stop(Duration::from_secs(30)).success());
    let actual = events(&read);
    let actual_ids: BTreeSet<&String> = actual.iter().map(|(_, id, _)| id).collect();
    let expected_ids: BTreeSet<&String> = expected.iter().map(|(_, id, _)| id).collect();
    assert_eq!(actual_ids, expected_ids);
    assert_order_per_entity(&actual, &expected);
    assert_payloads(&read, &expected_event_data(&scenario.config, &records));
}
