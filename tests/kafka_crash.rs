//! `cdcflow run` killed and regrouped against the real Apache Kafka broker tests/run-all.sh
//! starts: kill -9 at random moments (exactly-once and at-least-once), instances scaled out and
//! failed over in one group, and a zombie instance fenced. Every test uses fresh topics and a
//! fresh group, and checks what Kafka's Java console consumer reads back against the replay
//! oracle: event ids per entity, their order and their payloads.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kafka_support::*;
use serde_json::Value;

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
