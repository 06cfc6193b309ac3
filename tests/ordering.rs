//! The ordering property of the design: duplicates and replays never change the outcome.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use cdcflow::cdc::RawRecord;
use cdcflow::engine::{EntityState, OutputKind};
use cdcflow::metrics::Tally;
use cdcflow::runtime::{BatchProcessor, StateCache};
use cdcflow::store::{MemoryStore, StateStore};
use common::{ORDERS_CONFIG, ORDERS_TOPIC, order_change, pipelines, record};
use proptest::prelude::*;
use serde_json::json;

/// One entity's clean history: create, some status updates, maybe a delete and a re-create.
fn entity_history() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
    let status = prop_oneof![
        Just("pending"),
        Just("paid"),
        Just("shipped"),
        Just("cancelled")
    ];
    prop::collection::vec((prop_oneof![4 => Just("u"), 1 => Just("d")], status), 0..8).prop_map(
        |steps| {
            let mut history = vec![("c".to_owned(), Some("pending".to_owned()))];
            let mut alive = true;
            for (op, status) in steps {
                match (alive, op) {
                    (true, "d") => {
                        history.push(("d".to_owned(), None));
                        alive = false;
                    }
                    (true, _) => history.push(("u".to_owned(), Some(status.to_owned()))),
                    (false, _) => {
                        history.push(("c".to_owned(), Some(status.to_owned())));
                        alive = true;
                    }
                }
            }
            history
        },
    )
}

/// Clean records for up to 4 entities, interleaved, with strictly increasing LSNs.
fn clean_sequence() -> impl Strategy<Value = Vec<RawRecord>> {
    (prop::collection::vec(entity_history(), 1..4), any::<u64>()).prop_map(|(histories, seed)| {
        let mut cursors = vec![0usize; histories.len()];
        let mut records = Vec::new();
        let mut lsn = 1_000u64;
        let mut state = seed;
        loop {
            let live: Vec<usize> = (0..histories.len())
                .filter(|&entity| cursors[entity] < histories[entity].len())
                .collect();
            if live.is_empty() {
                return records;
            }
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let entity = live[(state >> 33) as usize % live.len()];
            let (op, status) = &histories[entity][cursors[entity]];
            cursors[entity] += 1;
            lsn += 16;
            let id = entity as i64 + 1;
            let value = order_change(op, id, status.as_deref(), lsn);
            records.push(record(
                ORDERS_TOPIC,
                records.len() as i64,
                Some(json!({"id": id})),
                Some(&value),
            ));
        }
    })
}

/// Inserts redeliveries of earlier records (duplicates and replays) at arbitrary points.
fn with_redeliveries(clean: Vec<RawRecord>, picks: Vec<(usize, usize)>) -> Vec<RawRecord> {
    let mut delivered = Vec::new();
    for (position, record) in clean.iter().enumerate() {
        delivered.push(record.clone());
        for &(at, back) in &picks {
            if at % clean.len().max(1) == position {
                delivered.push(clean[position - back % (position + 1)].clone());
            }
        }
    }
    for (offset, record) in delivered.iter_mut().enumerate() {
        record.offset = offset as i64;
    }
    delivered
}

struct RunResult {
    event_ids: Vec<String>,
    states: BTreeMap<String, EntityState>,
}

fn run(records: &[RawRecord], batch_size: usize, store: &MemoryStore) -> RunResult {
    let pipelines = pipelines(ORDERS_CONFIG);
    let processor = BatchProcessor::new(&pipelines);
    let mut cache = StateCache::new(pipelines.len(), 2);
    let mut tally = Tally::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut event_ids = Vec::new();
    for batch in records.chunks(batch_size.max(1)) {
        let outcome = runtime
            .block_on(processor.process(batch, &mut cache, store, &mut tally, 0))
            .unwrap();
        for output in &outcome.outputs {
            if output.kind == OutputKind::Event {
                let event = common::output_json(&output.value);
                event_ids.push(event["id"].as_str().unwrap().to_owned());
            }
            assert_ne!(output.kind, OutputKind::DeadLetter, "no record here is bad");
        }
        runtime
            .block_on(store.save(outcome.writes, Vec::new()))
            .unwrap();
        if cache.over_capacity() {
            cache.clear();
        }
    }
    let keys: Vec<String> = (1..=4).map(|id| id.to_string()).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let states = runtime
        .block_on(store.load("orders", &key_refs))
        .unwrap()
        .into_iter()
        .collect();
    RunResult { event_ids, states }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any delivery with duplicates and replays mixed in gives the clean run's final state and
    /// the clean run's event ids, each exactly once, whatever the batch boundaries.
    #[test]
    fn redeliveries_never_change_state_or_events(
        clean in clean_sequence(),
        picks in prop::collection::vec((any::<usize>(), any::<usize>()), 0..12),
        batch_size in 1usize..7,
    ) {
        let delivered = with_redeliveries(clean.clone(), picks);
        let expected = run(&clean, 1000, &MemoryStore::new());
        let actual = run(&delivered, batch_size, &MemoryStore::new());
        prop_assert_eq!(&actual.states, &expected.states);
        let unique: BTreeSet<&String> = actual.event_ids.iter().collect();
        prop_assert_eq!(unique.len(), actual.event_ids.len(), "an event id was emitted twice");
        prop_assert_eq!(
            unique,
            expected.event_ids.iter().collect::<BTreeSet<_>>()
        );
    }

    /// A second pass over the same records, against the same state, emits nothing.
    #[test]
    fn second_pass_emits_nothing(clean in clean_sequence(), batch_size in 1usize..7) {
        let store = MemoryStore::new();
        let first = run(&clean, batch_size, &store);
        prop_assert!(!first.event_ids.is_empty());
        let second = run(&clean, batch_size, &store);
        prop_assert!(second.event_ids.is_empty(), "second pass emitted {:?}", second.event_ids);
        prop_assert_eq!(second.states, first.states);
    }
}

/// A lane decodes and applies its records in chunks (to bound memory): the outputs are the
/// whole batch's, in order, and an entity changed in several chunks is written once, in its
/// last state.
#[test]
fn chunked_processing_matches_the_whole_batch() {
    const STATUSES: [&str; 4] = ["pending", "paid", "shipped", "cancelled"];
    let records: Vec<RawRecord> = (0..2_500u64)
        .map(|offset| {
            let id = (offset % 7) as i64;
            let op = if offset < 7 { "c" } else { "u" };
            let status = STATUSES[(offset as usize / 7) % 4];
            let value = order_change(op, id, Some(status), 1_000 + offset * 8);
            record(
                ORDERS_TOPIC,
                offset as i64,
                Some(json!({"id": id})),
                Some(&value),
            )
        })
        .collect();
    let pipelines = pipelines(ORDERS_CONFIG);
    let processor = BatchProcessor::new(&pipelines);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let process = |chunked: bool| {
        let store = MemoryStore::new();
        let mut cache = StateCache::new(pipelines.len(), 100);
        let mut tally = Tally::default();
        runtime
            .block_on(async {
                if chunked {
                    processor
                        .process_in_chunks(records.clone(), &mut cache, &store, &mut tally, 0)
                        .await
                } else {
                    processor
                        .process(&records, &mut cache, &store, &mut tally, 0)
                        .await
                }
            })
            .unwrap()
    };
    let (whole, chunked) = (process(false), process(true));
    assert!(whole.outputs.len() > 1_000, "the records fire events");
    assert_eq!(chunked.outputs, whole.outputs);
    assert_eq!(chunked.output_origins, whole.output_origins);
    let states = |writes: &[cdcflow::store::StateWrite]| -> BTreeMap<String, EntityState> {
        writes
            .iter()
            .map(|write| (write.entity.clone(), write.state.clone()))
            .collect()
    };
    assert_eq!(chunked.writes.len(), 7, "one write per entity");
    assert_eq!(states(&chunked.writes), states(&whole.writes));
}
