//! `cdcflow run` against a real Apache Kafka broker (KRaft, single node, started by
//! tests/run-all.sh). Every test uses fresh topics and a fresh group, reads outputs back with
//! Kafka's Java console consumer (read_committed), and ends by checking that no transaction is
//! left hanging.
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

/// The next number of a xorshift sequence: kill moments that differ per round, the same in
/// every run.
fn next_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Starts round `round` of a crash test and streams `chunk` (at `per_second`) once the
/// instance has its partitions. Returns when the instance has committed past where the group
/// stood then (it is really processing) and a random moment (0.2-1.7 s) more, while the chunk
/// still streams: the moment to kill it.
fn start_crash_round(
    scenario: &Scenario,
    round: usize,
    chunk: &[Record],
    per_second: usize,
    offsets: &GroupOffsets,
    seed: &mut u64,
) -> (Service, std::thread::JoinHandle<()>) {
    let service = scenario.start(&format!("run-{round}.log"));
    service.wait_for_log(ASSIGNED, Duration::from_secs(60));
    let start = offsets.committed().values().sum::<i64>();
    let streaming = produce_paced(chunk.to_vec(), per_second);
    offsets.wait_for_committed(start + 1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(200 + next_random(seed) % 1_500));
    (service, streaming)
}

/// kill -9 at random moments while 50,000 records (a few hundred of them bad) stream through,
/// with restarts: a read_committed reader sees every expected event exactly once, in order per
/// entity, with the oracle's payload, every bad record exactly once in the DLQ, and a changelog
/// that never writes a version twice and ends at each entity's last status; a read_uncommitted
/// reader sees the aborted repeats the kills left behind.
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
    let input = scenario.topic("shop.public.orders");
    let mut records = generated_orders(&input, 2_000, 50_000);
    // About every 200th change after the creations is cut short, under its entity's key: a
    // dead letter (truncated_json) between that entity's good changes. 197 is prime, so the
    // bad changes spread over many entities.
    let mut bad = 0;
    for record in records.iter_mut().skip(2_000).step_by(197) {
        record.2 = Some(br#"{"op":"#.to_vec());
        bad += 1;
    }
    let expected = expected_events(&scenario.config, &records);
    let expected_data = expected_event_data(&scenario.config, &records);
    let last_status = last_status_per_order(&records);
    let group = scenario.group();
    let offsets = GroupOffsets::new(&group, &input);
    let topic = order_topics(&scenario).0;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut inside = 0;
    // Each round streams a fifth of the input (4 s at 2,500 records/s), so every round has
    // work whatever its start-up took.
    for (round, chunk) in records.chunks(10_000).enumerate() {
        let (service, streaming) =
            start_crash_round(&scenario, round, chunk, 2_500, &offsets, &mut seed);
        if round % 2 == 0 {
            service.kill();
        } else if kill_inside_transaction(service, &topic, Duration::from_secs(10)) {
            // A batch commits in milliseconds, so a blind kill mostly lands between
            // transactions; every other round aims at an open one.
            inside += 1;
        }
        // The next chunk streams only after this one: one key's changes stay in order.
        streaming.join().expect("input produced");
    }
    eprintln!("{inside} of 2 aimed kills landed inside a transaction");
    let service = scenario.start("run-final.log");
    offsets.wait_caught_up(Duration::from_secs(240));
    let read = wait_for(&topic, expected.len(), Duration::from_secs(60));
    assert!(service.stop(Duration::from_secs(30)).success());
    let committed = events(&read);
    assert_exactly(&committed, &expected);
    assert_payloads(&read, &expected_data);
    let uncommitted = read_topic(&topic, "read_uncommitted", 3_000);
    assert!(
        uncommitted.len() > committed.len(),
        "read_uncommitted sees {} records, read_committed {}: no kill landed inside a transaction",
        uncommitted.len(),
        committed.len()
    );
    assert_dead_letters_exactly_once(&scenario.topic("dlq.orders"), &input, bad);
    assert_changelog_exact(&format!("{group}.orders.changelog"), &last_status);
    assert_no_hanging_transaction(&topic);
}

/// Order id -> the status of its last good change (a value that is no JSON is a dead letter).
fn last_status_per_order(records: &[Record]) -> BTreeMap<i64, String> {
    records
        .iter()
        .filter_map(|(_, _, value)| serde_json::from_slice::<Value>(value.as_deref()?).ok())
        .map(|change| {
            (
                change["after"]["id"].as_i64().unwrap(),
                change["after"]["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The DLQ (read_committed) holds one `truncated_json` dead letter per bad record of `input`:
/// no input position twice, `bad` in all.
fn assert_dead_letters_exactly_once(dlq_topic: &str, input: &str, bad: usize) {
    let dlq = read_topic(dlq_topic, "read_committed", 3_000);
    let mut origins = BTreeSet::new();
    for record in &dlq {
        let header = |name: &str| {
            record
                .headers
                .get(name)
                .unwrap_or_else(|| panic!("a dead letter without `{name}`: {:?}", record.headers))
                .as_str()
        };
        assert_eq!(header("cdcflow.error.reason"), "truncated_json");
        assert_eq!(header("cdcflow.origin.topic"), input);
        let origin = (
            header("cdcflow.origin.partition").to_owned(),
            header("cdcflow.origin.offset").to_owned(),
        );
        assert!(
            origins.insert(origin.clone()),
            "input record (partition, offset) {origin:?} is in the DLQ twice"
        );
    }
    assert_eq!(dlq.len(), bad, "one dead letter per bad input record");
}

/// The changelog (read_committed) writes strictly increasing versions per key (a version
/// written twice would be a state committed twice), and its last image per order has the
/// order's last status.
fn assert_changelog_exact(changelog_topic: &str, last_status: &BTreeMap<i64, String>) {
    let mut last: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for record in read_topic(changelog_topic, "read_committed", 3_000) {
        let state = record.json();
        let version = state["version"].as_str().unwrap().to_owned();
        if let Some((previous, _)) = last.get(&record.key) {
            assert!(
                version > *previous,
                "changelog key {}: version {version} after {previous}",
                record.key
            );
        }
        last.insert(record.key, (version, state["image"].clone()));
    }
    let changelog_status: BTreeMap<i64, String> = last
        .values()
        .map(|(_, image)| {
            (
                image["id"].as_i64().unwrap(),
                image["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let wrong: Vec<(&i64, &String, Option<&String>)> = last_status
        .iter()
        .filter(|(id, status)| changelog_status.get(id) != Some(status))
        .map(|(id, status)| (id, status, changelog_status.get(id)))
        .collect();
    assert!(
        wrong.is_empty() && changelog_status.len() == last_status.len(),
        "the changelog's last images differ from the last input: {} of {} orders wrong (order, \
         input status, changelog status; first: {:?}), {} orders in the changelog",
        wrong.len(),
        last_status.len(),
        &wrong[..wrong.len().min(10)],
        changelog_status.len()
    );
}

/// Three instances in one group over a 12-partition input: one is killed mid-stream and the
/// other two take over its partitions, later another joins and is given some. No event is
/// lost or duplicated, and every event carries the oracle's payload: transitions of entities
/// whose partitions moved carry the right "from" status (state moved with the partition).
#[test]
fn scale_out_and_failover_move_state_with_partitions() {
    let scenario = Scenario::new("scale", "exactly_once", 12);
    let topic = scenario.topic("shop.public.orders");
    let records = generated_orders(&topic, 600, 24_000);
    let expected = expected_events(&scenario.config, &records);
    let offsets = GroupOffsets::new(&scenario.group(), &topic);
    let (first, rest) = records.split_at(8_000);
    produce(first);
    let a = scenario.start("a.log");
    let b = scenario.start_instance("b");
    let c = scenario.start_instance("c");
    wait_until(
        "a, b and c all hold partitions",
        Duration::from_secs(90),
        || {
            [&a, &b, &c]
                .iter()
                .all(|service| !service.held_partitions().is_empty())
        },
    );
    offsets.wait_caught_up(Duration::from_secs(60));
    produce(&rest[..8_000]);
    offsets.wait_for_committed(10_000, Duration::from_secs(60));
    let held_by_b = b.held_partitions();
    let (a_seen, c_seen) = (a.assignments().len(), c.assignments().len());
    b.kill();
    produce(&rest[8_000..]);
    // Once b's session (6 s) has expired, the group hands b's partitions to a and c.
    wait_until(
        "a and c are assigned every partition b held",
        Duration::from_secs(60),
        || {
            let taken: BTreeSet<TopicPartition> = a
                .assignments()
                .into_iter()
                .skip(a_seen)
                .chain(c.assignments().into_iter().skip(c_seen))
                .flatten()
                .collect();
            held_by_b.is_subset(&taken)
        },
    );
    let d = scenario.start_instance("d");
    wait_until("d is assigned partitions", Duration::from_secs(60), || {
        d.assignments()
            .iter()
            .any(|partitions| !partitions.is_empty())
    });
    offsets.wait_caught_up(Duration::from_secs(180));
    let output = order_topics(&scenario).0;
    let read = wait_for(&output, expected.len(), Duration::from_secs(60));
    for service in [a, c, d] {
        assert!(service.stop(Duration::from_secs(40)).success());
    }
    assert_exactly(&events(&read), &expected);
    assert_payloads(&read, &expected_event_data(&scenario.config, &records));
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
    let offsets = GroupOffsets::new(&scenario.group(), &topic);
    produce(&records[..4_000]);
    let mut zombie = scenario.start("zombie.log");
    let other = scenario.start_instance("b");
    wait_until(
        "both instances hold partitions",
        Duration::from_secs(60),
        || !zombie.held_partitions().is_empty() && !other.held_partitions().is_empty(),
    );
    offsets.wait_caught_up(Duration::from_secs(60));
    // The rest streams in (4 s); the zombie is stopped in the middle of it.
    let streaming = produce_paced(records[4_000..].to_vec(), 2_000);
    offsets.wait_for_committed(4_500, Duration::from_secs(60));
    zombie.signal("STOP");
    let zombie_held = zombie.held_partitions();
    let other_seen = other.assignments().len();
    let noticed = |zombie: &Service| zombie.log_count(REVOKED) + zombie.log_count("fenced");
    let noticed_before = noticed(&zombie);
    // Only past the zombie's session timeout (6 s) does the group move its partitions to
    // `other`; the zombie stays stopped until then.
    wait_until(
        "the other instance is assigned every partition the zombie held",
        Duration::from_secs(30),
        || {
            let taken: BTreeSet<TopicPartition> = other
                .assignments()
                .into_iter()
                .skip(other_seen)
                .flatten()
                .collect();
            zombie_held.is_subset(&taken)
        },
    );
    zombie.signal("CONT");
    streaming.join().expect("input produced");
    let output = order_topics(&scenario).0;
    let actual = events(&wait_for(&output, expected.len(), Duration::from_secs(180)));
    // Resumed, the zombie learns it lost its partitions: it logs their revocation or its
    // fenced producer, or it stops.
    wait_until(
        "the resumed zombie notices it lost its partitions",
        Duration::from_secs(60),
        || noticed(&zombie) > noticed_before || !zombie.is_running(),
    );
    // Nothing more may appear once the group has committed every input record.
    offsets.wait_caught_up(Duration::from_secs(120));
    let after = events(&read_topic(&output, "read_committed", 3_000));
    let zombie_log = zombie.log_text();
    let other_log = other.log_text();
    let _ = zombie.stop(Duration::from_secs(40));
    assert!(other.stop(Duration::from_secs(40)).success());
    eprintln!("other instance's log:\n{other_log}");
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
/// once, in order per entity (a repeat only as a rewind to events already read), every repeat
/// carries the same id and the same payload, and every payload is the oracle's.
#[test]
fn crash_test_at_least_once_repeats_carry_the_same_id_and_payload() {
    let scenario = Scenario::new("crash-alo", "at_least_once", 3);
    let input = scenario.topic("shop.public.orders");
    let records = generated_orders(&input, 1_000, 20_000);
    let expected = expected_events(&scenario.config, &records);
    let offsets = GroupOffsets::new(&scenario.group(), &input);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    // Each round streams a fifth of the input (2.7 s at 1,500 records/s), so every round has
    // work whatever its start-up took.
    for (round, chunk) in records.chunks(4_000).enumerate() {
        let (service, streaming) =
            start_crash_round(&scenario, round, chunk, 1_500, &offsets, &mut seed);
        service.kill();
        // The next chunk streams only after this one: one key's changes stay in order.
        streaming.join().expect("input produced");
    }
    let service = scenario.start("run-final.log");
    // Repeats may keep arriving until the last instance has caught up.
    offsets.wait_caught_up(Duration::from_secs(180));
    let topic = order_topics(&scenario).0;
    let read = wait_for(&topic, expected.len(), Duration::from_secs(60));
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
    assert_order_per_entity(&events(&read), &expected);
    assert_payloads(&read, &expected_event_data(&scenario.config, &records));
}
