//! Arbitrary text as a rule's condition and payload expression: compiling must answer with a
//! located error, and a rule that compiles must evaluate (to a value or an error) on images
//! of every JSON type without panicking.
#![no_main]

use cdcflow::engine::{CompiledRules, PayloadSpec, RuleInput, RuleSpec};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use std::sync::LazyLock;

static IMAGES: LazyLock<(
    Map<String, Value>,
    Map<String, Value>,
    Map<String, Value>,
    Value,
)> = LazyLock::new(|| {
    let object = |value: Value| match value {
        Value::Object(map) => map,
        _ => unreachable!(),
    };
    (
        object(
            json!({"id": 1, "status": "pending", "amount": "1.50", "tags": ["a", 2, null],
                          "nested": {"x": 1.5e300, "y": -9223372036854775808i64}, "flag": true}),
        ),
        object(
            json!({"id": 1, "status": "paid", "amount": "2.00", "tags": [],
                          "nested": {"x": 18446744073709551615u64}, "flag": false, "note": null}),
        ),
        object(json!({"connector": "postgresql", "lsn": 42, "table": "orders"})),
        json!({"id": 1}),
    )
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Up to the first newline is the condition; the rest, if any, the payload expression.
    let (when, payload) = match text.split_once('\n') {
        Some((when, payload)) => (when, PayloadSpec::Expression(payload.to_owned())),
        None => (text, PayloadSpec::Row),
    };
    let spec = RuleSpec {
        name: "fuzz".to_owned(),
        when: when.to_owned(),
        event_type: "Fuzz".to_owned(),
        topic: "t".to_owned(),
        payload,
    };
    let Ok(rules) = CompiledRules::compile("fuzz", &[spec]) else {
        return;
    };
    let (before, after, source, key) = &*IMAGES;
    for op in ["c", "u", "d"] {
        let _ = rules.evaluate(&RuleInput {
            op,
            before: Some(before),
            after: (op != "d").then_some(after),
            previous: Some(before),
            key,
            source,
        });
    }
});
