//! Parking through whole batches: the batch processor, the state cache and a store, with the
//! DLQ records read back and replayed or discarded as `cdcflow dlq` does.

use crate::cdc::RawRecord;
use crate::config::{Config, TopicRoute};
use crate::engine::{OutputKind, OutputRecord, Pipeline};
use crate::metrics::Tally;
use crate::ops::DeadLetter;
use crate::runtime::{BatchProcessor, StateCache};
use crate::store::{MemoryStore, StateStore};

/// A pipeline over `orders` whose status rule fails on status `bad` unless `fixed`.
fn pipelines(fixed: bool, policy: &str) -> Vec<(TopicRoute, Pipeline)> {
    let when = if fixed {
        "op == 'u' && after.status != before.status"
    } else {
        "op == 'u' && after.status != before.status && (after.status != 'bad' || after.nope == 1)"
    };
    let config = Config::parse(
        &format!(
            r#"
            [[pipeline]]
            name = "orders"
            topics = ["orders"]
            dlq_policy = "{policy}"
            [[pipeline.rule]]
            name = "created"
            when = "op == 'c'"
            event_type = "OrderCreated"
            topic = "events"
            [[pipeline.rule]]
            name = "status"
            when = "{when}"
            event_type = "OrderStatusChanged"
            topic = "events"
            payload = {{ status = "after.status" }}
            "#
        ),
        "test",
        Vec::new(),
    )
    .unwrap();
    config.build_pipelines().unwrap()
}

/// Version `lsn` of order `id`: created at its first version, updated from `before` after.
fn change(offset: i64, id: u64, before: Option<&str>, status: &str, lsn: u64) -> RawRecord {
    let value = serde_json::json!({
        "before": before.map(|before| serde_json::json!({"id": id, "status": before})),
        "after": {"id": id, "status": status},
        "source": {"connector": "postgresql", "ts_ms": 1_700_000_000_000u64, "lsn": lsn},
        "op": if before.is_some() { "u" } else { "c" },
    });
    RawRecord {
        topic: "orders".to_owned(),
        partition: 0,
        offset,
        key: Some(format!(r#"{{"id":{id}}}"#).into_bytes()),
        value: Some(value.to_string().into_bytes()),
        headers: Vec::new(),
        timestamp_ms: Some(1_000),
    }
}

/// Runs records through `pipelines` against the shared cache and store.
async fn run(
    pipelines: &[(TopicRoute, Pipeline)],
    records: &[RawRecord],
    cache: &mut StateCache,
    store: &MemoryStore,
) -> (Vec<OutputRecord>, Tally) {
    let mut tally = Tally::default();
    let outcome = BatchProcessor::new(pipelines)
        .process(records, cache, store, &mut tally, 5_000)
        .await
        .unwrap();
    store.save(outcome.writes, Vec::new()).await.unwrap();
    (outcome.outputs, tally)
}

/// `(entity, status)` of each status event, and the dead letters, in output order.
fn events(outputs: &[OutputRecord]) -> Vec<(String, String)> {
    outputs
        .iter()
        .filter(|output| output.kind == OutputKind::Event)
        .map(|output| {
            let value: serde_json::Value =
                serde_json::from_slice(output.value.as_deref().unwrap()).unwrap();
            let created = value["type"]
                .as_str()
                .unwrap_or_default()
                .ends_with("OrderCreated");
            let status = match value["data"]["status"].as_str() {
                _ if created => "created",
                status => status.unwrap_or_default(),
            };
            (
                String::from_utf8(output.key.clone().unwrap()).unwrap(),
                status.to_owned(),
            )
        })
        .collect()
}

/// The dead letters among `outputs`, as `cdcflow dlq` reads them back from the DLQ topic.
fn dead_letters(outputs: &[OutputRecord], first_offset: i64) -> Vec<DeadLetter> {
    outputs
        .iter()
        .filter(|output| output.kind == OutputKind::DeadLetter)
        .enumerate()
        .map(|(index, output)| {
            let record = RawRecord {
                topic: output.topic.clone(),
                partition: 0,
                offset: first_offset + index as i64,
                key: output.key.clone(),
                value: output.value.clone(),
                headers: output
                    .headers
                    .iter()
                    .map(|(name, value)| crate::cdc::Header {
                        name: name.clone(),
                        value: Some(value.clone()),
                    })
                    .collect(),
                timestamp_ms: Some(2_000),
            };
            DeadLetter::from_record(&record).unwrap()
        })
        .collect()
}

/// Written back to the input at `offset`, as `cdcflow dlq` does.
fn written_back(reinjection: crate::ops::Reinjection, offset: i64) -> RawRecord {
    RawRecord {
        topic: reinjection.topic,
        partition: reinjection.partition,
        offset,
        key: reinjection.key,
        value: reinjection.value,
        headers: reinjection
            .headers
            .into_iter()
            .map(|(name, value)| crate::cdc::Header {
                name,
                value: Some(value),
            })
            .collect(),
        timestamp_ms: Some(3_000),
    }
}

/// Order 1's second change fails: its third and fourth wait behind it while order 2 goes on;
/// the replay of the second (after the rule is fixed) emits the second, third and fourth in
/// order, each once; a second replay emits nothing.
#[tokio::test]
async fn parked_changes_follow_their_replayed_dead_letter_in_order() {
    let store = MemoryStore::new();
    let mut cache = StateCache::new(1, 1_000);
    let input = [
        change(0, 1, None, "pending", 10),
        change(1, 2, None, "pending", 11),
        change(2, 1, Some("pending"), "bad", 12),
        change(3, 1, Some("bad"), "paid", 13),
        change(4, 2, Some("pending"), "paid", 14),
        change(5, 1, Some("paid"), "shipped", 15),
    ];
    let broken = pipelines(false, "park");
    let (outputs, tally) = run(&broken, &input, &mut cache, &store).await;
    assert_eq!(
        events(&outputs),
        [("1", "created"), ("2", "created"), ("2", "paid")].map(|(e, s)| (e.into(), s.into()))
    );
    let letters = dead_letters(&outputs, 0);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].origin.offset, 2);
    assert_eq!(letters[0].entity.as_deref(), Some("1"));
    assert_eq!(tally.pipelines[0].parked_changes, 2);
    let stored = store.load("orders", &["1"]).await.unwrap();
    let parked = stored["1"].parked.as_ref().expect("order 1 is parked");
    assert_eq!(parked.blocker.offset, 2);
    let offsets: Vec<i64> = parked.changes.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [3, 5]);

    // A fresh cache: the parked changes come back from the store, as after a restart.
    let mut cache = StateCache::new(1, 1_000);
    let fixed = pipelines(true, "park");
    let replay = written_back(letters[0].replay().unwrap(), 6);
    let later = change(7, 1, Some("shipped"), "delivered", 16);
    let (outputs, tally) = run(&fixed, &[replay.clone(), later], &mut cache, &store).await;
    assert_eq!(
        events(&outputs),
        [
            ("1", "bad"),
            ("1", "paid"),
            ("1", "shipped"),
            ("1", "delivered")
        ]
        .map(|(e, s)| (e.into(), s.into()))
    );
    assert_eq!(tally.pipelines[0].unparked_changes, 2);
    assert!(
        store.load("orders", &["1"]).await.unwrap()["1"]
            .parked
            .is_none()
    );

    let (outputs, tally) = run(
        &fixed,
        &[RawRecord {
            offset: 8,
            ..replay
        }],
        &mut cache,
        &store,
    )
    .await;
    assert!(events(&outputs).is_empty(), "{outputs:?}");
    // Order 1 moved on to `delivered` since: the replayed change is older than its state.
    assert_eq!(tally.pipelines[0].decisions.get("stale"), Some(&1));
}

/// A replay that fails again is dead-lettered again and keeps the entity parked behind the
/// first failure; a discard then releases the parked changes without the failed one. A first
/// change that fails parks an entity that has no state yet.
#[tokio::test]
async fn a_discard_releases_the_parked_changes_without_the_dead_letter() {
    let store = MemoryStore::new();
    let mut cache = StateCache::new(1, 1_000);
    let broken = pipelines(false, "park");
    let input = [
        change(0, 1, None, "pending", 10),
        change(1, 1, Some("pending"), "bad", 11),
        change(2, 1, Some("bad"), "paid", 12),
    ];
    let (outputs, _) = run(&broken, &input, &mut cache, &store).await;
    let letters = dead_letters(&outputs, 0);
    let replay = written_back(letters[0].replay().unwrap(), 3);
    let (outputs, _) = run(&broken, &[replay], &mut cache, &store).await;
    assert!(events(&outputs).is_empty());
    let again = dead_letters(&outputs, 1);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].first_origin.offset, 1, "still the first failure");
    let parked = store.load("orders", &["1"]).await.unwrap()["1"]
        .parked
        .clone()
        .unwrap();
    assert_eq!(parked.blocker.offset, 1);

    let discard = written_back(again[0].discard(), 4);
    let (outputs, tally) = run(&broken, &[discard], &mut cache, &store).await;
    assert_eq!(events(&outputs), [("1".to_owned(), "paid".to_owned())]);
    assert_eq!(tally.pipelines[0].skipped.get("discarded"), Some(&1));
    assert!(
        store.load("orders", &["1"]).await.unwrap()["1"]
            .parked
            .is_none()
    );
}

/// Under the default policy a failure parks nothing: later changes are processed, and the
/// replay of the dead letter is then stale.
#[tokio::test]
async fn continue_policy_processes_later_changes() {
    let store = MemoryStore::new();
    let mut cache = StateCache::new(1, 1_000);
    let input = [
        change(0, 1, None, "pending", 10),
        change(1, 1, Some("pending"), "bad", 11),
        change(2, 1, Some("bad"), "paid", 12),
    ];
    let (outputs, tally) = run(&pipelines(false, "continue"), &input, &mut cache, &store).await;
    assert_eq!(
        events(&outputs),
        [("1", "created"), ("1", "paid")].map(|(e, s)| (e.into(), s.into()))
    );
    assert_eq!(tally.pipelines[0].parked_changes, 0);
    let replay = written_back(dead_letters(&outputs, 0)[0].replay().unwrap(), 3);
    let (outputs, tally) = run(&pipelines(true, "continue"), &[replay], &mut cache, &store).await;
    assert!(events(&outputs).is_empty());
    assert_eq!(tally.pipelines[0].decisions.get("stale"), Some(&1));
}

/// A first change that fails parks an entity with no state; releasing it lets its changes
/// apply from nothing.
#[tokio::test]
async fn an_entity_without_state_can_park() {
    let store = MemoryStore::new();
    let mut cache = StateCache::new(1, 1_000);
    let broken = pipelines(false, "park");
    let mut first = change(0, 9, None, "bad", 10);
    // A create whose status rule fails: make the create itself fail.
    first.value = Some(
        serde_json::json!({
            "before": {"id": 9, "status": "x"}, "after": {"id": 9, "status": "bad"},
            "source": {"connector": "postgresql", "ts_ms": 1, "lsn": 10}, "op": "u"})
        .to_string()
        .into_bytes(),
    );
    let (outputs, _) = run(
        &broken,
        &[first, change(1, 9, Some("bad"), "paid", 11)],
        &mut cache,
        &store,
    )
    .await;
    assert!(events(&outputs).is_empty());
    let stored = store.load("orders", &["9"]).await.unwrap();
    assert!(stored["9"].parked.as_ref().unwrap().entity_absent);
    let replay = written_back(dead_letters(&outputs, 0)[0].replay().unwrap(), 2);
    let (outputs, _) = run(&pipelines(true, "park"), &[replay], &mut cache, &store).await;
    assert_eq!(
        events(&outputs),
        [("9", "bad"), ("9", "paid")].map(|(e, s)| (e.into(), s.into()))
    );
}
