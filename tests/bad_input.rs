//! Bad input never stops a run and is never lost: each bad record becomes a DLQ record that
//! names the reason, the stage and the origin, is counted, and the records after it go on.

mod common;

use cdcflow::cdc::RawRecord;
use cdcflow::engine::{OutputKind, OutputRecord, output_headers};
use cdcflow::metrics::Tally;
use cdcflow::runtime::{BatchProcessor, StateCache};
use cdcflow::store::MemoryStore;
use common::{ORDERS_TOPIC, order_change, pipelines, raw_record, record};
use serde_json::json;

const CONFIG: &str = r#"
[limits]
max_record_bytes = 4096
max_nesting_depth = 32

[[pipeline]]
name = "orders"
topics = ["shop.public.orders"]

[[pipeline.rule]]
name = "created"
when = "op == 'c'"
event_type = "OrderCreated"
topic = "events"
payload = { id = "after.id" }

[[pipeline.rule]]
name = "discounted"
when = "op == 'u' && after.discount > 0"
event_type = "OrderDiscounted"
topic = "events"
"#;

fn header<'a>(output: &'a OutputRecord, name: &str) -> &'a str {
    let value = output
        .headers
        .iter()
        .find(|(header, _)| header == name)
        .map(|(_, value)| value)
        .unwrap_or_else(|| panic!("header {name} missing"));
    std::str::from_utf8(value).unwrap()
}

/// Runs `bad` followed by one good create of order 77, and returns the outputs and counts.
fn run_with_good_record_after(bad: RawRecord) -> (Vec<OutputRecord>, Tally) {
    let pipelines = pipelines(CONFIG);
    let processor = BatchProcessor::new(&pipelines);
    let mut cache = StateCache::new(1, 100);
    let mut tally = Tally::default();
    let good = record(
        ORDERS_TOPIC,
        bad.offset + 1,
        Some(json!({"id": 77})),
        Some(&order_change("c", 77, Some("pending"), 5_000)),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let outcome = runtime
        .block_on(processor.process(&[bad, good], &mut cache, &MemoryStore::new(), &mut tally, 0))
        .unwrap();
    (outcome.outputs, tally)
}

/// Asserts the DLQ record for `bad` and that the good record after it produced its event.
fn assert_dead_lettered(bad: RawRecord, reason: &str, stage: &str, message_part: &str) {
    let original = bad.clone();
    let (outputs, tally) = run_with_good_record_after(bad);
    assert_eq!(
        outputs.len(),
        2,
        "one DLQ record and one event: {outputs:#?}"
    );
    let dlq = &outputs[0];
    assert_eq!(dlq.kind, OutputKind::DeadLetter);
    assert_eq!(dlq.topic, "cdcflow.dlq.orders");
    assert_eq!(dlq.key, original.key, "the original key is kept");
    assert_eq!(dlq.value, original.value, "the original value is kept");
    assert_eq!(header(dlq, output_headers::ERROR_REASON), reason);
    assert_eq!(header(dlq, output_headers::ERROR_STAGE), stage);
    assert_eq!(header(dlq, output_headers::ORIGIN_TOPIC), ORDERS_TOPIC);
    assert_eq!(header(dlq, output_headers::ORIGIN_PARTITION), "0");
    assert_eq!(
        header(dlq, output_headers::ORIGIN_OFFSET),
        original.offset.to_string()
    );
    assert_eq!(header(dlq, output_headers::PIPELINE), "orders");
    let message = header(dlq, output_headers::ERROR_MESSAGE);
    assert!(
        message.contains(message_part),
        "message `{message}` lacks `{message_part}`"
    );
    assert_eq!(outputs[1].kind, OutputKind::Event, "the run went on");
    assert_eq!(
        tally.pipelines[0].dlq.get(reason),
        Some(&1),
        "counted by reason"
    );
}

fn bad_value(offset: i64, value: &[u8]) -> RawRecord {
    raw_record(ORDERS_TOPIC, offset, Some(br#"{"id":1}"#), Some(value))
}

/// Malformed JSON is dead-lettered with the parser's position.
#[test]
fn malformed_json() {
    assert_dead_lettered(
        bad_value(10, b"{\"op\": c}"),
        "malformed_json",
        "decode",
        "line 1",
    );
}

/// Bytes that are not UTF-8 are dead-lettered with the offending offset.
#[test]
fn non_utf8_bytes() {
    assert_dead_lettered(
        bad_value(11, b"{\"op\":\"c\xff\"}"),
        "not_utf8",
        "decode",
        "offset 8",
    );
}

/// A record cut off mid-way is reported as truncated, not as generic garbage.
#[test]
fn truncated_record() {
    assert_dead_lettered(
        bad_value(12, br#"{"before":null,"after":{"id":1,"#),
        "truncated_json",
        "decode",
        "truncated",
    );
}

/// A wrong type in the envelope names the field, the expected and the found type.
#[test]
fn wrong_type_in_envelope() {
    let value = json!({"before": null, "after": "not a row", "op": "c", "source": {}});
    assert_dead_lettered(
        bad_value(13, value.to_string().as_bytes()),
        "wrong_type",
        "decode",
        "field `after` has the wrong type: expected object or null, found string",
    );
}

/// A record without a key (and no key_fields configured) is dead-lettered.
#[test]
fn missing_key() {
    let value = order_change("c", 5, Some("pending"), 100);
    let bad = record(ORDERS_TOPIC, 14, None, Some(&value));
    assert_dead_lettered(bad, "missing_key", "decode", "no key");
}

/// A change without its version field (here the Postgres LSN) is dead-lettered.
#[test]
fn missing_version_field() {
    let mut value = order_change("c", 5, Some("pending"), 100);
    let source = value["source"].as_object_mut().unwrap();
    source.remove("lsn");
    source.remove("sequence");
    let bad = record(ORDERS_TOPIC, 15, Some(json!({"id": 5})), Some(&value));
    assert_dead_lettered(bad, "missing_version", "version", "source.lsn");
}

/// An op Debezium does not define is dead-lettered with the op.
#[test]
fn unknown_op() {
    let mut value = order_change("c", 5, Some("pending"), 100);
    value["op"] = json!("x");
    let bad = record(ORDERS_TOPIC, 16, Some(json!({"id": 5})), Some(&value));
    assert_dead_lettered(bad, "unknown_op", "decode", "unknown op `x`");
}

/// A record over `limits.max_record_bytes` is rejected before parsing.
#[test]
fn record_over_size_limit() {
    let mut value = order_change("c", 5, Some("pending"), 100);
    value["after"]["note"] = json!("x".repeat(5000));
    let bad = record(ORDERS_TOPIC, 17, Some(json!({"id": 5})), Some(&value));
    assert_dead_lettered(
        bad,
        "record_too_large",
        "decode",
        "over the limit of 4096 bytes",
    );
}

/// Nesting deep enough to threaten the stack is rejected without recursing into it.
#[test]
fn nesting_too_deep() {
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let value = format!(r#"{{"op":"c","after":{{"id":1,"x":{deep}}},"source":{{}}}}"#);
    assert_dead_lettered(
        bad_value(18, value.as_bytes()),
        "nesting_too_deep",
        "decode",
        "deeper than 32",
    );
}

/// A megabyte of open brackets, within the default size limit, is rejected without recursion.
#[test]
fn nesting_far_beyond_any_stack() {
    let abyss = "[".repeat(1_000_000);
    let decoder = cdcflow::cdc::Decoder::default();
    let error = decoder
        .decode(&bad_value(19, abyss.as_bytes()))
        .unwrap_err();
    assert_eq!(error.reason(), "nesting_too_deep");
}

/// A rule that fails at run time on one record dead-letters that record with the rule's name.
#[test]
fn rule_failing_at_run_time() {
    let mut value = order_change("u", 5, Some("pending"), 100);
    value["after"]["discount"] = json!("ten percent");
    let bad = record(ORDERS_TOPIC, 20, Some(json!({"id": 5})), Some(&value));
    assert_dead_lettered(bad, "rule_error", "rule", "rule `discounted`");
}

/// A key that is itself malformed is dead-lettered too.
#[test]
fn malformed_key() {
    let value = order_change("c", 5, Some("pending"), 100);
    let bad = raw_record(
        ORDERS_TOPIC,
        21,
        Some(b"{\"id\":"),
        Some(value.to_string().as_bytes()),
    );
    assert_dead_lettered(bad, "truncated_json", "decode", "key is truncated");
}

/// Tombstones are counted and skipped, never dead-lettered.
#[test]
fn tombstones_are_skipped_not_dead_lettered() {
    let tombstone = raw_record(ORDERS_TOPIC, 22, Some(br#"{"id":1}"#), None);
    let (outputs, tally) = run_with_good_record_after(tombstone);
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].kind, OutputKind::Event);
    assert_eq!(tally.pipelines[0].skipped.get("tombstone"), Some(&1));
    assert_eq!(tally.dlq_total(), 0);
}

/// An event too large for the broker sends its input record to the DLQ instead of failing
/// the batch at the broker over and over.
#[test]
fn output_too_large_goes_to_the_dlq() {
    let config = r#"
[limits]
max_output_bytes = 1000

[[pipeline]]
name = "orders"
topics = ["shop.public.orders"]

[[pipeline.rule]]
name = "created"
when = "op == 'c'"
event_type = "OrderCreated"
topic = "events"
"#;
    let pipelines = pipelines(config);
    let processor = BatchProcessor::new(&pipelines);
    let mut value = order_change("c", 5, Some("pending"), 100);
    value["after"]["note"] = json!("n".repeat(2_000));
    let big = record(ORDERS_TOPIC, 30, Some(json!({"id": 5})), Some(&value));
    let small = record(
        ORDERS_TOPIC,
        31,
        Some(json!({"id": 6})),
        Some(&order_change("c", 6, Some("pending"), 101)),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut tally = Tally::default();
    let outcome = runtime
        .block_on(processor.process(
            &[big.clone(), small],
            &mut StateCache::new(1, 100),
            &MemoryStore::new(),
            &mut tally,
            0,
        ))
        .unwrap();
    assert_eq!(outcome.outputs.len(), 2);
    let dlq = &outcome.outputs[0];
    assert_eq!(dlq.kind, OutputKind::DeadLetter);
    // The DLQ record itself must fit: the oversized value is dropped and its size named.
    assert_eq!(dlq.value, None);
    assert_eq!(
        header(dlq, output_headers::VALUE_DROPPED),
        big.payload_len().to_string()
    );
    assert!(dlq.size() <= 1000, "the DLQ record fits the limit");
    assert_eq!(
        header(dlq, output_headers::ERROR_REASON),
        "output_too_large"
    );
    assert_eq!(header(dlq, output_headers::ERROR_STAGE), "output");
    assert!(
        header(dlq, output_headers::ERROR_MESSAGE).contains("over limits.max_output_bytes (1000)")
    );
    assert_eq!(outcome.outputs[1].kind, OutputKind::Event);
    assert_eq!(
        outcome.writes.len(),
        1,
        "the oversized change is not applied"
    );
}
