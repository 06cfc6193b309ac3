//! Arbitrary bytes as a Debezium record without the schema wrapper, through a whole pipeline:
//! decode, the version gate against a stored state, rules over the images, events. Nothing
//! may panic; every failure must be a typed error (a DLQ record).
#![no_main]

use cdcflow::cdc::RawRecord;
use cdcflow::config::Config;
use cdcflow::engine::{DecodeOutcome, EntityState, Pipeline, Version};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

/// Rules that read every kind of variable, a tight nesting limit, and the TOAST placeholder.
const CONFIG: &str = r#"
[limits]
max_nesting_depth = 16

[[pipeline]]
name = "orders"
topics = ["t"]

[[pipeline.rule]]
name = "paid"
when = "op == 'u' && after.status == 'paid' && old != null && old.status != 'paid'"
event_type = "Paid"
topic = "events"
payload = { id = "after.id", amount = "after.amount", from = "old.status", table = "source.table" }

[[pipeline.rule]]
name = "changed"
when = "size(changed) > 0 && has(after.note)"
event_type = "Changed"
topic = "events"

[[pipeline.rule]]
name = "deleted"
when = "op == 'd'"
event_type = "Deleted"
topic = "events"
payload = "before"
"#;

static PIPELINES: LazyLock<Vec<Pipeline>> = LazyLock::new(|| {
    Config::parse(CONFIG, "fuzz", Vec::new())
        .unwrap()
        .build_pipelines()
        .unwrap()
        .into_iter()
        .map(|(_, pipeline)| pipeline)
        .collect()
});

fuzz_target!(|data: &[u8]| {
    // The first byte says where the key ends; the rest is the value.
    let (key, value) = match data.split_first() {
        Some((&split, rest)) => {
            let split = usize::from(split).min(rest.len());
            (Some(rest[..split].to_vec()), Some(rest[split..].to_vec()))
        }
        None => (None, None),
    };
    let record = RawRecord {
        topic: "t".into(),
        partition: 0,
        offset: 7,
        key,
        value,
        headers: Vec::new(),
        timestamp_ms: None,
    };
    let pipeline = &PIPELINES[0];
    let DecodeOutcome::Change(change) = pipeline.decode(&record) else {
        return;
    };
    let stored = EntityState {
        version: Version::new(vec![1, 2]),
        image: Some(r#"{"id":1,"status":"pending","note":"__debezium_unavailable_value"}"#.into()),
        updated_at_ms: 0,
        parked: None,
    };
    let _ = pipeline.apply(&record, &change, None, 0);
    let _ = pipeline.apply(&record, &change, Some(&stored), 0);
});
