//! `cdcflow reconcile` against a real PostgreSQL and a real broker: a pipeline fed by
//! CDC-shaped records, then drift injected four ways (changes never delivered, a row deleted
//! behind the pipeline's back, a row changed without its version, state rows deleted). The
//! report names every diverging entity exactly; `--repair` makes the events exact, with no
//! event twice; what the gate cannot repair (an image at the same version) stays reported.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kafka_support::*;
use serde_json::Value;

/// Delivers the current rows `ids` to `topic` as a connector would (flattened, keyed by id).
fn deliver(database: &str, topic: &str, ids: &str) {
    let rows = psql(
        database,
        &format!("SELECT row_to_json(o) FROM orders o WHERE id IN ({ids}) ORDER BY id"),
    );
    let records: Vec<Record> = rows
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            let key = format!(r#"{{"id":{}}}"#, row["id"]);
            (
                topic.to_owned(),
                Some(key.into_bytes()),
                Some(line.as_bytes().to_vec()),
            )
        })
        .collect();
    produce(&records);
}

fn reconcile(config: &Path, extra: &[&str]) -> (Value, String, i32) {
    let output = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .args(["reconcile", "--config"])
        .arg(config)
        .arg("orders")
        .args(extra)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("no JSON report ({error}): {stderr}"));
    (report, stderr, output.status.code().unwrap_or(-1))
}

/// (kind, key) of each divergence in a report.
fn divergences(report: &Value) -> BTreeSet<(String, String)> {
    report["divergences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_owned(),
                d["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn expected(kinds: &[(&str, &[u32])]) -> BTreeSet<(String, String)> {
    kinds
        .iter()
        .flat_map(|(kind, ids)| ids.iter().map(move |id| (kind.to_string(), id.to_string())))
        .collect()
}

/// OrderPaid events per order key.
fn paid_events(topic: &str) -> BTreeMap<String, usize> {
    let mut paid = BTreeMap::new();
    for record in read_topic(topic, "read_committed", 500) {
        *paid.entry(record.key.clone()).or_default() += 1;
    }
    paid
}

#[test]
fn drift_is_reported_exactly_and_repair_emits_the_missed_events_once() {
    let prefix = format!("{}.", unique("reconcile"));
    let database = sql_name("reconcile");
    let url = empty_postgres_database(&database);
    let (orders, events) = (format!("{prefix}orders"), format!("{prefix}events"));
    create_topics(&[(&orders, 1), (&events, 1), (&format!("{prefix}dlq"), 1)]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let config = dir.path().join("reconcile.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[state]
path = "{state}"

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}group"
batch_max_wait = "50ms"

[http]
enabled = false

[[pipeline]]
name = "orders"
topics = ["{orders}"]
format = "flattened"
dlq_topic = "{prefix}dlq"
version = {{ by = "column", column = "version" }}

[pipeline.reconcile]
database_url = "{url}"
query = "SELECT id, status, version FROM orders"
key = ["id"]

# Paid, as a transition from the stored state; a snapshot read of an entity without state
# (a repair after state loss) emits nothing, as its event was emitted before.
[[pipeline.rule]]
name = "paid"
when = 'op != "d" && after.status == "paid" && (previous == null ? op != "r" : previous.status != "paid")'
event_type = "OrderPaid"
topic = "{events}"
"#,
            state = state.display(),
            bootstrap = bootstrap(),
        ),
    )
    .unwrap();
    psql(
        &database,
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL, version bigint NOT NULL); \
         INSERT INTO orders SELECT g, 'new', 1 FROM generate_series(1, 30) g;",
    );
    let all: String = (1..=30)
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",");
    deliver(&database, &orders, &all);
    psql(
        &database,
        "UPDATE orders SET status = 'paid', version = 2 WHERE id <= 10;",
    );
    deliver(&database, &orders, "1,2,3,4,5,6,7,8,9,10");
    let service = Service::start(&config, &dir.path().join("run-1.log"));
    wait_for(&events, 10, Duration::from_secs(60));
    wait_caught_up(&format!("{prefix}group"), &orders, Duration::from_secs(60));

    // The drift: paid and new orders never delivered, rows deleted and changed behind the
    // pipeline's back, and state rows lost.
    psql(
        &database,
        "UPDATE orders SET status = 'paid', version = 2 WHERE id BETWEEN 11 AND 15; \
         INSERT INTO orders SELECT g, 'new', 1 FROM generate_series(31, 33) g; \
         DELETE FROM orders WHERE id IN (26, 27); \
         UPDATE orders SET status = 'vip' WHERE id = 20;",
    );
    assert_eq!(service.stop(Duration::from_secs(30)).code(), Some(0));
    runtime().block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", state.display()))
            .await
            .unwrap();
        let deleted = sqlx::query(
            "DELETE FROM entity_state WHERE pipeline = 'orders' AND entity IN ('1','2','3','21','22')",
        )
        .execute(&pool)
        .await
        .unwrap();
        assert_eq!(deleted.rows_affected(), 5);
        pool.close().await;
    });
    let state_arg = state.to_str().unwrap();
    let metrics_file = dir.path().join("reconcile.prom");
    let (report, summary, code) = reconcile(
        &config,
        &[
            "--state",
            state_arg,
            "--metrics-file",
            metrics_file.to_str().unwrap(),
            "--fail-on-divergence",
        ],
    );
    assert_eq!(
        code, 2,
        "divergences fail the run with --fail-on-divergence"
    );
    let drift = expected(&[
        ("missing", &[1, 2, 3, 21, 22, 31, 32, 33]),
        ("extra", &[26, 27]),
        ("version", &[11, 12, 13, 14, 15]),
        ("image", &[20]),
    ]);
    assert_eq!(divergences(&report), drift, "{summary}");
    assert_eq!(report["compared"], 33);
    assert!(
        summary.contains("33 entities compared: 17 match, 8 missing, 2 extra, 5 at another version, 1 with another image"),
        "{summary}"
    );
    let page = std::fs::read_to_string(&metrics_file).unwrap();
    assert!(
        page.contains(r#"cdcflow_reconcile_divergences{pipeline="orders",kind="missing"} 8"#),
        "{page}"
    );

    // The repair goes through the running pipeline.
    let (repair, summary, code) = reconcile(&config, &["--state", state_arg, "--repair"]);
    assert_eq!(code, 0);
    assert_eq!(repair["repaired_records"], 15, "{summary}");
    assert_eq!(
        repair["not_repairable"].as_array().unwrap().len(),
        1,
        "{summary}"
    );
    let service = Service::start(&config, &dir.path().join("run-2.log"));
    wait_caught_up(&format!("{prefix}group"), &orders, Duration::from_secs(60));
    let paid = paid_events(&events);
    let every_paid: BTreeMap<String, usize> = (1..=15).map(|id| (id.to_string(), 1)).collect();
    assert_eq!(paid, every_paid, "one OrderPaid per paid order, none twice");

    // From the changelog (the whole state): only the image no version carried is left.
    let (after, summary, code) = reconcile(&config, &["--fail-on-divergence"]);
    assert_eq!(
        divergences(&after),
        expected(&[("image", &[20])]),
        "{summary}"
    );
    assert_eq!(code, 2);
    assert_eq!(after["compared"], 33, "31 rows and the 2 deleted entities");
    assert!(read_topic(&format!("{prefix}dlq"), "read_committed", 300).is_empty());
    assert_eq!(service.stop(Duration::from_secs(30)).code(), Some(0));
}
