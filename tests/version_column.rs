//! Version-column pipelines: deletes order after the update that carried the same version,
//! a delete without the column (REPLICA IDENTITY DEFAULT) follows the stored version, and a
//! later create with a higher version revives the entity.

mod common;

use cdcflow::engine::{Decision, DecodeOutcome, EntityState};
use common::{pipelines, record};
use serde_json::json;

const CONFIG: &str = r#"
[[pipeline]]
name = "accounts"
topics = ["db.accounts"]

[pipeline.version]
by = "column"
column = "version"

[[pipeline.rule]]
name = "deleted"
when = "op == 'd'"
event_type = "AccountDeleted"
topic = "events"
"#;

fn change(op: &str, before: serde_json::Value, after: serde_json::Value) -> serde_json::Value {
    json!({"op": op, "before": before, "after": after, "source": {"ts_ms": 1}})
}

/// The gate's decisions over one entity's life with a version column.
#[test]
fn deletes_and_revivals_with_a_version_column() {
    let pipelines = pipelines(CONFIG);
    let pipeline = &pipelines[0].1;
    let mut stored: Option<EntityState> = None;
    let steps = [
        (
            change("c", json!(null), json!({"id": 1, "version": 1})),
            Decision::Applied,
        ),
        (
            change("u", json!(null), json!({"id": 1, "version": 5})),
            Decision::Applied,
        ),
        // REPLICA IDENTITY DEFAULT: the delete carries only the key.
        (
            change("d", json!({"id": 1}), json!(null)),
            Decision::Applied,
        ),
        (
            change("d", json!({"id": 1}), json!(null)),
            Decision::Duplicate,
        ),
        (
            change("u", json!(null), json!({"id": 1, "version": 5})),
            Decision::Stale,
        ),
        (
            change("c", json!(null), json!({"id": 1, "version": 6})),
            Decision::Applied,
        ),
        (
            change("u", json!(null), json!({"id": 1, "version": 4})),
            Decision::Stale,
        ),
    ];
    for (offset, (value, expected)) in steps.iter().enumerate() {
        let raw = record(
            "db.accounts",
            offset as i64,
            Some(json!({"id": 1})),
            Some(value),
        );
        let DecodeOutcome::Change(decoded) = pipeline.decode(&raw) else {
            panic!("step {offset} decodes");
        };
        let applied = pipeline.apply(&raw, &decoded, stored.as_ref(), 0).unwrap();
        assert_eq!(applied.decision, *expected, "step {offset}");
        if let Some(next) = applied.next_state {
            stored = Some(next);
        }
    }
    assert!(
        !stored.unwrap().is_deleted(),
        "the re-create revived the entity"
    );
}
