//! Decode + process of one typical Postgres `orders` update through a pipeline with two rules,
//! without and with the JsonConverter schema wrapper. Target (issue 2): at least 250,000
//! records/s without the wrapper and 100,000 records/s with it, on one core.

use std::hint::black_box;

use cdcflow::cdc::RawRecord;
use cdcflow::config::Config;
use cdcflow::engine::{DecodeOutcome, EntityState, Version};
use criterion::{Criterion, Throughput, criterion_group};
use serde_json::{Value, json};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONFIG: &str = r#"
[[pipeline]]
name = "orders"
topics = ["shop.public.orders"]

[[pipeline.rule]]
name = "paid"
when = "op == 'u' && after.status == 'paid' && old != null && old.status != 'paid'"
event_type = "com.example.shop.OrderPaid"
topic = "shop.order-events"
payload = { order_id = "after.id", amount = "after.amount", from_status = "old.status" }

[[pipeline.rule]]
name = "amount_changed"
when = "op == 'u' && old != null && old.amount != after.amount"
event_type = "com.example.shop.OrderAmountChanged"
topic = "shop.order-events"
payload = { order_id = "after.id", from = "old.amount", to = "after.amount" }
"#;

fn row(status: &str, amount: &str) -> Value {
    json!({"id": 1001, "customer_id": 7, "status": status, "amount": amount,
           "currency": "EUR", "created_at": "2024-11-25T09:58:00.000000Z",
           "updated_at": "2024-11-25T10:01:00.000000Z", "note": null})
}

fn source() -> Value {
    json!({"version": "2.7.3.Final", "connector": "postgresql", "name": "shop",
           "ts_ms": 1_732_528_860_000u64, "snapshot": "false", "db": "shop",
           "sequence": "[\"24023800\",\"24023928\"]", "schema": "public", "table": "orders",
           "txId": 771, "lsn": 24_023_928, "xmin": null})
}

fn plain_update() -> Value {
    json!({"before": null, "after": row("paid", "120.00"), "source": source(), "op": "u",
           "ts_ms": 1_732_528_860_312u64, "transaction": null})
}

fn field(name: &str, kind: &str, optional: bool) -> Value {
    json!({"type": kind, "optional": optional, "field": name})
}

/// The JsonConverter's text: `schema` first, then `payload` (a `Value` would sort the keys).
fn wrapped_update() -> String {
    let row_schema = |name: &str| {
        json!({"type": "struct", "optional": true, "name": "shop.public.orders.Value", "field": name,
               "fields": [field("id", "int64", false), field("customer_id", "int64", false),
                          field("status", "string", false),
                          {"type": "bytes", "optional": false, "name": "org.apache.kafka.connect.data.Decimal",
                           "version": 1, "parameters": {"scale": "2", "connect.decimal.precision": "10"}, "field": "amount"},
                          field("currency", "string", false),
                          {"type": "int64", "optional": false, "name": "io.debezium.time.MicroTimestamp", "version": 1, "field": "created_at"},
                          {"type": "int64", "optional": false, "name": "io.debezium.time.MicroTimestamp", "version": 1, "field": "updated_at"},
                          field("note", "string", true)]})
    };
    let schema = json!({"type": "struct", "optional": false, "name": "shop.public.orders.Envelope", "version": 2,
        "fields": [row_schema("before"), row_schema("after"),
            {"type": "struct", "optional": false, "name": "io.debezium.connector.postgresql.Source", "field": "source",
             "fields": [field("version", "string", false), field("connector", "string", false), field("name", "string", false),
                        field("ts_ms", "int64", false), field("snapshot", "string", true), field("db", "string", false),
                        field("sequence", "string", true), field("schema", "string", false), field("table", "string", false),
                        field("txId", "int64", true), field("lsn", "int64", true), field("xmin", "int64", true)]},
            field("op", "string", false), field("ts_ms", "int64", true)]});
    let mut after = row("paid", "120.00");
    after["amount"] = json!("LuA=");
    after["created_at"] = json!(1_732_528_680_000_000u64);
    after["updated_at"] = json!(1_732_528_860_000_000u64);
    let payload = json!({"before": null, "after": after, "source": source(), "op": "u",
                         "ts_ms": 1_732_528_860_312u64});
    format!(r#"{{"schema":{schema},"payload":{payload}}}"#)
}

fn record(key: &str, value: &str) -> RawRecord {
    RawRecord {
        topic: "shop.public.orders".into(),
        partition: 0,
        offset: 42,
        key: Some(key.as_bytes().to_vec()),
        value: Some(value.as_bytes().to_vec()),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

fn bench_decode_and_process(c: &mut Criterion) {
    let pipelines = Config::parse(CONFIG, "bench", Vec::new())
        .unwrap()
        .build_pipelines()
        .unwrap();
    let pipeline = &pipelines[0].1;
    let stored = EntityState {
        version: Version::new(vec![24_023_000, 24_023_100]),
        image: Some(row("pending", "110.00").to_string().into()),
        updated_at_ms: 0,
        parked: None,
    };
    let mut group = c.benchmark_group("decode_and_process");
    group.throughput(Throughput::Elements(1));
    let cases = [
        (
            "postgres_update_plain",
            record(r#"{"id":1001}"#, &plain_update().to_string()),
        ),
        (
            "postgres_update_schema_wrapped",
            record(
                r#"{"schema":{"type":"struct","optional":false,"name":"shop.public.orders.Key","fields":[{"type":"int64","optional":false,"field":"id"}]},"payload":{"id":1001}}"#,
                &wrapped_update(),
            ),
        ),
    ];
    for (name, input) in &cases {
        eprintln!(
            "{name}: value is {} bytes",
            input.value.as_ref().map_or(0, Vec::len)
        );
        group.bench_function(*name, |b| {
            b.iter(|| {
                let DecodeOutcome::Change(change) = pipeline.decode(black_box(input)) else {
                    panic!("bench record decodes");
                };
                let applied = pipeline.apply(input, &change, Some(&stored), 0).unwrap();
                assert_eq!(applied.event_types.len(), 2);
                black_box(applied)
            })
        });
    }
    let input = &cases[0].1;
    group.bench_function("decode_only_plain", |b| {
        b.iter(|| black_box(pipeline.decode(black_box(input))))
    });
    let DecodeOutcome::Change(change) = pipeline.decode(input) else {
        panic!()
    };
    let bare = Config::parse(
        "[[pipeline]]\nname = \"orders\"\ntopics = [\"t\"]\n",
        "bench",
        Vec::new(),
    )
    .unwrap()
    .build_pipelines()
    .unwrap();
    group.bench_function("apply_no_rules", |b| {
        b.iter(|| black_box(bare[0].1.apply(input, &change, Some(&stored), 0).unwrap()))
    });
    group.bench_function("apply_two_rules", |b| {
        b.iter(|| black_box(pipeline.apply(input, &change, Some(&stored), 0).unwrap()))
    });
    let falsy = Config::parse("[[pipeline]]\nname = \"orders\"\ntopics = [\"t\"]\n[[pipeline.rule]]\nname=\"a\"\nwhen=\"op == 'x' && after.status == 'paid' && old != null && old.status != 'paid'\"\nevent_type=\"x\"\ntopic=\"y\"\n", "bench", Vec::new()).unwrap().build_pipelines().unwrap();
    group.bench_function("apply_rule_never_fires", |b| {
        b.iter(|| black_box(falsy[0].1.apply(input, &change, Some(&stored), 0).unwrap()))
    });
    let lone = Config::parse("[[pipeline]]\nname = \"orders\"\ntopics = [\"t\"]\n[[pipeline.rule]]\nname=\"a\"\nwhen=\"op == 'u'\"\nevent_type=\"x\"\ntopic=\"y\"\npayload=\"1\"\n", "bench", Vec::new()).unwrap().build_pipelines().unwrap();
    group.bench_function("apply_one_trivial_event", |b| {
        b.iter(|| black_box(lone[0].1.apply(input, &change, Some(&stored), 0).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, bench_decode_and_process);

/// Criterion's run, then the means it stored written as `core.json` for `benches/render.sh`.
fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    write_results();
}

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/checkout.rs"]
mod checkout;

fn write_results() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| checkout::root().join("target"), std::path::PathBuf::from);
    let mean_ns = |name: &str| -> Option<f64> {
        let path = target.join(format!(
            "criterion/decode_and_process/{name}/new/estimates.json"
        ));
        let estimates: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        estimates["mean"]["point_estimate"].as_f64()
    };
    let (Some(plain), Some(wrapped)) = (
        mean_ns("postgres_update_plain"),
        mean_ns("postgres_update_schema_wrapped"),
    ) else {
        // A filtered run (`cargo bench --bench core -- decode_only`) leaves no pair to report.
        return;
    };
    let per_second = |ns: f64| 1e9 / ns;
    let mut results = vec![
        json!({"name": "Postgres update, plain: records/s on one core", "value": per_second(plain), "unit": "records/s"}),
        json!({"name": "Postgres update, schema-wrapped: records/s on one core", "value": per_second(wrapped), "unit": "records/s"}),
    ];
    for part in ["decode_only_plain", "apply_no_rules", "apply_two_rules"] {
        if let Some(ns) = mean_ns(part) {
            results.push(json!({"name": part, "value": ns / 1000.0, "unit": "µs"}));
        }
    }
    let document = json!({
        "benchmark": "core",
        "date": support::utc_now(),
        "machine": support::machine(),
        "results": results,
        "targets": [
            support::target("core, plain", ">= 250,000 records/s", format!("{:.0} records/s", per_second(plain)), per_second(plain) >= 250_000.0),
            support::target("core, schema-wrapped", ">= 150,000 records/s", format!("{:.0} records/s", per_second(wrapped)), per_second(wrapped) >= 150_000.0),
        ],
    });
    let path = support::results_path(checkout::root(), "core");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&document).unwrap() + "\n",
    )
    .unwrap();
    println!("results: {}", path.display());
}
