//! `cdcflow run` under rebalances and faults, against the real broker tests/run-all.sh starts:
//! partitions given back, topologies it must refuse, a changelog recreated behind the store,
//! a broker outage, a fenced instance, a panicking rule, and batches bounded by bytes. Each
//! test checks the business events exactly and their payloads against the replay oracle
//! (a lost previous image shows up as a wrong `from_status`).
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cdcflow::store::{SqliteStore, StateStore};
use kafka_support::*;
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);

/// The business events of the orders pipeline once `expected` are visible, as records.
fn read_order_events(scenario: &Scenario, expected: usize) -> Vec<ReadRecord> {
    wait_for(
        &scenario.topic("shop.order-events"),
        expected,
        Duration::from_secs(120),
    )
}

/// Events exact (each once, in order per entity) and payloads equal to the oracle's.
fn assert_events_and_payloads(read: &[ReadRecord], config: &Path, records: &[Record]) {
    assert_exactly(&events(read), &expected_events(config, records));
    assert_payloads(read, &expected_event_data(config, records));
}

/// Rewrites the scenario's config with `edit`.
fn edit_config(scenario: &Scenario, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&scenario.config).unwrap();
    std::fs::write(&scenario.config, edit(text)).unwrap();
}

/// Partitions taken away by a joining instance and given back when it leaves come back with
/// their state: the transitions the first instance emits afterwards carry the previous
/// images the other instance left (payloads checked, not only ids).
#[test]
fn partitions_given_back_to_the_same_instance_keep_their_state() {
    let scenario = Scenario::new("giveback", "exactly_once", 6);
    let topic = scenario.topic("shop.public.orders");
    let records = generated_orders(&topic, 300, 9_000);
    let offsets = GroupOffsets::new(&scenario.group(), &topic);
    produce(&records[..3_000]);
    let a = scenario.start("a.log");
    offsets.wait_for_committed(3_000, 2 * MINUTE);
    let b = scenario.start_instance("b");
    wait_until("b holds partitions", MINUTE, || {
        !b.held_partitions().is_empty()
    });
    let moved = b.held_partitions();
    produce(&records[3_000..6_000]);
    offsets.wait_for_committed(6_000, 2 * MINUTE);
    // b leaves the group: a gets b's partitions back, with the states b wrote.
    assert!(b.stop(Duration::from_secs(30)).success());
    wait_until("a holds b's partitions again", MINUTE, || {
        moved.is_subset(&a.held_partitions())
    });
    produce(&records[6_000..]);
    offsets.wait_caught_up(2 * MINUTE);
    let expected = expected_events(&scenario.config, &records);
    let read = read_order_events(&scenario, expected.len());
    let log = a.log_text();
    let assignments = a.assignments();
    assert!(a.stop(Duration::from_secs(30)).success());
    assert!(!moved.is_empty());
    for partition in &moved {
        let given = assignments
            .iter()
            .filter(|assigned| assigned.contains(partition))
            .count();
        assert!(
            given >= 2,
            "{partition:?} was not assigned to a twice (before and after b): {log}"
        );
    }
    assert_events_and_payloads(&read, &scenario.config, &records);
    assert_no_hanging_transaction(&scenario.topic("shop.order-events"));
}

/// A pipeline that identifies entities by `key_fields` over a multi-partition input is
/// refused at start with the reason and the fix; over a single partition it runs.
#[test]
fn key_fields_over_several_partitions_are_refused_at_start() {
    let scenario = Scenario::new("keyfields", "exactly_once", 3);
    edit_config(&scenario, |text| {
        text.replacen(
            "name = \"orders\"\n",
            "name = \"orders\"\nkey_fields = [\"id\"]\n",
            1,
        )
    });
    let mut service = scenario.start("refused.log");
    wait_until("cdcflow exits", MINUTE, || !service.is_running());
    let status = service.child.wait().unwrap();
    let log = service.log_text();
    assert!(!status.success(), "accepted: {log}");
    for part in [
        "pipeline `orders` identifies entities by key_fields [\"id\"]",
        "has 3 partitions",
        "Key the topic's records by the entity",
    ] {
        assert!(log.contains(part), "no `{part}` in: {log}");
    }

    let single = Scenario::new("keyfields-one", "exactly_once", 1);
    edit_config(&single, |text| {
        text.replacen(
            "name = \"orders\"\n",
            "name = \"orders\"\nkey_fields = [\"id\"]\n",
            1,
        )
    });
    let service = single.start("accepted.log");
    service.wait_for_log(ASSIGNED, MINUTE);
    assert!(service.stop(Duration::from_secs(30)).success());
}

/// A changelog deleted and recreated while an instance was away ends below that instance's
/// checkpoint: on its return it warns, re-reads the new changelog from the start, and its
/// transitions use the states another instance wrote there meanwhile.
#[test]
fn a_changelog_recreated_behind_the_checkpoint_is_read_again() {
    let scenario = Scenario::new("recreated", "exactly_once", 1);
    let topic = scenario.topic("shop.public.orders");
    let offsets = GroupOffsets::new(&scenario.group(), &topic);
    let changelog = format!("{}.orders.changelog", scenario.group());
    // a's history: many changelog records, so its checkpoint lies far beyond what the new
    // changelog will hold.
    let before = order_changes(&topic, 0, 300, 3_000, 0);
    produce(&before);
    let a = scenario.start("a-1.log");
    offsets.wait_caught_up(2 * MINUTE);
    assert!(a.stop(Duration::from_secs(30)).success());
    delete_topic(&changelog);
    // b (own, empty store) recreates the changelog and changes orders a never saw; then a
    // returns with its old store and those orders move on.
    let tail = order_changes(&topic, 1_000, 50, 300, 3_000);
    let (during, after) = tail.split_at(150);
    produce(during);
    let b = scenario.start_instance("b");
    offsets.wait_caught_up(2 * MINUTE);
    assert!(b.stop(Duration::from_secs(30)).success());
    produce(after);
    let a = scenario.start("a-2.log");
    let log = a.wait_for_log("re-reading it from the start", MINUTE);
    assert!(log.contains(&changelog), "{log}");
    offsets.wait_caught_up(2 * MINUTE);
    assert!(a.stop(Duration::from_secs(30)).success());
    // a's checkpoint now points into the new changelog; a checkpoint left in the old one's
    // future would make a later restore skip records the new one holds below it.
    let checkpoint = runtime().block_on(async {
        let store = SqliteStore::open(&scenario.state).await.unwrap();
        store.checkpoint(&changelog, 0).await.unwrap()
    });
    let end = end_offsets(&changelog)[&0];
    assert!(
        checkpoint.is_some_and(|offset| offset < end),
        "a's checkpoint {checkpoint:?} is not within the recreated changelog (end {end})"
    );
    // The events of orders 1000..1049: b's (from empty state) and a's after its return.
    let expected = expected_events(&scenario.config, &tail);
    let read: Vec<ReadRecord> = read_topic(
        &scenario.topic("shop.order-events"),
        "read_committed",
        3_000,
    )
    .into_iter()
    .filter(|record| {
        record.json()["data"]["order_id"]
            .as_u64()
            .is_some_and(|id| id >= 1_000)
    })
    .collect();
    assert_eq!(read.len(), expected.len(), "events of orders 1000..1049");
    assert_events_and_payloads(&read, &scenario.config, &tail);
}

/// Stops the shared broker (deploy/local/kafka.sh, same settings as tests/run-all.sh).
fn broker(command: &str) {
    let status = Command::new(root().join("deploy/local/kafka.sh"))
        .arg(command)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("kafka.sh runs");
    assert!(status.success(), "kafka.sh {command} failed");
}

/// The broker stopped for longer than the session timeout: `/readyz` turns false while no
/// broker answers and true again once the service is back in its group, and the output
/// stays exact across the outage.
#[test]
fn a_broker_outage_turns_readiness_off_and_on_and_output_stays_exact() {
    let scenario = Scenario::new("outage", "exactly_once", 3);
    let topic = scenario.topic("shop.public.orders");
    let records = generated_orders(&topic, 200, 4_000);
    let offsets = GroupOffsets::new(&scenario.group(), &topic);
    produce(&records[..2_000]);
    let service = scenario.start("run.log");
    offsets.wait_caught_up(2 * MINUTE);
    assert_eq!(service.http_get("/readyz").0, 200);
    broker("stop");
    // The outage lasts past the session timeout (6 s) whatever the waits below take.
    let outage = std::time::Instant::now();
    wait_until("/readyz turns false", Duration::from_secs(30), || {
        let (status, body) = service.http_get("/readyz");
        status != 200 && body.contains("broker")
    });
    let left = Duration::from_secs(10).saturating_sub(outage.elapsed());
    std::thread::sleep(left);
    broker("start");
    wait_until("/readyz turns true again", 2 * MINUTE, || {
        service.http_get("/readyz").0 == 200
    });
    produce(&records[2_000..]);
    offsets.wait_caught_up(2 * MINUTE);
    let expected = expected_events(&scenario.config, &records);
    let read = read_order_events(&scenario, expected.len());
    let log = service.log_text();
    assert!(service.stop(Duration::from_secs(30)).success(), "{log}");
    assert!(log.contains("no Kafka broker is reachable"), "{log}");
    assert_events_and_payloads(&read, &scenario.config, &records);
    assert_no_hanging_transaction(&scenario.topic("shop.order-events"));
}

/// A second process started with the same instance id fences the first: the first stops
/// with a message naming the fencing and a non-zero exit, and the output stays exact.
#[test]
fn a_fenced_instance_stops_with_the_reason_and_a_non_zero_exit() {
    let scenario = Scenario::new("fenced", "exactly_once", 3);
    // Orders only: whichever of the three partitions the first instance keeps when the twin
    // joins gets records, so its next transaction meets the fence (an idle producer would not).
    edit_config(&scenario, |text| {
        let customers = text
            .find("[[pipeline]]\nname = \"customers\"")
            .expect("the customers pipeline");
        text[..customers].to_owned()
    });
    let topic = scenario.topic("shop.public.orders");
    let records = generated_orders(&topic, 200, 4_000);
    let offsets = GroupOffsets::new(&scenario.group(), &topic);
    produce(&records[..2_000]);
    let mut first = scenario.start("first.log");
    offsets.wait_caught_up(2 * MINUTE);
    // Same instance id (same transactional id), its own state file.
    let twin = same_instance_config(&scenario);
    let second = Service::start(&twin, &scenario.dir.path().join("second.log"));
    second.wait_for_log("cdcflow run started", MINUTE);
    produce(&records[2_000..]);
    wait_until("the fenced instance exits", 2 * MINUTE, || {
        !first.is_running()
    });
    let status = first.child.wait().unwrap();
    let log = first.log_text();
    assert!(!status.success(), "the fenced instance exited 0: {log}");
    assert!(log.contains("the producer was fenced"), "{log}");
    offsets.wait_caught_up(2 * MINUTE);
    let expected = expected_events(&scenario.config, &records);
    let read = read_order_events(&scenario, expected.len());
    assert!(second.stop(Duration::from_secs(30)).success());
    assert_events_and_payloads(&read, &scenario.config, &records);
    assert_no_hanging_transaction(&scenario.topic("shop.order-events"));
}

fn same_instance_config(scenario: &Scenario) -> PathBuf {
    let text = std::fs::read_to_string(&scenario.config).unwrap();
    let state = scenario.dir.path().join("state-twin.db");
    let path = scenario.dir.path().join("cdcflow-twin.toml");
    std::fs::write(
        &path,
        text.replace(
            &scenario.state.display().to_string(),
            &state.display().to_string(),
        ),
    )
    .unwrap();
    path
}

/// A rule that panics on one record (a bug, injected by a test-only CEL function) sends that
/// record to the DLQ with reason `internal_error` and the panic's message; the partition goes
/// on and the service never restarts on it.
#[test]
fn a_panicking_rule_sends_its_record_to_the_dlq_and_the_partition_goes_on() {
    let scenario = Scenario::new("panic", "exactly_once", 1);
    edit_config(&scenario, |text| {
        text.replacen(
            "when = \"op == 'c'\"",
            "when = \"op == 'c' && (after.status != 'explode' || cdcflow_fault_panic('boom'))\"",
            1,
        )
    });
    let topic = scenario.topic("shop.public.orders");
    let mut records = generated_orders(&topic, 50, 500);
    let exploding = 10;
    let mut value: Value = serde_json::from_slice(records[exploding].2.as_ref().unwrap()).unwrap();
    assert_eq!(value["op"], "c");
    value["after"]["status"] = Value::from("explode");
    records[exploding].2 = Some(value.to_string().into_bytes());
    produce(&records);
    let mut service = scenario.start("run.log");
    GroupOffsets::new(&scenario.group(), &topic).wait_caught_up(2 * MINUTE);
    let dlq = wait_for(&scenario.topic("dlq.orders"), 1, MINUTE);
    let expected = expected_events(&scenario.config, &records);
    let read = read_order_events(&scenario, expected.len());
    assert!(service.is_running(), "the service stopped on the panic");
    assert!(service.stop(Duration::from_secs(30)).success());
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let headers = &dlq[0].headers;
    assert_eq!(headers["cdcflow.error.reason"], "internal_error");
    assert_eq!(headers["cdcflow.origin.offset"], exploding.to_string());
    assert!(
        headers["cdcflow.error.message"].contains("boom"),
        "{headers:?}"
    );
    assert_events_and_payloads(&read, &scenario.config, &records);
}

/// `batch_max_bytes` bounds a batch whatever `batch_max_records` allows: with a bound below
/// one record, every record is a batch (one transaction each).
#[test]
fn batches_are_bounded_by_bytes() {
    let scenario = Scenario::new("bytes", "exactly_once", 1);
    edit_config(&scenario, |text| {
        text.replacen(
            "batch_max_records = 500\n",
            "batch_max_records = 500\nbatch_max_bytes = 1\n",
            1,
        )
    });
    let topic = scenario.topic("shop.public.orders");
    let records = generated_orders(&topic, 10, 40);
    produce(&records);
    let service = scenario.start("run.log");
    GroupOffsets::new(&scenario.group(), &topic).wait_caught_up(MINUTE);
    let (_, metrics) = service.http_get("/metrics");
    assert!(service.stop(Duration::from_secs(30)).success());
    let committed: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("cdcflow_batches_total{result=\"committed\"}")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no committed batches in {metrics}"));
    assert_eq!(committed, 40.0, "one batch per record");
    let expected = expected_events(&scenario.config, &records);
    assert_exactly(
        &events(&read_order_events(&scenario, expected.len())),
        &expected,
    );
}
