//! Unit tests of the rules: compilation (located errors, unknown variables), the variables a
//! rule sees (`old`, `changed`, integers) and run-time failures named by rule.

use super::*;
use serde_json::json;

fn rule(name: &str, when: &str, payload: PayloadSpec) -> RuleSpec {
    RuleSpec {
        name: name.to_owned(),
        when: when.to_owned(),
        event_type: format!("test.{name}"),
        topic: "out".to_owned(),
        payload,
    }
}

fn row(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

fn fire(rules: &CompiledRules, input: &RuleInput<'_>) -> Vec<(String, Value)> {
    rules
        .evaluate(input)
        .unwrap()
        .into_iter()
        .map(|fired| (fired.rule.name.clone(), fired.data))
        .collect()
}

static NO_SOURCE: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

/// A status transition fires against the stored image when Postgres sends `before: null`.
#[test]
fn transition_uses_previous_when_before_is_null() {
    let rules = CompiledRules::compile(
        "orders",
        &[rule(
            "paid",
            "op == 'u' && old != null && old.status != 'paid' && after.status == 'paid'",
            PayloadSpec::Fields(vec![
                ("from".into(), "old.status".into()),
                ("to".into(), "after.status".into()),
                ("amount".into(), "after.amount".into()),
            ]),
        )],
    )
    .unwrap();
    let previous = row(json!({"id": 1, "status": "pending", "amount": "10.00"}));
    let after = row(json!({"id": 1, "status": "paid", "amount": "10.00"}));
    let key = json!({"id": 1});
    let input = RuleInput {
        op: "u",
        before: None,
        after: Some(&after),
        previous: Some(&previous),
        key: &key,
        source: &NO_SOURCE,
    };
    assert_eq!(
        fire(&rules, &input),
        vec![(
            "paid".to_owned(),
            json!({"from": "pending", "to": "paid", "amount": "10.00"})
        )]
    );
    // Without any old image the guard keeps the rule from failing or firing.
    let unknown = RuleInput {
        previous: None,
        ..input
    };
    assert!(fire(&rules, &unknown).is_empty());
    // Already paid: no second event.
    let repeat = RuleInput {
        previous: Some(&after),
        ..input
    };
    assert!(fire(&rules, &repeat).is_empty());
}

/// `changed` lists exactly the fields whose values differ between old and new images.
#[test]
fn changed_lists_differing_fields() {
    let rules = CompiledRules::compile(
        "customers",
        &[rule(
            "email",
            "'email' in changed",
            PayloadSpec::Expression("changed".into()),
        )],
    )
    .unwrap();
    let before = row(json!({"id": 1, "email": "a@x", "name": "A", "gone": 1}));
    let after = row(json!({"id": 1, "email": "b@x", "name": "A", "new": 2}));
    let key = json!({"id": 1});
    let input = RuleInput {
        op: "u",
        before: Some(&before),
        after: Some(&after),
        previous: None,
        key: &key,
        source: &NO_SOURCE,
    };
    assert_eq!(
        fire(&rules, &input),
        vec![("email".to_owned(), json!(["email", "gone", "new"]))]
    );
}

/// A rule that reads only `changed` still needs the stored image, and a delete compares
/// against the stored image rather than a key-only `before`.
#[test]
fn changed_and_deletes_use_the_stored_image() {
    let rules = CompiledRules::compile(
        "orders",
        &[rule(
            "status",
            "'status' in changed",
            PayloadSpec::Expression("old.status".into()),
        )],
    )
    .unwrap();
    assert!(rules.reads_previous());
    let previous = row(json!({"id": 1, "status": "paid"}));
    let key_only = row(json!({"id": 1, "status": null}));
    let key = json!({"id": 1});
    let delete = RuleInput {
        op: "d",
        before: Some(&key_only),
        after: None,
        previous: Some(&previous),
        key: &key,
        source: &NO_SOURCE,
    };
    assert_eq!(
        fire(&rules, &delete),
        vec![("status".to_owned(), json!("paid"))]
    );
}

/// Integers compare with CEL int literals and the default payload is the newest row.
#[test]
fn integers_and_default_payload() {
    let rules = CompiledRules::compile(
        "p",
        &[rule("big", "after.amount_cents > 1000", PayloadSpec::Row)],
    )
    .unwrap();
    let after = row(json!({"id": 7, "amount_cents": 1500}));
    let key = json!({"id": 7});
    let input = RuleInput {
        op: "c",
        before: None,
        after: Some(&after),
        previous: None,
        key: &key,
        source: &NO_SOURCE,
    };
    assert_eq!(
        fire(&rules, &input),
        vec![("big".to_owned(), json!({"id": 7, "amount_cents": 1500}))]
    );
}

/// Compile errors name the pipeline, the rule, the part and the position.
#[test]
fn compile_errors_are_located() {
    let error = CompiledRules::compile(
        "orders",
        &[rule("paid", "after.status == 'paid' &&", PayloadSpec::Row)],
    )
    .unwrap_err();
    assert_eq!(
        (
            error.pipeline.as_str(),
            error.rule.as_str(),
            error.part.as_str()
        ),
        ("orders", "paid", "when")
    );
    assert!(error.message.contains(" at 1:"), "{error}");
    let text = error.to_string();
    assert!(
        text.starts_with("pipeline `orders`, rule `paid`, when:"),
        "{text}"
    );
}

/// A misspelt variable is rejected at compile time, with the valid names; macro variables
/// are allowed.
#[test]
fn unknown_variables_are_compile_errors() {
    let error = CompiledRules::compile("o", &[rule("r", "aftr.status == 'x'", PayloadSpec::Row)])
        .unwrap_err();
    assert!(
        error.message.contains("unknown variable `aftr`"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("before, after, previous"),
        "{}",
        error.message
    );
    CompiledRules::compile(
        "o",
        &[rule(
            "r",
            "after.items.exists(i, i.qty > 0)",
            PayloadSpec::Row,
        )],
    )
    .unwrap();
    let payload_error = CompiledRules::compile(
        "o",
        &[rule(
            "r",
            "true",
            PayloadSpec::Fields(vec![("x".into(), "1 +".into())]),
        )],
    )
    .unwrap_err();
    assert_eq!(payload_error.part, "payload.x");
}

/// A rule that fails on one record reports the rule and the expression, not a panic.
#[test]
fn runtime_errors_name_the_rule() {
    let rules = CompiledRules::compile(
        "o",
        &[rule("paid", "old.status == 'paid'", PayloadSpec::Row)],
    )
    .unwrap();
    let after = row(json!({"id": 1}));
    let key = json!({"id": 1});
    let input = RuleInput {
        op: "u",
        before: None,
        after: Some(&after),
        previous: None,
        key: &key,
        source: &NO_SOURCE,
    };
    let error = rules.evaluate(&input).unwrap_err();
    assert_eq!((error.rule.as_str(), error.part.as_str()), ("paid", "when"));
    assert!(error.message.contains("old.status"), "{}", error.message);
    let non_bool = CompiledRules::compile("o", &[rule("n", "after.id", PayloadSpec::Row)]).unwrap();
    assert!(
        non_bool
            .evaluate(&input)
            .unwrap_err()
            .message
            .contains("expected a boolean")
    );
}
